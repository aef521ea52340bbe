"""The reference site's sources name every public name (the build itself runs in CI:
``sphinx-build -W`` then ``tools/check_docs.py`` on the built site)."""

import importlib.util
from pathlib import Path

import rgnn

ROOT = Path(__file__).resolve().parents[1]


def _checker():
    spec = importlib.util.spec_from_file_location("check_docs", ROOT / "tools" / "check_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_public_name_has_one_autodoc_directive():
    assert _checker().check_sources(ROOT / "docs") == []


def test_site_check_reports_every_missing_name(tmp_path):
    (tmp_path / "index.html").write_text("<html><body><p>nothing here</p></body></html>")
    problems = _checker().check_site(tmp_path)
    for name in rgnn.__all__:
        assert any(p.startswith(f"rgnn.{name}:") for p in problems), name
    assert "no formula rendered anywhere on the site" in problems
