"""Every notebook in ``notebooks/`` runs top to bottom, and none is stored with outputs.

Each notebook is executed with nbclient in a fresh kernel, with ``RGNN_NOTEBOOK_SMALL=1`` (each
notebook reads it in its first code cell and chooses small settings), ``MPLBACKEND=Agg`` (no
figure window) and XLA's lowest optimization level (compiling dominates these small runs), in a
temporary working directory, so that nothing a notebook writes lands in the
repository. A cell that raises fails the test. The kernel is ``python3``: ipykernel's native
kernel, which jupyter_client launches with the interpreter running the tests (``sys.executable``),
so it needs no kernel spec installed under ``HOME``.
"""

import json
import os
import pathlib
import subprocess
import sys

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT_S = 600


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
    """Execute every cell; nbclient raises ``CellExecutionError`` on the first cell that fails."""
    monkeypatch.setenv("RGNN_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    # The small runs spend most of their time compiling tiny XLA programs, not running them;
    # the lowest backend optimization level roughly halves that (results change at most in
    # rounding, e.g. fused multiply-adds).
    flags = os.environ.get("XLA_FLAGS", "")
    monkeypatch.setenv("XLA_FLAGS", f"{flags} --xla_backend_optimization_level=0".strip())
    # the checkout's rgnn in the kernel too, installed or not
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    )
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()
    assert any(c.cell_type == "code" for c in nb.cells), f"{path.name} has no code cells"


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
