"""Width sweeps: the scaling fit against independent references, the resumable store (Ctrl-C,
kill -9, a different sweep refused), the outputs, and the progress reporter."""

import importlib
import io
import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import rgnn
import rgnn.study as study
from rgnn.progress import Progress, format_seconds
from tests.tolerances import EXACT, MC_SIGMAS, tol

fit_scaling = study.fit_scaling

F64 = tol(EXACT, np.float64)


# ----------------------------------------------------------------------------- layout
def test_the_sweep_function_shadows_no_module_and_carries_its_measures():
    """``rgnn.sweep`` is the function, ``rgnn.study`` the module holding it (a public name
    never shadows a module), and ``rgnn.sweep.MEASURES`` (as the README writes it) is the
    module's table of measures."""
    assert callable(rgnn.sweep) and rgnn.sweep is study.sweep
    assert rgnn.study is study and importlib.import_module("rgnn.study") is study
    assert rgnn.sweep.MEASURES is study.MEASURES
    readme = (
        "ntk_movement", "function_gap", "ntk_distance", "nngp_distance", "kurtosis",
        "ntk_fluctuation", "mean_ntk_movement",
    )  # fmt: skip
    assert tuple(rgnn.sweep.MEASURES) == readme
    assert all(isinstance(m, study.Measure) for m in rgnn.sweep.MEASURES.values())


# ----------------------------------------------------------------------------- fits
def test_fit_is_exact_on_a_power_law_and_extrapolates_the_intercept():
    n = np.array([16.0, 32, 64, 128, 256])
    fit = fit_scaling(n, 3.0 * n**-1.0, 0.01 * 3.0 * n**-1.0)
    np.testing.assert_allclose([fit.exponent, fit.prefactor], [-1.0, 3.0], **F64)
    assert abs(fit.infinite_width) < 1e-12
    # v = 0.2 + 5/sqrt(n): the 1/sqrt(n) extrapolation recovers 0.2 exactly
    v = 0.2 + 5 * n**-0.5
    fit = fit_scaling(n, v, 0.01 * v, expected=-0.5)
    np.testing.assert_allclose(fit.infinite_width, 0.2, **F64)


def test_fit_matches_numpy_polyfit():
    """The weighted slope, its unscaled standard error, and (unweighted) the residual-scaled
    one, against numpy.polyfit (weights 1/sigma on the residuals)."""
    rng = np.random.RandomState(0)
    n = np.array([32.0, 64, 128, 256, 512, 1024])
    v = 2.0 * n**-0.9 * np.exp(0.05 * rng.randn(6))
    se = 0.05 * v * (1 + rng.rand(6))
    fit = fit_scaling(n, v, se)
    coef, cov = np.polyfit(np.log(n), np.log(v), 1, w=v / se, cov="unscaled")
    scale = max(1.0, fit.chi2_dof)
    np.testing.assert_allclose(fit.exponent, coef[0], **F64)
    np.testing.assert_allclose(fit.exponent_se, np.sqrt(cov[0, 0] * scale), **F64)
    unweighted = fit_scaling(n, v)
    coef, cov = np.polyfit(np.log(n), np.log(v), 1, cov=True)
    np.testing.assert_allclose(unweighted.exponent, coef[0], **F64)
    np.testing.assert_allclose(unweighted.exponent_se, np.sqrt(cov[0, 0]), **F64)


def test_exponent_error_is_calibrated():
    """Over 2000 synthetic sweeps with known errors, ``p +- 1.96 se`` before the Birge scale
    factor covers the true exponent 95% of the time (within MC_SIGMAS binomial standard
    errors); the scale factor only widens the reported interval."""
    rng = np.random.RandomState(1)
    n = np.array([32.0, 64, 128, 256])
    trials, hits, wider = 2000, 0, 0
    for _ in range(trials):
        se = 0.1 * 2.0 / n
        v = 2.0 / n + se * rng.randn(4)
        fit = fit_scaling(n, v, se)
        unscaled = fit.exponent_se / np.sqrt(max(1.0, fit.chi2_dof))
        hits += abs(fit.exponent + 1.0) <= 1.959963984540054 * unscaled
        wider += fit.exponent_low <= -1.0 <= fit.exponent_high
    binom_se = np.sqrt(0.95 * 0.05 / trials)
    assert abs(hits / trials - 0.95) < MC_SIGMAS * binom_se, hits / trials
    assert wider >= hits


