"""Check that rgnn's reference site documents every public name.

    python tools/check_docs.py docs/_build/html     # the built site (after sphinx-build)
    python tools/check_docs.py --sources docs       # the sources only, without building

On the built site, every name in ``rgnn.__all__`` must have its own entry, as ``rgnn`` exports
it (``id="rgnn.<name>"``): a function or class with its signature and its rendered docstring
(napoleon's ``Parameters``/``Returns`` fields where the docstring has ``Args:``/``Returns:``), a
constant with its description, a module (``rgnn.data``, ``rgnn.sharding``) with every name of
its ``__all__``. Pages with formulas must load MathJax, and every notebook must have its page.
On the sources, every public name must have exactly one autodoc directive of the right kind,
no directive may name something ``rgnn`` does not export, and every notebook must be listed.
Prints one line per problem and exits 1 if there is any.
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
import sys
from html.parser import HTMLParser
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DIRECTIVE = re.compile(r"^\.\. auto(function|class|data|module):: (rgnn(?:\.\w+)*)\s*$", re.M)


def _public():
    """``{name: kind}`` for every name of ``rgnn.__all__``, kind as autodoc calls it."""
    sys.path.insert(0, str(ROOT))
    import rgnn

    kinds = {}
    for name in rgnn.__all__:
        obj = getattr(rgnn, name)
        if inspect.ismodule(obj):
            kinds[name] = "module"
        elif inspect.isclass(obj):
            kinds[name] = "class"
        elif callable(obj):
            kinds[name] = "function"
        else:
            kinds[name] = "data"
    return rgnn, kinds


def check_sources(docs: Path) -> list[str]:
    """Problems with the autodoc directives under ``docs`` (no build needed)."""
    rgnn, kinds = _public()
    found: dict[str, list[str]] = {}
    problems = []
    for path in sorted(docs.rglob("*.rst")):
        for kind, target in DIRECTIVE.findall(path.read_text()):
            name = target.removeprefix("rgnn.")
            if kind == "module" and kinds.get(name) != "module":
                continue  # a module's own docstring (the mathematics of a page), not a name
            if name not in kinds:
                problems.append(f"{path}: auto{kind} {target}: not in rgnn.__all__")
                continue
            found.setdefault(name, []).append(kind)
    for name, kind in kinds.items():
        got = found.get(name, [])
        if len(got) != 1 or got[0] != kind:
            problems.append(f"rgnn.{name}: expected one auto{kind} directive, found {got}")
    toc = (docs / "notebooks.rst").read_text() if (docs / "notebooks.rst").exists() else ""
    for nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
        if f"notebooks/{nb.stem}\n" not in toc:
            problems.append(f"notebook {nb.name}: not in the toctree of docs/notebooks.rst")
    return problems


class _Entries(HTMLParser):
    """The object descriptions of one page: ``{id: (signature html, description text)}``."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.entries: dict[str, list] = {}
        self._stack: list[tuple[str, str | None]] = []  # (tag, id of the entry it belongs to)
        self._dt: str | None = None
        self._dd_for: list[str | None] = []
        self._last_dt: str | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "dt" and "sig-object" in (a.get("class") or "") and a.get("id"):
            self._dt = a["id"]
            self.entries[self._dt] = ["", ""]
        elif tag == "dd":
            self._dd_for.append(self._last_dt)
            self._last_dt = None
        if self._dt is not None:
            cls = a.get("class") or ""
            self.entries[self._dt][0] += f"<{tag} class='{cls}'>"

    def handle_endtag(self, tag):
        if tag == "dt" and self._dt is not None:
            self._last_dt, self._dt = self._dt, None
        elif tag == "dd" and self._dd_for:
            self._dd_for.pop()

    def handle_data(self, data):
        if self._dt is not None:
            self.entries[self._dt][0] += data
        for owner in self._dd_for:
            if owner is not None:
                self.entries[owner][1] += data


def check_site(site: Path) -> list[str]:
    """Problems with the built HTML site ``site``."""
    rgnn, kinds = _public()
    pages = {p: p.read_text() for p in site.rglob("*.html")}
    entries, modules = {}, set()
    for text in pages.values():
        parser = _Entries()
        parser.feed(text)
        entries.update(parser.entries)
        modules.update(re.findall(r'id="module-(rgnn[\w.]*)"', text))
    problems = []

    def entry(full, kind, obj):
        if full not in entries:
            problems.append(f"{full}: no entry on the site")
            return
        sig, desc = entries[full]
        if kind in ("function", "class") and "sig-paren" not in sig:
            problems.append(f"{full}: no signature")
        if len(" ".join(desc.split())) < 20:
            problems.append(f"{full}: no description")
        doc = inspect.getdoc(obj) if kind != "data" else ""
        for section, field in (("Args:", "Parameters"), ("Returns:", "Returns")):
            if doc and re.search(rf"^{section}\s*$", doc, re.M) and field not in desc:
                problems.append(f"{full}: its {section} section is not rendered as {field}")

    for name, kind in kinds.items():
        obj = getattr(rgnn, name)
        if kind == "module":
            if f"rgnn.{name}" not in modules:
                problems.append(f"rgnn.{name}: no module entry on the site")
            for member in getattr(obj, "__all__", []):
                sub = getattr(obj, member)
                sub_kind = (
                    "class" if inspect.isclass(sub) else "function" if callable(sub) else "data"
                )
                entry(f"rgnn.{name}.{member}", sub_kind, sub)
        else:
            entry(f"rgnn.{name}", kind, obj)
    for path, text in pages.items():
        if 'class="math' in text and not re.search(r'<script[^>]+src="[^"]*mathjax', text, re.I):
            problems.append(f"{path}: has formulas but does not load MathJax")
    if not any('class="math' in text for text in pages.values()):
        problems.append("no formula rendered anywhere on the site")
    for nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
        page = site / "notebooks" / f"{nb.stem}.html"
        code = sum(c["cell_type"] == "code" for c in json.loads(nb.read_text())["cells"])
        if page not in pages:
            problems.append(f"notebook {nb.name}: no page {page}")
        elif pages[page].count('class="cell docutils container"') != code:
            problems.append(f"notebook {nb.name}: its {code} code cells are not all on its page")
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", type=Path, help="the built HTML site, or the docs sources")
    parser.add_argument("--sources", action="store_true", help="check the sources only")
    args = parser.parse_args(argv)
    if not args.path.is_dir():
        print(f"check_docs: {args.path}: not a directory", file=sys.stderr)
        return 2
    problems = check_sources(args.path) if args.sources else check_site(args.path)
    for p in problems:
        print(p, file=sys.stderr)
    what = "sources" if args.sources else "site"
    if problems:
        print(f"check_docs: {len(problems)} problem(s) in the {what}", file=sys.stderr)
        return 1
    print(f"check_docs: every public name of rgnn is documented in the {what}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
