"""Wilsonian coarse-graining: the running ridge, its closed form, and the scale-resolved
departure of trained networks from the fixed point."""

import contextlib
import io
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rgnn
from rgnn.cli import main
from tests.tolerances import EXACT, MC_SIGMAS, tol


def _split_digits(n_total=400, n_train=100, seed=0):
    x, labels = rgnn.data.digits(n_total, seed=seed)
    perm = np.random.RandomState(seed).permutation(n_total)  # digits come sorted by label
    x, labels = x[perm], labels[perm]
    return x, np.where(labels % 2 == 0, 1.0, -1.0)[:, None], n_train  # parity of the digit


def _split_teacher(n_total=400, n_train=100, seed=0):
    x, y = rgnn.data.teacher_student(n_total, 16, seed=seed)
    return x, y, n_train


@pytest.fixture(scope="module")
def digits_fp():
    with jax.enable_x64(True):
        x, y, n = _split_digits()
        return rgnn.fixed_point(rgnn.MLP(3, 512, "relu", weight_var=2.0), x), y, n


@pytest.fixture(scope="module")
def teacher_fp():
    with jax.enable_x64(True):
        x, y, n = _split_teacher()
        arch = rgnn.MLP(3, 512, "erf", weight_var=1.5, bias_var=0.05)
        return rgnn.fixed_point(arch, x), y, n


