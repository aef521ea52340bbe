"""The command line and the figures: outputs written, errors on one line."""

import json

import pytest

from rgnn import plotting
from rgnn.cli import main


def test_fixed_point_writes_table_plot_and_json(tmp_path, capsys):
    rc = main(["fixed-point", "--depth", "2", "--n", "20", "--out", str(tmp_path), "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["layer"] for r in out["layers"]] == [1, 2, 3]
    # relu at criticality (the default): the diagonal of the kernel is the same on every layer
    assert len({round(r["nngp_diag"], 10) for r in out["layers"]}) == 1
    assert (tmp_path / "fixed_point.png").stat().st_size > 10_000
    assert json.loads((tmp_path / "fixed_point.json").read_text()) == out


def test_bad_argument_is_one_line_and_nonzero(tmp_path, capsys):
    rc = main(["fixed-point", "--activation", "nope", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "activation: unknown name 'nope'" in err[0]
    with pytest.raises(SystemExit) as exit_info:
        main(["fixed-point", "--depth", "0"])
    assert exit_info.value.code == 2


def test_coupling_plot(tmp_path):
    path = plotting.plot_couplings(tmp_path / "c.png", activations=("relu", "tanh"), depth=3)
    assert path.stat().st_size > 10_000
