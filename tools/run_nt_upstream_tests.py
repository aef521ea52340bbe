"""Run neural-tangents' own test suite against ``rgnn._compat`` on the installed JAX.

The upstream tests are the measure of the compatibility layer. Extract them from the
neural-tangents repository at tag ``v0.6.5`` (the version ``rgnn._compat`` supports) into a
scratch folder outside this repository, for example::

    git --git-dir=<neural-tangents.git> archive v0.6.5 tests | tar -x -C "$SCRATCH"/nt_upstream

then run::

    python tools/run_nt_upstream_tests.py "$SCRATCH"/nt_upstream/tests -- -q stax/linear_test.py

(``-n`` needs pytest-xdist.) With ``--legacy-prng`` the tests see the random stream they were
written for: since JAX 0.5 ``jax_threefry_partitionable`` defaults to true, so, for example,
``random.normal(key, (8, d))[:2]`` equals ``random.normal(key, (2, d))``, which makes two
upstream batching tests' "different" inputs identical.

Everything after ``--`` goes to pytest; test paths there are relative to the tests folder.

The script copies the tests folder to a temporary directory (the original is never modified),
applies ``TEST_REWRITES`` to the copy, writes a ``conftest.py`` that calls
``rgnn._compat.install()`` (so that pytest-xdist workers get the hook too) and an empty
``pytest.ini`` (so that rgnn's own pytest settings do not apply), and runs pytest there.

``TEST_REWRITES`` fix the upstream *test* code only, for JAX names it uses that JAX removed;
they are not part of ``rgnn._compat``:

==============================  =====================================  =================
file                            rewrite                                why
==============================  =====================================  =================
test_utils.py, predict_test.py  ``jax.tree_map(`` -> ``jax.tree.map(``  ``jax.tree_map``
                                                                       was removed
empirical_test.py               ``from jax import tree_map`` ->        same
                                ``from jax.tree_util import tree_map``
==============================  =====================================  =================
"""

import argparse
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent

# (file relative to the tests folder, old text, new text)
TEST_REWRITES: tuple[tuple[str, str, str], ...] = (
    ("test_utils.py", "jax.tree_map(", "jax.tree.map("),
    ("predict_test.py", "jax.tree_map(", "jax.tree.map("),
    ("empirical_test.py", "from jax import tree_map\n", "from jax.tree_util import tree_map\n"),
)

_CONFTEST = """\
# Written by rgnn's tools/run_nt_upstream_tests.py: install the compatibility hook first.
import rgnn._compat

rgnn._compat.install()
"""


def _prepare(tests_dir: pathlib.Path, scratch: pathlib.Path) -> pathlib.Path:
    """Copies ``tests_dir`` to ``scratch/tests``, applies ``TEST_REWRITES``; returns the copy."""
    if not (tests_dir / "test_utils.py").is_file():
        raise SystemExit(f"{tests_dir} does not look like neural-tangents' tests folder")
    copy = scratch / "tests"
    shutil.copytree(tests_dir, copy, ignore=shutil.ignore_patterns("__pycache__"))
    for name, old, new in TEST_REWRITES:
        path = copy / name
        text = path.read_text()
        if old not in text:
            raise SystemExit(f"test rewrite {old!r} not found in {name}; wrong upstream version?")
        path.write_text(text.replace(old, new))
    (scratch / "conftest.py").write_text(_CONFTEST)
    (scratch / "pytest.ini").write_text("[pytest]\n")
    return copy


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tests_dir", type=pathlib.Path, help="upstream neural-tangents tests/")
    parser.add_argument(
        "--legacy-prng",
        action="store_true",
        help="set JAX_THREEFRY_PARTITIONABLE=false, the random-bit stream the upstream tests "
        "were written for (some use the same key for inputs of different sizes, or Monte "
        "Carlo tolerances tuned to one stream)",
    )
    parser.add_argument("pytest_args", nargs="*", help="arguments for pytest (after --)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="nt_upstream_") as tmp:
        scratch = pathlib.Path(tmp)
        copy = _prepare(args.tests_dir.resolve(), scratch)
        env = dict(os.environ)
        if args.legacy_prng:
            env["JAX_THREEFRY_PARTITIONABLE"] = "false"
        env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO_ROOT), str(scratch), *filter(None, [env.get("PYTHONPATH")])]
        )
        command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--rootdir", tmp]
        pytest_args = [
            str(copy / a) if (copy / a.split("::")[0]).exists() else a for a in args.pytest_args
        ]
        return subprocess.call(command + (pytest_args or [str(copy)]), cwd=tmp, env=env)


if __name__ == "__main__":
    sys.exit(main())