def test_flow_matches_numpy_and_no_cutoff_is_the_full_posterior(x64, digits_fp):
    fp, y, n = digits_fp
    ridge = 0.05
    w = rgnn.wilsonian_fixed_point(fp, y[:n], n_train=n, ridge=ridge, kernel="ntk", cutoffs=16)
    # independent NumPy reference: the full posterior mean and the Nystrom split at each cutoff
    k = np.asarray(fp.ntk[-1])
    p = k.shape[0]
    full = k[n:, :n] @ np.linalg.solve(k[:n, :n] + ridge * np.eye(n), y[:n])
    mu, psi = np.linalg.eigh(k)
    lam = np.maximum(mu, 0) / p  # ascending, as mu and psi
    t = tol(EXACT, jnp.float64)
    np.testing.assert_allclose(w.full_test, full, **t)
    np.testing.assert_allclose(w.eigenvalues, lam[::-1], **t)
    # rgnn keeps a mode when lambda_k >= cut - tie, tie = P eps lambda_1 (its docstring, Ties):
    # the default grid's first and last cutoffs sit on eigenvalues (the top one, the smallest
    # one), which the tie keeps. The split is compared only where it cannot rest on roundoff:
    # every eigenvalue lies farther from the boundary than the two eigensolvers differ (plus
    # the rounding of cut - tie), so both decompositions put each mode on the same side.
    eps = np.finfo(np.float64).eps
    tie = p * eps * lam[-1]
    solvers = np.max(np.abs(np.asarray(w.eigenvalues) - lam[::-1])) + 4 * eps * lam[-1]
    cutoffs = np.asarray(w.cutoffs)
    assert cutoffs[0] == w.eigenvalues[0] and int(w.n_modes[0]) == 1  # the top mode, kept
    assert int(w.n_modes[-2]) == p  # the smallest eigenvalue's cutoff keeps every mode
    for i, cut in enumerate(cutoffs):
        margin = np.min(np.abs(lam - (cut - tie)))
        assert margin > solvers, f"cutoff {i} ({cut}) is within roundoff of an eigenvalue"
        keep = lam >= cut - tie
        k_tt = (psi[:n, keep] * mu[keep]) @ psi[:n, keep].T
        k_st = (psi[n:, keep] * mu[keep]) @ psi[:n, keep].T
        shift = np.trace(k[:n, :n] - k_tt) / n
        eff = k_st @ np.linalg.solve(k_tt + (ridge + shift) * np.eye(n), y[:n])
        trunc = k_st @ np.linalg.solve(k_tt + ridge * np.eye(n), y[:n])
        assert int(w.n_modes[i]) == int(keep.sum()), i
        np.testing.assert_allclose(w.running_ridge[i], ridge + shift, **t)
        np.testing.assert_allclose(w.test[i], eff, rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(w.truncated_test[i], trunc, rtol=1e-8, atol=1e-10)
    # nothing integrated out (the last cutoff, 0): every variant is the full GP
    assert int(w.n_modes[-1]) == p
    for pred in (w.test[-1], w.truncated_test[-1], w.exact_test[-1]):
        np.testing.assert_allclose(pred, full, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(w.train[-1], w.full_train, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(w.running_ridge[-1], ridge, **t)


def test_a_cutoff_at_an_eigenvalue_keeps_its_mode(x64):
    """A cutoff on an eigenvalue keeps that mode whichever way the last bits fall: cutoffs a
    few ulps above and below each of the eight largest eigenvalues keep the same number of
    modes, 1 to 8 (the eigenvalues are farther apart than the tie, ``P eps lambda_1``, so the
    counts are exact). 1-D inputs: the RBF spectrum has no degenerate shells."""
    x = np.random.RandomState(0).randn(30, 1)
    k = np.asarray(rgnn.rbf_kernel(x))
    blocks = (k[:10, :10], k[10:, :10], x[:10, 0])

    def flow(cutoffs):
        return rgnn.wilsonian(*blocks, k_test=k[10:, 10:], ridge=0.1, cutoffs=cutoffs)

    lam = np.asarray(flow(np.zeros(8)).eigenvalues)
    eps = np.finfo(np.float64).eps
    assert np.all(-np.diff(lam[:9]) > 100 * 30 * eps * lam[0])
    for ulps in (-4, 4):
        w = flow(lam[:8] * (1 + ulps * eps))
        np.testing.assert_array_equal(w.n_modes, np.arange(1, 9))


@pytest.mark.parametrize("task", ["digits", "teacher_student"])
@pytest.mark.parametrize("kernel", ["nngp", "ntk"])
def test_effective_theory_approaches_full_posterior_and_beats_truncation(
    x64, task, kernel, digits_fp, teacher_fp
):
    """Measured claim (module docstring): below the IR scale the data set (``w.valid``), the
    running-ridge theory is closer to the full GP posterior mean than plain truncation at every
    cutoff, and closer than the effective theory at any cutoff above that scale that keeps
    fewer modes; at
    ``Lambda = 0`` it is the full posterior. Within the valid range the error is not monotone
    in the cutoff: it sits on the trace approximation's floor (a few percent here)."""
    fp, y, n = digits_fp if task == "digits" else teacher_fp
    w = rgnn.wilsonian_fixed_point(fp, y[:n], n_train=n, ridge=1e-2, kernel=kernel, cutoffs=16)
    eff, trunc = np.asarray(w.test_error()), np.asarray(w.test_error("truncated"))
    valid, modes = np.asarray(w.valid), np.asarray(w.n_modes)
    assert valid.sum() >= 3
    assert np.all(eff[valid] < trunc[valid])
    above = ~valid & (modes < modes[valid].min())  # above the IR scale, fewer modes kept
    assert above.sum() >= 3
    assert eff[valid].max() < eff[above].min()
    assert eff[-1] < 1e-10 and modes[-1] == len(w.eigenvalues)
    # the running ridge grows as modes are integrated out (cutoffs are descending)
    assert np.all(np.diff(np.asarray(w.running_ridge)) <= 1e-12)


def test_gaussian_case_running_ridge_matches_closed_form(x64):
    """Gaussian inputs and the RBF kernel: ``sigma^2(Lambda) = sigma^2 + sum_{lambda_j < Lambda}
    deg_j lambda_j`` (Rasmussen & Williams eq. 4.41). Cutoffs between the degree shells; the
    training draw is the Monte Carlo, its standard error measured over independent draws. The
    Nystrom estimate of the kept modes from P = 400 inputs is biased at O(kept / P), below
    the 4-SE band here (the test checks it)."""
    dim, ridge, n_train, n_total, draws = 2, 0.1, 100, 400, 8
    lam, deg = rgnn.rbf_spectrum(dim)
    # geometric midpoints between shells, then 0 (17 cutoffs: the same compiled flow as the
    # tests above); the comparison uses the first four shells, whose modes P resolves
    cutoffs = np.append(lam[1:17] / np.sqrt(lam[1] / lam[0]), 0.0)
    closed = rgnn.rbf_running_ridge(cutoffs[:4], ridge=ridge, dim=dim)
    kept = np.cumsum(deg)[:4]  # 1, 3, 6, 10 modes
    runs = []
    for seed in range(draws):
        x = np.random.RandomState(seed).randn(n_total, dim)
        k = rgnn.rbf_kernel(x)
        w = rgnn.wilsonian(
            k[:n_train, :n_train],
            k[n_train:, :n_train],
            x[:n_train, :1],
            k_test=k[n_train:, n_train:],
            ridge=ridge,
            cutoffs=cutoffs,
        )
        np.testing.assert_array_equal(w.n_modes[:4], kept)
        runs.append(np.asarray(w.running_ridge[:4]))
    runs = np.array(runs)
    se = runs.std(axis=0, ddof=1) / np.sqrt(draws)
    assert np.all(np.abs(runs.mean(0) - closed) <= MC_SIGMAS * se)
    # the closed form itself: the trace of the kernel is E k(x, x) = 1
    np.testing.assert_allclose(np.sum(lam * deg), 1.0, **tol(EXACT, jnp.float64))
    np.testing.assert_allclose(closed[0], ridge + 1.0 - lam[0], **tol(EXACT, jnp.float64))


def test_dtype_follows_input_and_jit():
    """float32 in, float32 out, under jit (the eager path is the same jitted core, checked in
    float64 above), against NumPy: a cutoff above the top eigenvalue keeps nothing (the whole
    kernel diagonal becomes noise), cutoff 0 keeps everything (the full GP)."""
    x = np.random.RandomState(0).randn(30, 2).astype(np.float32)
    k = np.asarray(rgnn.rbf_kernel(x))
    blocks = (k[:10, :10], k[10:, :10], k[10:, 10:])
    cutoffs = jnp.array([1.0, 0.0], jnp.float32)
    out = jax.jit(
        lambda a, b, c: rgnn.wilsonian(a, b, x[:10], k_test=c, ridge=0.1, cutoffs=cutoffs)
    )(*blocks)
    assert out.test.dtype == jnp.float32 and out.test.shape == (2, 20, 2)
    assert out.running_ridge.dtype == jnp.float32
    assert float(out.eigenvalues[0]) < 1 and list(np.asarray(out.n_modes)) == [0, 30]
    t = tol(EXACT, jnp.float32)
    np.testing.assert_allclose(out.test[0], 0.0, atol=t["atol"])
    np.testing.assert_allclose(out.running_ridge, [1.1, 0.1], **t)
    a = blocks[0].astype(np.float64) + 0.1 * np.eye(10)
    full = blocks[1] @ np.linalg.solve(a, x[:10])
    # float32 roundoff through the eigendecomposition of the P = 30 joint kernel and the solve:
    # the first-order bound  cond(K + sigma^2) * eps * P  relative to the largest prediction
    bound = np.linalg.cond(a) * np.finfo(np.float32).eps * 30 * np.abs(full).max()
    assert np.abs(np.asarray(out.test[1], np.float64) - full).max() <= bound


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(k_train=np.ones((3, 4))), "k_train: expected a square"),
        (dict(k_train=np.array([[1.0, 0.5], [0.0, 1.0]])), "k_train: expected a symmetric"),
        (dict(k_test_train=np.ones((3, 3))), r"k_test_train: expected a \[M, 2\]"),
        (dict(k_test=np.ones((2, 2))), r"k_test: expected a square \[3, 3\]"),
        (dict(y=np.ones(5)), r"y: expected \[2\]"),
        (dict(y=np.array([1.0, np.nan])), "y: expected finite"),
        (dict(ridge=0.0), "ridge: expected a finite number > 0"),
        (dict(ridge="a"), "ridge: expected a finite number > 0"),
        (dict(cutoffs=[-1.0]), "cutoffs: expected cutoffs >= 0"),
        (dict(cutoffs=0), "cutoffs: expected a count >= 1"),
        (dict(cutoffs=[]), "cutoffs: expected at least one"),
    ],
)
def test_bad_input(change, match):
    args = dict(
        k_train=np.eye(2),
        k_test_train=np.zeros((3, 2)),
        y=np.ones(2),
        k_test=np.eye(3),
        ridge=0.1,
        cutoffs=None,
    )
    args.update(change)
    with pytest.raises(ValueError, match=match):
        rgnn.wilsonian(
            args["k_train"],
            args["k_test_train"],
            args["y"],
            k_test=args["k_test"],
            ridge=args["ridge"],
            cutoffs=args["cutoffs"],
        )