def test_pooled_seeds():
    mean, se = study.pool_seeds([1.0, 2.0, 3.0], [0.01, 0.01, 0.01])
    assert mean == 2.0 and np.isclose(se, 1 / np.sqrt(3))
    _, se = study.pool_seeds([1.0, 1.0], [0.3, 0.4])  # agreeing seeds: propagated error
    np.testing.assert_allclose(se, 0.25, **F64)


def test_fit_bad_input():
    with pytest.raises(ValueError, match="widths: expected at least 2 distinct"):
        fit_scaling([8, 8], [1.0, 2.0])
    with pytest.raises(ValueError, match="expected: expected a negative exponent"):
        fit_scaling([8, 16], [1.0, 2.0], expected=1.0)


# ----------------------------------------------------------------------------- the store
class Fake:
    """A cheap point: ``a = 3/n``, ``b = 0.4``, with small seeded noise; counts its calls and
    can interrupt itself at a chosen call."""

    def __init__(self, interrupt_at=None):
        self.calls = []
        self.interrupt_at = interrupt_at

    def __call__(self, arch, x, y, *, seed, settings):
        self.calls.append((arch.width, seed))
        if len(self.calls) == self.interrupt_at:
            raise KeyboardInterrupt
        rng = np.random.RandomState(seed * 1000 + arch.width)
        a = 3.0 / arch.width * (1 + 0.05 * rng.randn())
        b = 0.4 * (1 + 0.05 * rng.randn())
        return dict(
            measures=dict(
                a=dict(value=a, se=0.05 * a, predicted=None),
                b=dict(value=b, se=0.02, predicted=None),
            ),
            couplings=[0.0] * arch.n_layers,
        )


def _task():
    x, labels = rgnn.data.digits(12)
    return x, np.where(labels % 2 == 0, 1.0, -1.0)


SWEEP = dict(widths=[16, 32, 64], seeds=[0, 1], plots=False)


def test_resume_skips_finished_points_and_refuses_another_sweep(tmp_path):
    x, y = _task()
    arch = rgnn.MLP(1, 8)
    first = Fake(interrupt_at=4)
    with pytest.raises(KeyboardInterrupt):
        rgnn.sweep(arch, x, y, out=tmp_path, point=first, **SWEEP)
    saved = (tmp_path / "points.jsonl").read_text().splitlines()
    assert len(saved) == 3  # the three points before the interrupted one
    second = Fake()
    result = rgnn.sweep(arch, x, y, out=tmp_path, point=second, **SWEEP)
    assert second.calls == first.calls[3:] + [(64, 0), (64, 1)]
    assert len(result.records) == 6 and [r["point"]["width"] for r in result.records] == [
        16, 16, 32, 32, 64, 64,
    ]  # fmt: skip
    third = Fake()
    again = rgnn.sweep(arch, x, y, out=tmp_path, point=third, **SWEEP)
    assert third.calls == [] and again.records == result.records
    assert [f.exponent for f in again.fits] == [f.exponent for f in result.fits]
    # another identity (data, training settings, base variances) is refused, naming what
    # differs, and leaves the folder as it was
    before = {p.name: p.read_text() for p in tmp_path.iterdir()}
    with pytest.raises(ValueError, match=r"holds a different sweep \(data\.hash: '"):
        rgnn.sweep(arch, x, -y, out=tmp_path, point=Fake(), **SWEEP)  # other data
    with pytest.raises(ValueError, match=r"settings\.n_networks: 8 -> 4; settings\.steps: 100"):
        rgnn.sweep(arch, x, y, out=tmp_path, point=Fake(), steps=50, n_networks=4, **SWEEP)
    with pytest.raises(ValueError, match=r"base\.weight_var: 1\.0 -> 2\.0"):
        rgnn.sweep(rgnn.MLP(1, 8, weight_var=2.0), x, y, out=tmp_path, point=Fake(), **SWEEP)
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == before


