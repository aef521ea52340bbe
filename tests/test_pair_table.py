"""The correlation tables of one-norm layers (rgnn.flow.table: the moment engine's cache for
many pairs) against the direct pair quadrature they replace: every field within the tables'
own measured error."""

import importlib

import jax
import numpy as np
import pytest

import rgnn
from rgnn.flow import engine, moments
from rgnn.flow import table as flow_table

_perturbative = importlib.import_module("rgnn.perturbative")
_fixed_point = importlib.import_module("rgnn.fixed_point")

N_BREAK_EVEN = 96  # N (N - 1) / 2 = 4560 pairs: enough for the tables on their own (worth_it)
N_TABLE = 16  # 120 pairs: below the break-even, so the tests force the tables on (_both)
STATS = ("V", "DG", "D", "A", "DH", "F", "B")


def _inputs(n, scales=False, seed=0):
    x = np.random.RandomState(seed).randn(n, 8)
    x /= np.sqrt(np.mean(x**2, axis=1, keepdims=True))
    if scales:
        x *= np.random.RandomState(seed + 1).uniform(0.7, 1.3, (n, 1))
    return x


def _arch(name, depth):
    crit = rgnn.critical_point(name)
    return rgnn.MLP(depth, 128, name, weight_var=crit.weight_var, bias_var=crit.bias_var)


def _both(arch, x, order):
    """The engine's statistics on every pair with the two-input moments from the correlation
    tables (whatever the number of pairs: the same code as ``N >= N_BREAK_EVEN`` runs) and
    directly (the reference), on the same leading-order kernels; and the tables' measured
    error."""
    fp, _ = _fixed_point._fixed_point_tabulated(arch, x, quadrature_order=order)
    assert _perturbative._tables_apply(arch, fp, 1000, False) == flow_table.one_norm(
        np.asarray(fp.nngp_diag1)[:-1]
    )
    fast, _, err = _perturbative._engine_raw(
        arch, x, fp, order, STATS, False, full=False, tables=True
    )
    ref, _, zero = _perturbative._engine_raw(arch, x, fp, order, STATS, False, full=False)
    assert zero == 0.0
    return fast, ref, err


def test_tables_apply_above_the_break_even():
    assert flow_table.worth_it(N_BREAK_EVEN * (N_BREAK_EVEN - 1) // 2)
    assert not flow_table.worth_it(100)
    assert not flow_table.worth_it(N_TABLE * N_TABLE // 2)  # hence _both forces them on


@pytest.mark.parametrize("name, depth", [("tanh", 3), ("gelu", 2)])
def test_one_norm_tables_match_the_direct_quadrature(x64, name, depth):
    """Normalized inputs: every layer has one norm, the tables apply, their measured error is
    positive and every statistic agrees with the direct pair quadrature within it (``L + 1``
    times the worst layer's, as ``quadrature_error`` counts it) times the statistic's
    scale."""
    arch = _arch(name, depth)
    x = _inputs(N_TABLE)
    fast, ref, err = _both(arch, x, 16)
    assert 0.0 < err < 1e-6
    for name_, b in ref.items():
        a = np.asarray(fast[name_])
        assert a.dtype == np.float64
        scale = np.max(np.abs(np.asarray(b)))
        np.testing.assert_allclose(a, b, rtol=0, atol=arch.n_layers * err * scale + 1e-15)


def test_different_norms_fall_back_to_the_direct_quadrature(x64, monkeypatch):
    """Inputs of different norms: no layer has one norm, so even with many pairs the tables
    do not apply and :func:`rgnn.perturbative` gives the direct results."""
    arch = _arch("tanh", 3)
    x = _inputs(N_TABLE, scales=True)
    fp, _ = _fixed_point._fixed_point_tabulated(arch, x, quadrature_order=16)
    assert not _perturbative._tables_apply(arch, fp, N_BREAK_EVEN, False)
    ref = rgnn.perturbative(arch, x, quadrature_order=16)
    monkeypatch.setattr(flow_table, "worth_it", lambda *a, **k: True)
    forced = rgnn.perturbative(arch, x, quadrature_order=16)
    for f in ("vertex", "nngp_correction", "ntk_vertex", "ntk_correction", "ntk_b"):
        np.testing.assert_allclose(getattr(forced, f), getattr(ref, f), rtol=1e-12, atol=1e-15)


def test_one_norm_tables_through_perturbative(x64, monkeypatch):
    """The public path with the tables forced on (normalized inputs): every field within the
    reported ``quadrature_error`` of the direct run's, and the error reported includes the
    tables'."""
    arch = _arch("tanh", 3)
    x = _inputs(N_TABLE)
    ref = rgnn.perturbative(arch, x)
    monkeypatch.setattr(flow_table, "worth_it", lambda *a, **k: True)
    fast = rgnn.perturbative(arch, x)
    assert fast.quadrature_error > 0.0
    for f in (
        "vertex",
        "nngp_variance",
        "nngp_correction",
        "kurtosis",
        "ntk_vertex",
        "mixed_vertex",
        "ntk_b",
        "ntk_variance",
        "ntk_correction",
    ):
        a, b = np.asarray(getattr(fast, f)), np.asarray(getattr(ref, f))
        tol = (fast.quadrature_error + ref.quadrature_error) * np.max(np.abs(b))
        np.testing.assert_allclose(a, b, rtol=0, atol=tol)


def test_table_error_bounds_the_interpolation(x64):
    """The measured table error bounds the interpolation error of every moment at random
    correlations, for a coarse table (64 intervals) where that error is visible."""
    act = rgnn.get_activation("swish")
    rho = jax.numpy.asarray(np.random.RandomState(3).uniform(-1, 1, 2000))
    q = 0.7
    rules = moments.rules(16, 64, 4, jax.numpy.float64)
    tab, err = engine.moment_table(act, jax.numpy.asarray([q]), rules, stats=STATS, intervals=64)
    tab, err = tab[0], float(err[0])
    assert 0.0 < err < 1e-3
    fast = flow_table.interpolate(tab, rho, 64)
    eye = np.eye(2)
    names = engine.closure(STATS)
    kmax = max(engine.KMAX[n] for n in names)
    specs, singles = engine._record(
        act,
        names,
        jax.numpy.asarray(eye),
        jax.numpy.asarray(eye),
        rules,
        pointwise=False,
        kmax=kmax,
    )

    def direct(r):
        k = q * jax.numpy.asarray(eye) + q * r * (1 - jax.numpy.asarray(eye))
        return moments.Moments(act, k, rules, pointwise=False, kmax=kmax).flat_values(
            specs, singles
        )

    ref = jax.jit(jax.vmap(direct))(rho)
    # the same scale as the measurement (flow_table.table_error): each moment's largest
    # value on the table, or the largest moment for one that vanishes
    scale = np.max(np.abs(np.asarray(tab)), axis=0)
    top = np.max(scale)
    scale = np.where(scale > 64 * np.finfo(float).eps * top, scale, top)
    gap = np.max(np.abs(np.asarray(fast) - np.asarray(ref)), axis=0) / scale
    assert np.max(gap) <= err