def test_bad_input_fixed_point_and_scale_resolved(x64, digits_fp):
    fp, y, n = digits_fp
    with pytest.raises(ValueError, match="fp: expected an rgnn.FixedPoint"):
        rgnn.wilsonian_fixed_point(np.eye(3), y, n_train=2, ridge=0.1)
    with pytest.raises(ValueError, match="n_train: expected an integer in 1..399"):
        rgnn.wilsonian_fixed_point(fp, y, n_train=400, ridge=0.1)
    with pytest.raises(ValueError, match="kernel: expected one of"):
        rgnn.wilsonian_fixed_point(fp, y[:n], n_train=n, ridge=0.1, kernel="x")
    with pytest.raises(ValueError, match="layer: expected an integer in 1..4"):
        rgnn.wilsonian_fixed_point(fp, y[:n], n_train=n, ridge=0.1, layer=5)
    with pytest.raises(ValueError, match=r"empirical: expected \[..., 3, 3\]"):
        rgnn.scale_resolved(np.eye(3), np.eye(4))
    with pytest.raises(ValueError, match="bands: expected an integer >= 1"):
        rgnn.scale_resolved(np.eye(3), np.eye(3), bands=0)
    with pytest.raises(ValueError, match="bands: expected an integer >= 1 or a strictly"):
        rgnn.scale_resolved(np.eye(3), np.eye(3), bands=[1.0, 2.0])
    with pytest.raises(ValueError, match="target: expected a non-zero"):
        rgnn.scale_resolved(np.eye(3), np.eye(3), target=np.zeros(3))
    with pytest.raises(ValueError, match="dim: expected an integer >= 1"):
        rgnn.rbf_spectrum(0)