def test_a_sweep_extends_with_more_widths_and_seeds(tmp_path):
    """More widths or seeds in the same folder: only the new points are computed, the folder
    then holds the union, and a sub-grid recomputes nothing."""
    x, y = _task()
    arch = rgnn.MLP(1, 8)
    rgnn.sweep(arch, x, y, out=tmp_path, point=Fake(), **SWEEP)
    more = Fake()
    grown = rgnn.sweep(arch, x, y, out=tmp_path, point=more, **dict(SWEEP, widths=[16, 128]))
    assert more.calls == [(128, 0), (128, 1)]
    assert [r["point"]["width"] for r in grown.records] == [16, 16, 32, 32, 64, 64, 128, 128]
    seeds = Fake()
    grown = rgnn.sweep(arch, x, y, out=tmp_path, point=seeds, **dict(SWEEP, seeds=[2]))
    assert seeds.calls == [(16, 2), (32, 2), (64, 2)] and len(grown.records) == 11
    config = json.loads((tmp_path / "sweep.json").read_text())["config"]
    assert config["widths"] == [16, 32, 64, 128] and config["seeds"] == [0, 1, 2]
    none = Fake()
    again = rgnn.sweep(arch, x, y, out=tmp_path, point=none, **dict(SWEEP, widths=[32, 64]))
    assert none.calls == [] and again.records == study.load_sweep(tmp_path).records
    assert [r["n_seeds"] for r in again.table()] == [3, 3, 3, 2]


def test_nothing_is_written_before_the_arguments_are_checked(tmp_path):
    """A bad argument writes nothing (the issue: `--optimizer adamw` wrote sweep.json, and
    the corrected command was then refused); a point that fails before any has finished
    leaves no sweep.json either."""
    x, y = _task()
    arch = rgnn.MLP(1, 8)
    out = tmp_path / "s"
    for kw, msg in [
        (dict(optimizer="adamw"), "optimizer: expected one of"),
        (dict(loss="hinge"), "loss: expected one of"),
        (dict(loss="cross_entropy"), "loss: 'cross_entropy' expects integer class labels"),
    ]:
        with pytest.raises(ValueError, match=msg):
            rgnn.sweep(arch, x, y, out=out, point=Fake(), **SWEEP, **kw)
        assert not out.exists()

    def broken(*args, **kwargs):
        raise ValueError("learning_rate: training diverged")

    with pytest.raises(ValueError, match="diverged"):
        rgnn.sweep(arch, x, y, out=out, point=broken, **SWEEP)
    assert not out.exists()
    rgnn.sweep(arch, x, y, out=out, point=Fake(), **SWEEP)  # the corrected call runs
    assert (out / "sweep.json").exists()


def test_json_outputs_are_strict(tmp_path):
    """NaN (a measure without a standard error, a fit that failed) is written as null; a
    measure without any value is plotted as an empty panel (no warning)."""

    def point(arch, x, y, *, seed, settings):
        a = dict(value=1.0 / arch.width, se=float("nan"), predicted=None)
        return dict(measures=dict(a=a, b=dict(value=None, se=None, predicted=None)))

    x, y = _task()
    rgnn.sweep(rgnn.MLP(1, 8), x, y, out=tmp_path, point=point, widths=[16, 32], seeds=[0])
    for name in ("sweep.json", "table.json", "points.jsonl"):
        text = (tmp_path / name).read_text()
        assert "NaN" not in text and "Infinity" not in text
        for line in text.splitlines() if name.endswith("l") else [text]:
            json.loads(line, parse_constant=pytest.fail)
    assert json.loads((tmp_path / "table.json").read_text())["rows"][0]["a_se"] is None
    assert study.strict_json({"x": np.nan, "y": [np.inf, np.float32(1.5)]}) == (
        '{"x": null, "y": [null, 1.5]}'
    )


