"""The perturbative flow: exact textbook results, and 1/n coefficients against Monte Carlo."""

import warnings

import jax
import numpy as np
import pytest

import rgnn
from rgnn.perturbative import TRUST_QUADRATURE_ERROR, _multi_rules
from tests.tiers import tiered
from tests.tolerances import MC_SIGMAS


def _inputs(n=3, dim=6, seed=0):
    x = np.random.RandomState(seed).randn(n, dim)
    return x / np.sqrt(np.mean(x**2, axis=1, keepdims=True))


@pytest.mark.parametrize("slope", [0.0, 0.1, 0.5])
def test_scale_invariant_vertex_is_exact(x64, slope):
    """At criticality (C_W = 1/A_2, C_b = 0), V^(l)_(aa)(aa) = (3 A_4 / A_2^2 - 1)(l - 1) K^2
    exactly (PDLT sec. 5.4), the kurtosis is 3 V / (n K^2), and the single-input mean kernel
    has no 1/n correction."""
    a2, a4 = (1 + slope**2) / 2, (1 + slope**4) / 2
    arch = rgnn.MLP(7, 200, rgnn.leaky_relu(slope), weight_var=1 / a2)
    p = rgnn.perturbative(arch, _inputs())
    k = np.asarray(
        p.nngp_diagonal if hasattr(p, "nngp_diagonal") else np.diagonal(p.nngp, axis1=1, axis2=2)
    )
    layers = np.arange(1, 9)[:, None]
    expected = (3 * a4 / a2**2 - 1) * (layers - 1) * k**2
    v = np.diagonal(np.asarray(p.vertex[..., 0, 0]), axis1=1, axis2=2)
    np.testing.assert_allclose(v, expected, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(p.kurtosis, 3 * expected / (200 * k**2), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(np.diagonal(p.nngp_correction, axis1=1, axis2=2), 0, atol=1e-14)


def test_deep_linear_network_is_exact(x64):
    """Deep linear network (C_W = 1, C_b = 0): K^(l) = K stays fixed and
    V^(l)_(ab)(cd) = (l - 1)(K_ac K_bd + K_ad K_bc) on every pair of inputs, with no mean
    correction (the kernel map is linear)."""
    x = _inputs(4)
    arch = rgnn.MLP(5, 50, "linear")
    p = rgnn.perturbative(arch, x)
    k = np.asarray(p.nngp[0])
    for a in range(4):
        for b in range(4):
            idx = [(a, a), (a, b), (b, b)]
            for i, (p1, p2) in enumerate(idx):
                for j, (q1, q2) in enumerate(idx):
                    want = k[p1, q1] * k[p2, q2] + k[p1, q2] * k[p2, q1]
                    np.testing.assert_allclose(
                        p.vertex[:, a, b, i, j], np.arange(6) * want, rtol=1e-12, atol=1e-14
                    )
    np.testing.assert_allclose(p.nngp_correction, 0, atol=1e-14)


def test_mixed_widths(x64):
    """Mixed widths: each step carries V^(l) with the factor n_l / n_{l-1}, and every observable
    is normalized by the width that feeds its layer. For relu at criticality:
    V^(l+1) = 5 K^2 + (n_l / n_{l-1}) V^(l), so V^(3) / n_2 = 5 K^2 (1 / n_2 + 1 / n_1)."""
    widths = (40, 80, 20)
    p = rgnn.perturbative(rgnn.MLP(3, widths, "relu", weight_var=2.0), _inputs(2), warn=False)
    k = float(p.nngp[0, 0, 0])
    var = np.asarray(p.nngp_variance[:, 0, 0])
    assert var[0] == 0  # layer 1 is deterministic
    np.testing.assert_allclose(var[1], 5 * k**2 / 40, rtol=1e-12)  # layer 2, fed by n_1
    np.testing.assert_allclose(var[2], 5 * k**2 * (1 / 80 + 1 / 40), rtol=1e-12)
    np.testing.assert_allclose(var[3], 5 * k**2 * (1 / 20 + 1 / 80 + 1 / 40), rtol=1e-12)
    np.testing.assert_allclose(np.asarray(p.widths), [6, 40, 80, 20])


def test_warns_when_depth_over_width_is_large(x64):
    with pytest.warns(UserWarning, match="depth/width"):
        rgnn.perturbative(rgnn.MLP(8, 16, "tanh"), _inputs(2))


def test_memory_guard_before_allocation():
    with pytest.raises(ValueError, match="x: 100000 inputs"):
        rgnn.perturbative(rgnn.MLP(2, 64, "relu"), np.ones((100_000, 3)), warn=False)


def test_bad_input():
    with pytest.raises(ValueError, match="x: expected finite"):
        rgnn.perturbative(rgnn.MLP(2, 64, "relu"), np.full((2, 3), np.nan))
    with pytest.raises(ValueError, match="quadrature_order"):
        rgnn.perturbative(rgnn.MLP(2, 64, "relu"), np.ones((2, 3)), quadrature_order=1)
    with pytest.raises(ValueError, match="arch"):
        rgnn.perturbative(None, np.ones((2, 3)))
    with pytest.raises(ValueError, match="n_networks"):
        rgnn.measure(rgnn.MLP(2, 8, "relu"), np.ones((2, 3)), n_networks=1, key=jax.random.key(0))


# ----------------------------------------------------------------------------- Monte Carlo
WIDTHS = (32, 64, 128, 256)
N_NETWORKS = 1500
CASES = {
    "relu-critical": dict(activation="relu", weight_var=2.0, bias_var=0.0, depth=3),
    "tanh-critical": dict(activation="tanh", weight_var=1.0, bias_var=0.0, depth=3),
    "erf-chaotic": dict(activation="erf", weight_var=2.5, bias_var=0.2, depth=2),
    "gelu-ordered": dict(activation="gelu", weight_var=1.5, bias_var=0.1, depth=3),
}
# the slow tier (``pytest -m slow``, run by CI after the README's command): the same recursion
# checked again in the ordered and chaotic phases; relu and tanh at criticality stay in the
# default run (the exact polar integrals and the quadrature path)
SLOW_CASES = ("erf-chaotic", "gelu-ordered")


def _runs(name):
    cfg = dict(CASES[name])
    depth = cfg.pop("depth")
    x = _inputs(2)
    out = []
    with jax.enable_x64(True), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for i, n in enumerate(WIDTHS):
            arch = rgnn.MLP(depth, n, **cfg)
            pred = rgnn.perturbative(arch, x)
            meas = rgnn.measure(arch, x, n_networks=N_NETWORKS, key=jax.random.key(100 + i))
            out.append((n, pred, meas))
    return out


def _intercept(widths, y, se):
    """Weighted fit y = a + b / n; returns a and its standard error."""
    w = 1 / np.asarray(se) ** 2
    design = np.stack([np.ones(len(widths)), 1 / np.asarray(widths, float)], axis=1)
    cov = np.linalg.inv(design.T @ (w[:, None] * design))
    a = (cov @ design.T @ (w * np.asarray(y)))[0]
    return a, np.sqrt(cov[0, 0])


@pytest.mark.parametrize("name", tiered(CASES, SLOW_CASES))
def test_one_over_n_coefficient_matches_monte_carlo(name):
    """n times the measured field, extrapolated to infinite width by a weighted fit
    a + b/n over 4 widths, equals n times the prediction (the 1/n coefficient) within
    MC_SIGMAS standard errors of the fit plus the quadrature error; on the output layer for the
    metric and NTK variances (same and distinct inputs), the last hidden layer for the
    kurtosis."""
    runs = _runs(name)
    for field in ("nngp_variance", "kurtosis", "ntk_variance"):
        if field in ("nngp_variance", "ntk_variance"):
            entries = [(-1, 0, 0), (-1, 0, 1)]
        else:
            entries = [(-2, 0), (-2, 1)]
        for entry in entries:
            ns = np.array([n for n, _, _ in runs], float)
            pred = np.array([float(getattr(p, field)[entry]) * n for n, p, _ in runs])
            y = np.array([float(getattr(m, field)[entry]) * n for n, _, m in runs])
            se = np.array([float(getattr(m, field + "_se")[entry]) * n for n, _, m in runs])
            np.testing.assert_allclose(pred, pred[0], rtol=1e-10)  # a pure 1/n prediction
            a, a_se = _intercept(ns, y, se)
            qerr = max(p.quadrature_error for _, p, _ in runs) * abs(pred[0])
            assert abs(a - pred[0]) <= MC_SIGMAS * a_se + qerr, (field, entry, a, a_se, pred[0])
            assert a_se < 0.35 * abs(pred[0]), (entry, a_se, pred[0])  # the check has power


NARROW = (8, 12, 16, 24, 32)
CORRECTION_CASES = {
    # config and, per field, the entry with the largest predicted shift relative to its noise
    "relu-critical": (
        dict(activation="relu", weight_var=2.0),
        {"nngp_correction": (-1, 0, 1), "ntk_correction": (-1, 0, 1)},
    ),
    "tanh": (
        dict(activation="tanh", weight_var=1.5, bias_var=0.1),
        {"nngp_correction": (-1, 0, 0), "ntk_correction": (-1, 0, 1)},
    ),
}


@pytest.mark.parametrize("name", tiered(CORRECTION_CASES, ("tanh",)))  # tanh: slow tier
def test_mean_corrections_match_monte_carlo(name):
    """The 1/n shifts of the mean kernel and of the mean NTK: their standard error,
    n sqrt(Var / M), grows like sqrt(n), so they are measured on narrow networks (widths 8..32)
    with 30000 networks each and extrapolated by the weighted fit n * shift = a + b / n; the
    intercept equals n * the prediction within MC_SIGMAS standard errors of the fit plus the
    quadrature error (power: fit SE < 50% of the value)."""
    cfg, entries = CORRECTION_CASES[name]
    x = _inputs(2)
    pred = {f: [] for f in entries}
    y = {f: [] for f in entries}
    se = {f: [] for f in entries}
    qerr = 0.0
    with jax.enable_x64(True), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for i, n in enumerate(NARROW):
            arch = rgnn.MLP(3, n, **cfg)
            p = rgnn.perturbative(arch, x)
            qerr = max(qerr, p.quadrature_error)
            m = rgnn.measure(
                arch,
                x,
                n_networks=30000,
                key=jax.random.key(7 + i),
                ntk="ntk_correction" in entries,
                batch_size=10000,
            )
            for f, e in entries.items():
                pred[f].append(float(getattr(p, f)[e]) * n)
                y[f].append(float(getattr(m, f)[e]) * n)
                se[f].append(float(getattr(m, f + "_se")[e]) * n)
    for f in entries:
        np.testing.assert_allclose(pred[f], pred[f][0], rtol=1e-10)
        a, a_se = _intercept(np.array(NARROW, float), y[f], se[f])
        tol = MC_SIGMAS * a_se + qerr * abs(pred[f][0])
        assert abs(a - pred[f][0]) <= tol, (f, a, a_se, pred[f][0])
        assert a_se < 0.5 * abs(pred[f][0]), (f, a_se, pred[f][0])


# ----------------------------------------------------------------------------- full vertex
def test_full_vertex_of_deep_linear_network_is_exact(x64):
    """Deep linear network: V^(l)_(ab)(cd) = (l - 1)(K_ac K_bd + K_ad K_bc) on four different
    inputs (the 4-dimensional Gaussian integrals included)."""
    x = _inputs(4)
    fpv = rgnn.vertex(rgnn.MLP(3, 50, "linear"), x, quadrature_order=32)
    k = np.asarray(fpv.nngp[0])
    want = np.einsum("ac,bd->abcd", k, k) + np.einsum("ad,bc->abcd", k, k)
    layers = np.arange(4)[:, None, None, None, None]
    assert fpv.quadrature_error < 1e-4
    np.testing.assert_allclose(
        fpv.vertex, layers * want[None], rtol=fpv.quadrature_error + 1e-12, atol=1e-13
    )


def _vertex_case():
    """relu, depth 2, width 256, on 4 inputs: ``(arch, x)``."""
    return rgnn.MLP(2, 256, "relu", weight_var=2.0), _inputs(4)


def test_full_vertex_agrees_with_pairs(x64):
    """On 4 inputs: every component of :func:`rgnn.vertex` on two of them equals the all-pairs
    vertex of :func:`rgnn.perturbative` (exact for relu)."""
    arch, x = _vertex_case()
    fpv = rgnn.vertex(arch, x)
    p = rgnn.perturbative(arch, x, ntk=False)
    scale = float(np.max(np.abs(p.vertex)))
    tol = p.quadrature_error * scale + 1e-12  # pair components need no 3- or 4-input integral
    assert tol < 1e-3 * scale
    for a in range(4):
        for b in range(4):
            idx = [(a, a), (a, b), (b, b)]
            for i, (p1, p2) in enumerate(idx):
                for j, (q1, q2) in enumerate(idx):
                    np.testing.assert_allclose(
                        fpv.vertex[:, p1, p2, q1, q2], p.vertex[:, a, b, i, j], rtol=tol, atol=tol
                    )


@pytest.mark.slow  # V on four distinct inputs: in the default run via tests/test_full_fields.py
def test_full_vertex_on_four_distinct_inputs_matches_monte_carlo(x64):
    """The component of :func:`rgnn.vertex` on four different inputs, V_(01)(23) / n =
    Cov(G_01, G_23), agrees with Monte Carlo at one width within MC_SIGMAS standard errors plus
    the O(1/n^2) term (bounded by depth/width times the prediction) and the quadrature error."""
    arch, x = _vertex_case()
    width, depth = arch.widths[-1], arch.depth
    fpv = rgnn.vertex(arch, x)
    ens = rgnn.ensemble(arch, x.shape[1], n_networks=4000, key=jax.random.key(3))
    g = np.asarray(rgnn.empirical_nngp(ens, x))[:, -1]  # [M, N, N] output-layer metric
    u, v = g[:, 0, 1], g[:, 2, 3]
    cu, cv = u - u.mean(), v - v.mean()
    cov = np.mean(cu * cv) * len(u) / (len(u) - 1)
    cov_se = np.std(cu * cv, ddof=1) / np.sqrt(len(u))
    pred = float(fpv.vertex[-1, 0, 1, 2, 3]) / width
    tol = MC_SIGMAS * cov_se + (depth / width + fpv.quadrature_error) * abs(pred)
    assert abs(cov - pred) <= tol, (cov, cov_se, pred)
    assert cov_se < 0.25 * abs(pred)  # the check has power


# ----------------------------------------------------------------------------- four-input rule
@pytest.mark.parametrize("bad", [2, 12.0, True, "12"])
def test_quadrature_order_multi_is_checked(bad):
    with pytest.raises(ValueError, match="quadrature_order_multi"):
        rgnn.perturbative(rgnn.MLP(1, 8, "tanh"), _inputs(4), full=True, quadrature_order_multi=bad)


def test_quadrature_order_multi_counts_in_the_memory_check():
    """Its grids (one batch of 16 four-subsets, ``64^4`` nodes each) are refused up front."""
    with pytest.raises(ValueError, match="64-node grids of quadrature_order_multi"):
        rgnn.perturbative(rgnn.MLP(1, 8, "tanh"), _inputs(14), full=True, quadrature_order_multi=64)


def _tanh_table(c, x, w):
    """``<tanh^(a)(z_1) tanh^(b)(z_2) tanh^(c)(z_3) tanh^(d)(z_4)>``, ``a..d <= 3``, by the
    tensor product of the one-dimensional rule ``(x, w)`` in the Cholesky coordinates ``c``."""
    grid = np.stack(np.meshgrid(x, x, x, x, indexing="ij")).reshape(4, -1)
    weight = np.einsum("i,j,k,l->ijkl", w, w, w, w).reshape(-1)
    t = np.tanh(c @ grid)
    s = 1 - t * t
    d = np.stack([t, s, -2 * t * s, -2 * s * (1 - 3 * t * t)], axis=1)  # [4 inputs, 4, P]
    return np.einsum("ap,bp,cp,dp,p->abcd", d[0], d[1], d[2], d[3], weight, optimize=True)


def test_tanh_four_input_rule_beats_gauss_hermite(x64):
    """The three/four-input rule of tanh (a trapezoid rule, ``perturbative._multi_rules``) at
    12 nodes per dimension, on the first-layer kernel of four inputs: its largest error on the
    table of products of tanh and its first three derivatives, against a 28-node trapezoid
    rule on [-5.5, 5.5] (measured error about 1e-5 there, hundreds of times below the errors
    compared), is below that of the 12-node Gauss-Hermite rule it replaces and within its own
    error estimate (the difference to its comparison rule)."""
    arch = rgnn.MLP(1, 8, "tanh", bias_var=0.1)
    k = np.asarray(rgnn.fixed_point(arch, _inputs(4)).nngp[0])
    c = np.linalg.cholesky(k)
    x = np.linspace(-5.5, 5.5, 28)
    ref = _tanh_table(c, x, np.exp(-x * x / 2) / np.exp(-x * x / 2).sum())
    scale = np.max(np.abs(ref))
    (x12, w12), (x_lo, w_lo) = _multi_rules(arch.act, 12, float(np.max(np.diag(k))), np.float64)
    trap = _tanh_table(c, np.asarray(x12), np.asarray(w12))
    estimate = np.max(np.abs(trap - _tanh_table(c, np.asarray(x_lo), np.asarray(w_lo)))) / scale
    gx, gw = np.polynomial.hermite_e.hermegauss(12)
    gauss = _tanh_table(c, gx, gw / gw.sum())
    err_trap = np.max(np.abs(trap - ref)) / scale
    err_gauss = np.max(np.abs(gauss - ref)) / scale
    assert err_trap <= estimate, (err_trap, estimate)
    assert err_trap < err_gauss, (err_trap, err_gauss)


# tanh in the slow tier: its rule stays within its error estimate in the default run
# (test_tanh_four_input_rule_beats_gauss_hermite)
@pytest.mark.parametrize("name", tiered(["tanh", "gelu"], ("tanh",)))
def test_quadrature_error_bounds_the_four_input_rule_and_warns(x64, name):
    """The full vertex on four inputs with 3 nodes per dimension of the three/four-input rule
    differs from the one with 24 by at most the reported ``quadrature_error`` (relative to its
    largest entry), and that estimate, above ``TRUST_QUADRATURE_ERROR``, comes
    with a warning naming ``quadrature_order_multi``; with 24 nodes it is below and silent."""
    arch = rgnn.MLP(1, 64, name, bias_var=0.1)
    x = _inputs(4)
    with pytest.warns(UserWarning, match="quadrature_order_multi"):
        coarse = rgnn.perturbative(arch, x, ntk=False, full=True, quadrature_order_multi=3)
    fine = rgnn.perturbative(arch, x, ntk=False, full=True, quadrature_order_multi=24)
    assert fine.quadrature_error <= TRUST_QUADRATURE_ERROR
    a, b = np.asarray(coarse.vertex), np.asarray(fine.vertex)
    change = np.max(np.abs(a - b)) / np.max(np.abs(b))
    assert change <= coarse.quadrature_error + fine.quadrature_error, change