def test_scale_resolved_partition_and_alignment(x64, digits_fp):
    """Against NumPy: the bands partition the departure exactly; a change along the target
    has alignment 1 and sits in the bands where the target lives."""
    fp, y, n = digits_fp
    k0 = np.asarray(fp.ntk[-1][:24, :24])  # 8 kernels of 24 inputs, 3 bands: as the CLI test
    target = y[:24]
    noise = np.random.RandomState(0).randn(7, 24, 24)
    emp = np.concatenate(
        [k0 + 0.01 * (noise + np.swapaxes(noise, 1, 2)), [k0 + 0.1 * target @ target.T]]
    )  # the last: a change along the target
    s = rgnn.scale_resolved(k0, emp, bands=3, target=target)
    t = tol(EXACT, jnp.float64)
    total = np.linalg.norm(emp - k0, axis=(1, 2)) / np.linalg.norm(k0)
    np.testing.assert_allclose(s.total, total, **t)
    np.testing.assert_allclose(np.sum(np.asarray(s.departure) ** 2, axis=-1), total**2, **t)
    assert int(np.sum(s.band_modes)) == 24
    np.testing.assert_allclose(np.sum(s.target_weight), 1.0, **t)
    lam, u = np.linalg.eigh(k0)  # ascending: u[:, -1] is the top mode
    np.testing.assert_allclose(
        s.mode_shift[0, 0], u[:, -1] @ (emp[0] - k0) @ u[:, -1] / lam[-1], **t
    )
    np.testing.assert_allclose(s.alignment[7], 1.0, **t)
    np.testing.assert_allclose(s.departure[7] ** 2 / s.total[7] ** 2, s.target_weight, **t)
    plain = rgnn.scale_resolved(k0, emp, bands=3)
    assert np.isnan(plain.alignment).all() and np.isnan(plain.target_weight).all()
    np.testing.assert_allclose(plain.departure, s.departure, **t)
    jitted = jax.jit(lambda a, b: rgnn.scale_resolved(a, b, bands=3, target=target))(k0, emp)
    np.testing.assert_allclose(jitted.departure, s.departure, **t)
    np.testing.assert_allclose(jitted.band_edges, s.band_edges, **t)


def _fit_slope(widths, values):
    """Weighted log-log slope and its standard error; ``values [W, M]`` over networks."""
    mean = values.mean(1)
    se_log = values.std(1, ddof=1) / np.sqrt(values.shape[1]) / mean
    a = np.stack([np.ones(len(widths)), np.log(widths)], 1) / se_log[:, None]
    cov = np.linalg.inv(a.T @ a)
    coef = cov @ a.T @ (np.log(mean) / se_log)
    return coef[1], np.sqrt(cov[1, 1])