def test_table_fits_and_outputs(tmp_path):
    x, y = _task()
    result = rgnn.sweep(rgnn.MLP(1, 8), x, y, out=tmp_path, point=Fake(), **SWEEP)
    rows = result.table()
    assert [r["width"] for r in rows] == [16, 32, 64] and all(r["n_seeds"] == 2 for r in rows)
    fits = result.fits_of(result.groups[0])
    assert abs(fits["a"].exponent + 1) < 4 * fits["a"].exponent_se + 0.1
    table = json.loads((tmp_path / "table.json").read_text())
    assert table["rows"] == json.loads(json.dumps(rows))
    assert {f["measure"] for f in table["fits"]} == {"a", "b"}
    csv = (tmp_path / "table.csv").read_text().splitlines()
    assert csv[0].startswith("depth,activation,parameterization,learning_rate,width,n_seeds")
    assert len(csv) == 4
    loaded = study.load_sweep(tmp_path)
    assert loaded.records == result.records
    # what the plot titles carry
    assert result.description == (
        "depth 1, relu, ntk parameterization, learning rate 0.1, 100 steps gd, 8 networks x "
        "2 seed(s); C_W=1, C_b=0"
    )


_KILLED = textwrap.dedent(
    """
    import os, signal, sys
    import numpy as np
    import rgnn

    calls = []

    def point(arch, x, y, *, seed, settings):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGKILL)
        return dict(measures=dict(a=dict(value=1.0 / arch.width, se=0.01, predicted=None)))

    x, labels = rgnn.data.digits(12)
    y = np.where(labels % 2 == 0, 1.0, -1.0)
    rgnn.sweep(rgnn.MLP(1, 8), x, y, widths=[16, 32, 64], seeds=[0, 1], plots=False,
               out=sys.argv[1], point=point)
    """
)


def test_kill_9_loses_only_the_point_in_flight(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", _KILLED, str(tmp_path)], capture_output=True, timeout=120
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    lines = (tmp_path / "points.jsonl").read_text().splitlines()
    assert len(lines) == 2 and all(json.loads(line)["measures"] for line in lines)
    x, y = _task()
    fake = Fake()
    result = rgnn.sweep(rgnn.MLP(1, 8), x, y, out=tmp_path, point=fake, **SWEEP)
    assert fake.calls == [(32, 0), (32, 1), (64, 0), (64, 1)]
    assert len(result.records) == 6


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "points.jsonl"
    study._atomic_write(path, "old\n")

    def broken(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError):
        study._atomic_write(path, "new\n")
    assert path.read_text() == "old\n"


def test_sweep_bad_input(tmp_path):
    x, y = _task()
    arch = rgnn.MLP(1, 8)
    cases = [
        (dict(widths=[16]), "widths: expected at least 2 widths"),
        (dict(widths=[16, 0]), "widths: expected positive values"),
        (dict(widths=[16, 16]), "widths: expected distinct values"),
        (dict(widths=[16, 32], activations=["nope"]), "activation: unknown name"),
        (dict(widths=[16, 32], parameterizations=["ntk2"]), "parameterizations: expected"),
        (dict(widths=[16, 32], learning_rates=[-1.0]), "learning_rates: expected positive"),
        (dict(widths=[16, 32], n_networks=0), "n_networks: expected a positive integer"),
    ]
    for kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            rgnn.sweep(arch, x, y, point=Fake(), **kw)
    with pytest.raises(ValueError, match=r"y: expected \[12, out_dim\]"):
        rgnn.sweep(arch, x, y[:5], widths=[16, 32], point=Fake())
    (tmp_path / "f").write_text("")
    with pytest.raises(ValueError, match="out: expected a directory"):
        rgnn.sweep(arch, x, y, widths=[16, 32], out=tmp_path / "f", point=Fake())


# ----------------------------------------------------------------------------- progress
class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_progress_lines_and_bar():
    clock, log = Clock(), io.StringIO()
    p = Progress(4, label="sweep", stream=log, tty=False, clock=clock)
    p.skip(1, "width=8")
    clock.t = 10.0
    p.advance(10.0, "width=16")
    assert log.getvalue().splitlines() == [
        "sweep: 1/4 done (1 already done (width=8)); elapsed 0:00, ETA ?",
        "sweep: 2/4 done (width=16) in 10.0 s; elapsed 0:10, ETA 0:20",
    ]
    term = io.StringIO()
    bar = Progress(4, label="sweep", stream=term, tty=True, width=8, clock=clock)
    bar.advance(30.0)
    bar.close()
    assert term.getvalue().startswith("\rsweep [##......] 1/4  elapsed") and "ETA 1:30" in (
        term.getvalue()
    )
    assert format_seconds(3725) == "1:02:05" and format_seconds(float("inf")) == "?"
