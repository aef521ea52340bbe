"""Every notebook in ``notebooks/`` runs top to bottom, and none is stored with outputs.

Each notebook is executed with nbclient in a fresh kernel whose environment has
``RGNN_NOTEBOOK_SMALL=1`` (each notebook reads it in its first code cell and chooses small
settings), ``MPLBACKEND=Agg`` (no figure window) and XLA's lowest optimization level (compiling,
not computing, dominates these small runs), in a temporary working directory, so that nothing a
notebook writes lands in the repository. A cell that raises fails the test. The kernel is
``python3``: ipykernel's native kernel, which jupyter_client launches with the interpreter
running the tests (``sys.executable``), so it needs no kernel spec installed under ``HOME``.

Executing them is in the slow tier (``pytest -m slow``, run by CI after the README's test
command): together they cost about as much CPU as the rest of the suite's largest file. The
checks that they are stored without outputs run in the default tier.

The selected notebooks are started together, as many at a time as there are CPU cores (each
kernel spends most of its time in single-threaded XLA compilation), and each test waits for its
own notebook.
"""

import asyncio
import json
import os
import pathlib
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT_S = 600


def _kernel_env() -> dict:
    env = dict(os.environ)
    env["RGNN_NOTEBOOK_SMALL"] = "1"
    env["MPLBACKEND"] = "Agg"
    # The lowest backend optimization level roughly halves the time spent compiling the many
    # small XLA programs; results change at most in rounding (e.g. fused multiply-adds).
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()
    # the checkout's rgnn in the kernel too, installed or not
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def _execute(path: pathlib.Path, workdir: pathlib.Path) -> None:
    """Run every cell; nbclient raises ``CellExecutionError`` on the first cell that fails."""
    nb = nbformat.read(path, as_version=4)
    if not any(c.cell_type == "code" for c in nb.cells):
        raise AssertionError(f"{path.name} has no code cells")
    client = NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(workdir)}},
    )
    # a fresh event loop for this worker thread, closed when the notebook is done
    asyncio.run(client.async_execute(env=_kernel_env()))


@pytest.fixture(scope="module")
def notebook_runs(request, tmp_path_factory):
    """``{path: Future}`` for every notebook selected in this session, all submitted at once."""
    selected = [
        item.callspec.params["path"]
        for item in request.session.items
        if getattr(item, "originalname", None) == "test_notebook_runs"
    ]
    workers = max(1, min(len(selected), os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        yield {p: pool.submit(_execute, p, tmp_path_factory.mktemp(p.stem)) for p in selected}


@pytest.mark.slow  # a documentation check, in the slow tier (tests/tiers.py), which CI runs
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, notebook_runs):
    """The notebook runs top to bottom with small settings."""
    notebook_runs[path].result()


def _committed_notebooks():
    """``{name: json text}`` of the notebooks as staged in git (the version a commit stores);
    the files on disk when this is not a git checkout."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--", "notebooks/*.ipynb"],
            cwd=ROOT,
            capture_output=True,
            check=True,
            text=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return {p.name: p.read_text() for p in NOTEBOOKS}
    out = {}
    for rel in filter(None, listed.split("\0")):
        out[rel] = subprocess.run(
            ["git", "show", f":{rel}"], cwd=ROOT, capture_output=True, check=True, text=True
        ).stdout
    return out


def test_notebooks_stored_without_outputs():
    """Outputs are cleared in the repository: no outputs, no execution counts."""
    stored = _committed_notebooks()
    for name, text in stored.items():
        nb = json.loads(text)
        for i, cell in enumerate(nb["cells"]):
            if cell["cell_type"] != "code":
                continue
            assert cell.get("outputs") == [], f"{name} cell {i} has stored outputs"
            assert cell.get("execution_count") is None, f"{name} cell {i} has an execution count"


def test_kernel_is_this_interpreter(tmp_path, monkeypatch):
    """The ``python3`` kernel launches the interpreter running the tests, also with an empty
    HOME (as on CI): ipykernel's native kernel spec needs nothing installed there."""
    from jupyter_client import KernelManager

    monkeypatch.setenv("HOME", str(tmp_path))
    cmd = KernelManager(kernel_name="python3").format_kernel_cmd()
    assert cmd[0] == sys.executable, cmd