def _mean_se(v):
    v = np.asarray(v)
    return v.mean(), v.std(ddof=1) / np.sqrt(len(v))


WIDTHS = (32, 64, 128, 256)


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """One run of ``rgnn wilsonian`` (small settings): the flow on digits and, on digits 0 and
    1, NTK-parameterized ensembles (learning rate 0.05, 20 steps) at four widths and a muP
    ensemble (learning rate 0.3, 60 steps), 8 networks each. Shared by the CLI test and the
    physics test below, since training dominates the cost."""
    out = tmp_path_factory.mktemp("wilsonian")
    argv = ["wilsonian", "--out", str(out), "--json", "--depth", "1", "--n", "100"]
    argv += ["--n-test", "300", "--cutoffs", "16", "--widths", ",".join(map(str, WIDTHS))]
    argv += ["--mup-width", "64"]
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        rc = main(argv)
    return rc, out, printed.getvalue()


def test_cli_writes_flow_comparison_plots_and_json(cli_run):
    rc, out, printed = cli_run
    assert rc == 0
    result = json.loads(printed)
    assert json.loads((out / "wilsonian.json").read_text()) == result
    assert (out / "wilsonian.png").stat().st_size > 10_000
    assert (out / "scale_resolved.png").stat().st_size > 10_000
    flow = result["flow"]
    assert len(flow) == 17 and flow[-1]["cutoff"] == 0 and flow[-1]["modes"] == 400
    assert flow[-1]["error_effective"] < 1e-10
    assert flow[-1]["running_ridge"] == pytest.approx(0.01, rel=1e-12)
    sr = result["scale_resolved"]
    assert sorted(int(w) for w in sr["ntk"]) == list(WIDTHS) and sr["mup"]["width"] == 64
    assert sum(sr["bands"]["modes"]) == 24


def test_trained_networks_lazy_versus_feature_learning(cli_run):
    """NTK parameterization, small learning rate: the output NTK's departure from the fixed
    point falls with width (fitted log-log slope negative by more than 4 SE) and is spread over
    scales (relative to the fixed point, the top band moves less than some lower band). muP
    learning features (same architecture and fixed point: at initialization muP's output NTK
    equals NTK-parameterization's): at the same width the departure is larger, aligned with the
    target, and target-shaped in the top band where the target lives (96% of it), each
    contrast by more than 4 combined standard errors over the ensembles. The top band's share
    of the departure is high for both (0.8-0.95): the lazy net's fluctuation is mostly an
    overall rescaling, which lives where the fixed-point kernel does."""
    rc, out, _ = cli_run
    assert rc == 0
    sr = json.loads((out / "wilsonian.json").read_text())["scale_resolved"]
    assert sr["bands"]["target_weight"][0] > 0.5  # the target lives mostly in the top band
    ntk = {int(w): v for w, v in sr["ntk"].items()}
    totals = np.array([ntk[w]["per_network"]["total"] for w in WIDTHS])
    slope, slope_se = _fit_slope(np.array(WIDTHS), totals)
    assert slope + MC_SIGMAS * slope_se < 0
    for w in WIDTHS:  # not concentrated in the top band
        rel = ntk[w]["relative_departure"]
        assert rel[0] < max(rel[1:])
    mup, lazy = sr["mup"]["per_network"], ntk[64]["per_network"]
    for field in ("total", "alignment", "top_band_alignment"):
        (m_mup, se_mup), (m_ntk, se_ntk) = _mean_se(mup[field]), _mean_se(lazy[field])
        assert m_mup - m_ntk > MC_SIGMAS * np.hypot(se_mup, se_ntk), field


def test_cli_errors_are_one_line(tmp_path, capsys, monkeypatch):
    rc = main(["wilsonian", "--ridge", "-1", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "ridge: expected a finite number > 0" in err[0]
    with pytest.raises(SystemExit) as exit_info:
        main(["wilsonian", "--cutoffs", "0"])
    assert exit_info.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(rgnn, "fixed_point", interrupt)
    assert main(["wilsonian", "--out", str(tmp_path), "--no-networks"]) == 130
