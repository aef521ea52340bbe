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


# ----------------------------------------------------------------------------- sweep, classify
def _fake_point(interrupt_at=None):
    """A stand-in for training and comparing: ``a = 2/n`` with seeded noise."""
    import numpy as np

    calls = []

    def point(arch, x, y, *, seed, settings):
        calls.append(arch.width)
        if len(calls) == interrupt_at:
            raise KeyboardInterrupt
        rng = np.random.RandomState(seed + arch.width)
        a = 2.0 / arch.width * (1 + 0.03 * rng.randn())
        return dict(measures=dict(a=dict(value=a, se=0.03 * a, predicted=None)))

    point.calls = calls
    return point


SWEEP_ARGS = ["sweep", "--widths", "8,16,64", "--seeds", "0,1", "--n", "10", "--no-plots"]


def test_sweep_json_then_classify_reads_the_saved_sweep(tmp_path, capsys, monkeypatch):
    import importlib

    monkeypatch.setattr(importlib.import_module("rgnn.study"), "_adapter", _fake_point())
    rc = main([*SWEEP_ARGS, "--out", str(tmp_path), "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["width"] for r in out["rows"]] == [8, 16, 64]
    (fit,) = out["fits"]
    assert fit["measure"] == "a" and abs(fit["exponent"] + 1) < 0.2
    (regime,) = out["regimes"]
    assert regime["label"] == "gaussian"  # 2/64 < 0.05 at the widest width
    assert json.loads((tmp_path / "regime.json").read_text()) == out["regimes"]
    rc = main(["classify", "--out", str(tmp_path), "--json", "--tolerance", "0.01"])
    assert rc == 0
    (strict,) = json.loads(capsys.readouterr().out)
    # held to 1%, a = 2/n is above it but falls as 1/n towards 0: perturbative
    assert strict["label"] == "perturbative"
    assert strict["evidence"][0]["threshold"] == 0.01
    rc = main(["classify", "--out", str(tmp_path)])
    text = capsys.readouterr().out
    assert rc == 0 and text.startswith("regime: GAUSSIAN") and "exponent" in text


def test_sweep_ctrl_c_saves_finished_points_and_exits_130(tmp_path, capsys, monkeypatch):
    import importlib

    fake = _fake_point(interrupt_at=3)
    monkeypatch.setattr(importlib.import_module("rgnn.study"), "_adapter", fake)
    rc = main([*SWEEP_ARGS, "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 130 and "2 finished point(s) saved" in err
    assert len((tmp_path / "points.jsonl").read_text().splitlines()) == 2
    resumed = _fake_point()
    monkeypatch.setattr(importlib.import_module("rgnn.study"), "_adapter", resumed)
    assert main([*SWEEP_ARGS, "--out", str(tmp_path)]) == 0
    assert resumed.calls == [16, 16, 64, 64]


def test_sweep_and_classify_bad_arguments_are_one_line(tmp_path, capsys):
    cases = [
        (["sweep", "--widths", "8,x"], "argument --widths: expected an integer, got 'x'"),
        (["sweep", "--widths", "8", "--out", str(tmp_path)], "widths: expected at least 2"),
        (["sweep", "--activation", "nope", "--out", str(tmp_path)], "activation: unknown name"),
        (["classify", "--out", str(tmp_path / "none")], "holds no sweep"),
        (["classify", "--tolerance", "-1", "--out", str(tmp_path)], "tolerance: expected a"),
    ]
    for argv, message in cases:
        try:
            rc = main(argv)
        except SystemExit as exit_info:  # argparse's own errors
            rc = exit_info.code
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and message in err[0], (argv, err)


def test_help_for_sweep_and_classify_also_through_python_dash_m(capsys, monkeypatch):
    import runpy
    import sys

    # what `python -m rgnn sweep --help` runs: rgnn/__main__.py
    monkeypatch.setattr(sys, "argv", ["rgnn", "sweep", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("rgnn", run_name="__main__", alter_sys=True)
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and "--out" in out and "--json" in out
    with pytest.raises(SystemExit) as exit_info:
        main(["classify", "--help"])
    assert exit_info.value.code == 0 and "--tolerance" in capsys.readouterr().out


# ----------------------------------------------------------------------------- hygiene
def _rc(argv):
    try:
        return main(argv)
    except SystemExit as exit_info:  # argparse's own errors
        return exit_info.code


def test_out_naming_a_file_is_one_line_in_every_subcommand(tmp_path, capsys):
    path = tmp_path / "a-file"
    path.write_text("keep me\n")
    for argv in (
        ["fixed-point", "--depth", "1", "--n", "4"],
        ["sweep", "--widths", "8,16", "--n", "4"],
        ["classify"],
        ["classify", "--width", "8", "--n", "4"],
        ["wilsonian", "--n", "8", "--n-test", "8", "--no-networks"],
    ):
        rc = _rc([*argv, "--out", str(path)])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and "out: expected a directory" in err[0], (argv, err)
    assert path.read_text() == "keep me\n"
    for argv, message in (
        (["fixed-point", "--n", "100000"], "n: expected at most 1797 digits"),
        (["wilsonian", "--n", "1700", "--n-test", "300"], "n: expected at most 1797 digits"),
        (["wilsonian", "--n", "8", "--n-test", "8", "--n-scale", "400"], "n-scale: expected"),
    ):
        rc = _rc([*argv, "--out", str(tmp_path / "new")])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and message in err[0], (argv, err)
        assert not (tmp_path / "new").exists()


def test_a_typo_writes_nothing_and_the_corrected_sweep_runs(tmp_path, capsys, monkeypatch):
    import importlib

    fake = _fake_point()
    monkeypatch.setattr(importlib.import_module("rgnn.study"), "_adapter", fake)
    out = tmp_path / "s"
    for typo, message in (
        (["--optimizer", "adamw"], "optimizer: expected one of ('gd', 'sgd', 'adam')"),
        (["--loss", "cross_entropy"], "loss: 'cross_entropy' expects integer class labels"),
        (["--parameterization", "ntk2"], "parameterization"),
        (["--steps", "-1"], "steps: expected a non-negative integer"),
    ):
        rc = _rc([*SWEEP_ARGS, "--out", str(out), *typo])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and message in err[0], (typo, err)
        assert not out.exists() and fake.calls == []
    assert _rc([*SWEEP_ARGS, "--out", str(out)]) == 0
    # extended with a width and a seed: only the new points are computed
    assert _rc(["sweep", "--widths", "8,16,64,128", "--seeds", "0,1,2", "--n", "10",
                "--no-plots", "--out", str(out)]) == 0  # fmt: skip
    assert sorted(fake.calls[6:]) == [8, 16, 64, 128, 128, 128]
    text = capsys.readouterr().out
    assert "width sweep: 12 points" in text
    # a different training setting is refused, naming it
    rc = _rc([*SWEEP_ARGS, "--out", str(out), "--steps", "50"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "settings.steps: 200 -> 50" in err[0]


def test_json_is_strict_and_one_network_is_inconclusive(tmp_path, capsys, monkeypatch):
    """One network per point: no standard errors (null, never NaN) and the verdict
    ``inconclusive`` (the issue's `--n-networks 1 --widths 16,32`)."""
    import importlib

    def point(arch, x, y, *, seed, settings):
        a = 2.0 / arch.width
        return dict(measures=dict(a=dict(value=a, se=None, predicted=None)))

    monkeypatch.setattr(importlib.import_module("rgnn.study"), "_adapter", point)
    argv = ["sweep", "--widths", "16,32", "--n-networks", "1", "--n", "10", "--no-plots"]
    assert main([*argv, "--out", str(tmp_path), "--json"]) == 0
    text = capsys.readouterr().out
    assert "NaN" not in text
    doc = json.loads(text, parse_constant=lambda c: pytest.fail(c))
    assert doc["rows"][0]["a_se"] is None and doc["regimes"][0]["label"] == "inconclusive"
    for name in ("table.json", "regime.json", "sweep.json"):
        assert "NaN" not in (tmp_path / name).read_text()
    assert main([*argv, "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "+-?" in text and "regime: INCONCLUSIVE" in text
