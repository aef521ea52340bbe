"""The correlation tables of one-norm layers (rgnn._pair_table) against the direct pair
quadrature they replace: every field within the tables' own measured error."""

import importlib

import jax
import numpy as np
import pytest

import rgnn
from rgnn import _ntk_flow, _pair_table

_perturbative = importlib.import_module("rgnn.perturbative")

N_BREAK_EVEN = 96  # N (N - 1) / 2 = 4560 pairs: enough for the tables on their own (worth_it)
N_TABLE = 16  # 120 pairs: below the break-even, so the tests force the tables on (_both)
FIELDS = ("vertex", "nngp_variance", "kurtosis", "nngp_correction", "nngp")
NTK_FIELDS = ("ntk_variance", "ntk_correction", "ntk_vertex", "mixed_vertex", "ntk_b")


def _inputs(n, scales=False, seed=0):
    x = np.random.RandomState(seed).randn(n, 8)
    x /= np.sqrt(np.mean(x**2, axis=1, keepdims=True))
    if scales:
        x *= np.random.RandomState(seed + 1).uniform(0.7, 1.3, (n, 1))
    return x


def _arch(name, depth):
    crit = rgnn.critical_point(name)
    return rgnn.MLP(depth, 128, name, weight_var=crit.weight_var, bias_var=crit.bias_var)


def _both(arch, x, order, monkeypatch):
    """The pair recursions of many-input runs (``_run_tabulated``) with the tables switched on
    (where a layer has one norm, whatever the number of pairs), and with them switched off (the
    reference). Forcing them on at a small ``N`` runs
    the same code as ``N >= N_BREAK_EVEN`` does (``worth_it`` is the only switch), at a
    fraction of the reference's cost."""
    with monkeypatch.context() as m:
        m.setattr(_pair_table, "worth_it", lambda *a, **k: True)
        fast = _perturbative._run_tabulated(arch, x, order)
    with monkeypatch.context() as m:
        m.setattr(_pair_table, "worth_it", lambda *a, **k: False)
        ref = _perturbative._run_tabulated(arch, x, order)
    return fast, ref


def test_tables_apply_above_the_break_even():
    assert _pair_table.worth_it(N_BREAK_EVEN * (N_BREAK_EVEN - 1) // 2)
    assert not _pair_table.worth_it(100)
    assert not _pair_table.worth_it(N_TABLE * N_TABLE // 2)  # hence _both forces them on


@pytest.mark.parametrize("name, depth", [("tanh", 3), ("gelu", 2)])
def test_one_norm_tables_match_the_direct_quadrature(x64, monkeypatch, name, depth):
    """Normalized inputs: every layer has one norm, the tables are used (a positive measured
    error is reported) and every field agrees with the direct pair quadrature within
    ``quadrature_error`` (the tables' share, ``n_layers`` times the worst layer's) times the
    field's scale."""
    x = _inputs(N_TABLE)
    fast, ref = _both(_arch(name, depth), x, 16, monkeypatch)
    assert ref.quadrature_error == 0.0
    assert 0.0 < fast.quadrature_error < 1e-6
    for f in FIELDS + NTK_FIELDS:
        a, b = np.asarray(getattr(fast, f)), np.asarray(getattr(ref, f))
        assert a.dtype == np.float64
        scale = np.max(np.abs(b))
        np.testing.assert_allclose(a, b, rtol=0, atol=fast.quadrature_error * scale + 1e-15)


def test_different_norms_fall_back_to_the_direct_quadrature(x64, monkeypatch):
    """Inputs of different norms: no layer has one norm, so the results are the direct ones
    and no table error is reported. The network, input count and quadrature order are those
    of the tanh case above, so the compiled flows are shared (compilation is most of the
    cost)."""
    x = _inputs(N_TABLE, scales=True)
    fast, ref = _both(_arch("tanh", 3), x, 16, monkeypatch)
    assert fast.quadrature_error == 0.0
    for f in FIELDS + NTK_FIELDS:
        np.testing.assert_allclose(getattr(fast, f), getattr(ref, f), rtol=1e-12, atol=1e-15)


def test_pair_stats_table_error_bounds_the_interpolation(x64):
    """The measured table error bounds the interpolation error at random correlations, for
    a coarse table (64 intervals) where that error is visible, and jit gives the same."""
    act = rgnn.get_activation("swish")
    rho = np.random.RandomState(3).uniform(-1, 1, 5000)
    q = 0.7
    ks = jax.numpy.asarray(np.stack([np.full_like(rho, q), q * rho, np.full_like(rho, q)], 1))

    def stats(k):
        return _ntk_flow._pair_stats(act, k, 16)

    fast, err = _pair_table.pair_stats(stats, ks, tabulate=True, intervals=64)
    # the reference under jit: op-by-op dispatch of the direct quadrature costs seconds
    direct, zero = jax.jit(lambda k: _pair_table.pair_stats(stats, k, tabulate=False))(ks)
    assert float(zero) == 0.0 and 0.0 < float(err) < 1e-3
    for a, b in zip(
        jax.tree_util.tree_leaves(fast), jax.tree_util.tree_leaves(direct), strict=True
    ):
        scale = np.max(np.abs(np.asarray(b)))
        assert np.max(np.abs(np.asarray(a) - np.asarray(b))) <= float(err) * max(scale, 1e-300)
    jitted = jax.jit(lambda k: _pair_table.pair_stats(stats, k, tabulate=True, intervals=64))
    np.testing.assert_allclose(jitted(ks)[1], err, rtol=1e-12)
