"""The four-index fields in full (``perturbative(..., full=True)``, ``measure(..., full=True)``):
the same numbers as the pair layout where the two overlap, the index symmetries of their
definitions, and, on entries with three or four distinct inputs, agreement with Monte Carlo
over finite networks (relu, tanh, gelu)."""

import functools
import itertools
import warnings

import jax
import numpy as np
import pytest

import rgnn
from tests.test_perturbative import _intercept
from tests.tiers import tiered
from tests.tolerances import EXACT, MC_SIGMAS, tol

CASES = {  # config, kinks (relu: the pointwise derivative, which autodiff of a network gives)
    "relu": (dict(activation="relu", weight_var=2.0, bias_var=0.0), "pointwise"),
    "tanh": (dict(activation="tanh", weight_var=1.5, bias_var=0.1), "distributional"),
    "gelu": (dict(activation="gelu", weight_var=1.7, bias_var=0.1), "distributional"),
}
DEPTH = 2
OUT = 3  # output units: every layer has a pair of different units for the unit-pair estimators
VERTICES = ("vertex", "ntk_vertex", "mixed_vertex")
NTK_FIELDS = VERTICES + ("ntk_b",)
DNTK_FIELDS = ("dntk_p", "dntk_q")
DDNTK_FIELDS = ("ddntk_r", "ddntk_s", "ddntk_t", "ddntk_u")
TWO_INDEX = (
    "nngp",
    "nngp_correction",
    "nngp_variance",
    "kurtosis",
    "coupling",
    "ntk",
    "ntk_correction",
    "ntk_variance",
)
# the index permutations each field is invariant under, from its definition: V, A are
# covariances of symmetric matrices (a1 <-> a2, a3 <-> a4, (a1 a2) <-> (a3 a4)); D = n Cov(G, H~)
# only within each pair; B_{a1a2a3a4} = B_{a3a4a1a2} = B_{a2a1a4a3}; P is symmetric in its middle
# two (dH_{i0 i1 i2; a0 a1 a2} is symmetric under (i1 a1) <-> (i2 a2)), Q has no symmetry of its
# own (its partner is the third term of the correlator); R symmetric in its last two,
# S_{1234} = S_{2143}, T_{1342} = T_{2431}, U_{1423} = U_{2314} (rgnn.flow.rules)
SYMMETRIES = {
    "vertex": ((1, 0, 2, 3), (0, 1, 3, 2), (2, 3, 0, 1)),
    "ntk_vertex": ((1, 0, 2, 3), (0, 1, 3, 2), (2, 3, 0, 1)),
    "mixed_vertex": ((1, 0, 2, 3), (0, 1, 3, 2)),
    "ntk_b": ((2, 3, 0, 1), (1, 0, 3, 2)),
    "dntk_p": ((0, 2, 1, 3),),
    "dntk_q": (),
    "ddntk_r": ((0, 1, 3, 2),),
    "ddntk_s": ((1, 0, 3, 2),),
    "ddntk_t": ((3, 2, 1, 0),),
    "ddntk_u": ((2, 3, 0, 1),),
}
# exchanges the definitions do not imply, which the fields must break (the checks above are
# not vacuous)
ASYMMETRIES = {"mixed_vertex": (2, 3, 0, 1), "dntk_q": (0, 2, 1, 3), "ntk_b": (1, 0, 2, 3)}


def _x(n=4):
    """``n <= 4`` inputs in 4 dimensions (``|x|^2 / n_0 = 1``), pairwise correlations
    0.26 .. 0.67: every entry on three or four of them is well away from both the
    single-input value and zero."""
    rng = np.random.RandomState(2)
    x = 0.7 * rng.randn(1, 4) + rng.randn(4, 4)
    return (x / np.sqrt(np.mean(x**2, axis=1, keepdims=True)))[:n]


def _arch(name, width):
    return rgnn.MLP(DEPTH, width, out_dim=OUT, **CASES[name][0])


@functools.cache
def _predict(name, n, full):
    """``perturbative`` on the first ``n`` inputs (every four-index field; the ddNTK for relu
    and gelu). The fields of equal-width networks, ``n_{l-1}`` times a covariance or mean, do
    not depend on the width."""
    with jax.enable_x64(True), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return rgnn.perturbative(
            _arch(name, 128),
            _x(n),
            full=full,
            dntk=True,
            ddntk=name != "tanh",
            kinks=CASES[name][1],
        )


def _fields(name):
    return NTK_FIELDS + DNTK_FIELDS + (DDNTK_FIELDS if name != "tanh" else ())


def _pair_of_full(full, field, a, b):
    """The pair-layout components of the pair ``(a, b)`` read off a full ``[L+1, N, N, N, N]``
    field, by the layouts' definitions (slot 0 is input ``a``, slot 1 input ``b``)."""
    s = (a, b)
    if field in VERTICES:  # components (aa, ab, bb) x (aa, ab, bb)
        comps = ((0, 0), (0, 1), (1, 1))
        return np.stack(
            [
                np.stack([full[:, s[p], s[q], s[r], s[t]] for r, t in comps], axis=-1)
                for p, q in comps
            ],
            axis=-2,
        )
    if field == "ntk_b":  # (B_aabb, B_abba)
        return np.stack([full[:, a, a, b, b], full[:, a, b, b, a]], axis=-1)
    out = np.empty(full.shape[:1] + (2, 2, 2, 2))
    for c in np.ndindex(2, 2, 2, 2):
        out[(slice(None),) + c] = full[(slice(None),) + tuple(s[k] for k in c)]
    return out


# ----------------------------------------------------------------------------- layouts
@pytest.mark.parametrize("name", ["relu", "gelu"])
def test_two_inputs_full_equals_pair_layout(x64, name):
    """On two inputs the full layout and the pair layout hold the same numbers: every
    pair-layout component of every four-index field (V, A, D, B, P, Q, R, S, T, U; relu with
    the pointwise kinks the ddNTK needs) is the full entry its slots name, on the pairs (0, 1),
    (1, 0) and the single inputs, and the two-index fields are equal."""
    full, pair = _predict(name, 2, True), _predict(name, 2, False)
    for field in _fields(name):
        f, p = np.asarray(getattr(full, field)), np.asarray(getattr(pair, field))
        assert f.shape == (DEPTH + 1, 2, 2, 2, 2)
        scale = np.abs(f).max()
        assert scale > 0 or field in ("ddntk_r", "ddntk_u")  # relu pointwise: R = U = 0
        for a, b in itertools.product(range(2), repeat=2):
            np.testing.assert_allclose(
                _pair_of_full(f, field, a, b), p[:, a, b], **tol(EXACT, f.dtype), err_msg=field
            )
    for field in TWO_INDEX:
        np.testing.assert_allclose(
            getattr(full, field), getattr(pair, field), **tol(EXACT, full.nngp.dtype)
        )


@pytest.mark.parametrize("name", ["relu", "gelu"])
def test_four_inputs_two_valued_entries_equal_pair_layout(x64, name):
    """On four inputs, every full entry whose indices take at most two distinct values is the
    pair-layout component of that pair (the entries on three and four distinct inputs are the
    only new numbers), for every four-index field."""
    full, pair = _predict(name, 4, True), _predict(name, 4, False)
    for field in _fields(name):
        f, p = np.asarray(getattr(full, field)), np.asarray(getattr(pair, field))
        assert f.shape == (DEPTH + 1, 4, 4, 4, 4)
        for a, b in itertools.product(range(4), repeat=2):
            np.testing.assert_allclose(
                _pair_of_full(f, field, a, b),
                p[:, a, b],
                **tol(EXACT, f.dtype),
                err_msg=f"{field} pair {(a, b)}",
            )


@pytest.mark.parametrize("name", list(CASES))
def test_index_symmetries(x64, name):
    """The full tensors on four inputs have the index symmetries of their definitions
    (:data:`SYMMETRIES`), to roundoff, on every layer; and they do break the exchanges their
    definitions do not imply (:data:`ASYMMETRIES`), so the check is not vacuous."""
    full = _predict(name, 4, True)
    for field in _fields(name):
        f = np.asarray(getattr(full, field))
        scale = np.abs(f).max()
        for perm in SYMMETRIES[field]:
            np.testing.assert_allclose(
                f,
                f.transpose((0,) + tuple(1 + k for k in perm)),
                rtol=tol(EXACT, f.dtype)["rtol"],
                atol=tol(EXACT, f.dtype)["rtol"] * scale,
                err_msg=f"{field} {perm}",
            )
        if field in ASYMMETRIES:
            perm = ASYMMETRIES[field]
            gap = np.abs(f - f.transpose((0,) + tuple(1 + k for k in perm))).max()
            assert gap > 1e-3 * scale, (field, perm, gap, scale)


def test_distributional_relu_dntk_on_three_inputs_raises(x64):
    """The distributional relu dNTK (sigma'' a delta function) on three or more distinct
    inputs is not implemented: a ValueError that says so and what to pass instead."""
    with pytest.raises(ValueError, match=r"three or four distinct inputs.*kinks=\"pointwise\""):
        rgnn.perturbative(_arch("relu", 64), _x(3), full=True, dntk=True)


# ----------------------------------------------------------------------------- measure(full)
def test_measure_full_restricts_to_pair_layout(x64):
    """``measure(..., full=True)`` and the pair layout (``vertex=True``, ``dntk=True``,
    ``ddntk=True``) estimate the same numbers from the same networks: every pair-layout mean
    and standard error is the full entry its slots name (up to the order of floating-point
    sums); shapes, dtype and the layers that must vanish."""
    arch = rgnn.MLP(1, 5, "tanh", weight_var=1.5, bias_var=0.2, out_dim=2)
    x = _x(3)
    kw = dict(n_networks=8, key=jax.random.key(4), dntk=True, ddntk=True, batch_size=4)
    full = rgnn.measure(arch, x, full=True, **kw)
    pair = rgnn.measure(arch, x, vertex=True, **kw)
    assert full.full and not pair.full
    for field in NTK_FIELDS + DNTK_FIELDS + DDNTK_FIELDS:
        for suffix in ("", "_se"):
            f = np.asarray(getattr(full, field + suffix))
            p = np.asarray(getattr(pair, field + suffix))
            assert f.shape == (2, 3, 3, 3, 3) and f.dtype == np.float64, field
            for a, b in itertools.product(range(3), repeat=2):
                np.testing.assert_allclose(
                    _pair_of_full(f, field, a, b),
                    p[:, a, b],
                    rtol=1e-10,
                    atol=1e-12,
                    err_msg=field + suffix,
                )
        # layer 1 is deterministic (V, A, D, B) or linear in its parameters (dNTK, ddNTK)
        np.testing.assert_allclose(getattr(full, field)[0], 0.0, atol=1e-12)
        assert np.all(np.isfinite(getattr(full, field)[1:]))
    # without vertex=True / full=True the four-index fields are not estimated
    off = rgnn.measure(arch, x, n_networks=4, key=jax.random.key(0))
    assert all(getattr(off, f) is None for f in NTK_FIELDS)
    no_ntk = rgnn.measure(arch, x, n_networks=4, key=jax.random.key(0), ntk=False, full=True)
    assert no_ntk.vertex.shape == (2, 3, 3, 3, 3) and no_ntk.ntk_vertex is None


def test_measure_bad_input():
    arch = rgnn.MLP(2, 8, "relu")
    x = np.ones((2, 3))
    for flag in ("full", "vertex", "dntk"):
        with pytest.raises(ValueError, match=f"{flag}: expected True or False"):
            rgnn.measure(arch, x, n_networks=4, key=jax.random.key(0), **{flag: "yes"})
    with pytest.raises(ValueError, match="x: 200 inputs need about .* GiB"):
        rgnn.measure(arch, np.ones((200, 3)), n_networks=4, key=jax.random.key(0), full=True)


# ----------------------------------------------------------------------------- Monte Carlo
def _canonical(field, n=4, min_distinct=3):
    """One index tuple per orbit of the field's symmetries, among the tuples with at least
    ``min_distinct`` distinct inputs (equal entries are compared once)."""
    group, todo = {(0, 1, 2, 3)}, [(0, 1, 2, 3)]
    while todo:  # the group the field's symmetries generate
        p = todo.pop()
        for g in SYMMETRIES[field]:
            q = tuple(p[k] for k in g)
            if q not in group:
                group.add(q)
                todo.append(q)
    return sorted(
        {
            min(tuple(t[k] for k in p) for p in group)
            for t in itertools.product(range(n), repeat=4)
            if len(set(t)) >= min_distinct
        }
    )


def _check_fit(name, runs, fields, widths, n_inputs=4):
    """``n E[.] = a + b / n`` (``n`` the width) fitted (weighted) over ``widths`` on every
    canonical entry with three or four distinct inputs (among the first ``n_inputs``) of the last
    hidden and the output layer;
    ``a`` must equal the prediction within MC_SIGMAS standard errors of the fit plus the
    quadrature error (``quadrature_error`` times the field's largest entry on that layer), and
    the fit must have power: its standard error below POWER times the prediction on the
    field's largest tested entry of that layer (entries near zero, such as most of tanh's ``A``
    on distinct inputs, are checked to the absolute precision of their own standard error).
    Returns the |z| of every comparison."""
    pred_all = _predict(name, 4, True)
    ns = np.asarray(widths, float)
    zs = []
    for field in fields:
        # the entries on the first inputs are those of a computation on them alone
        k = n_inputs
        pred = np.asarray(getattr(pred_all, field))[:, :k, :k, :k, :k]
        for layer in (-2, -1):
            qerr = pred_all.quadrature_error * np.abs(pred[layer]).max()
            entries = _canonical(field, n_inputs)
            big = max(entries, key=lambda t, layer=layer: abs(pred[(layer,) + t]))
            for t in entries:
                at = (layer,) + t
                y = [float(getattr(m, field)[at]) for m in runs]
                se = [float(getattr(m, field + "_se")[at]) for m in runs]
                a, a_se = _intercept(ns, y, se)
                zs.append(abs(a - pred[at]) / a_se)
                assert abs(a - pred[at]) <= MC_SIGMAS * a_se + qerr, (
                    field,
                    at,
                    a,
                    a_se,
                    pred[at],
                )
                if t == big:  # the check has power
                    assert a_se < POWER * abs(pred[at]), (field, at, a_se, pred[at])
    return np.asarray(zs)


POWER = 0.25
MC_WIDTHS = (32, 64, 128)
MC_NETWORKS = 512


# tanh in the slow tier: relu (pointwise kink) and gelu (smooth, with the ddNTK) stay in the
# default run, tanh's pair fields in tests/test_perturbative.py's
@pytest.mark.parametrize("name", tiered(CASES, ("tanh",)))
def test_four_index_fields_match_monte_carlo(name):
    """V, A, D, B, P and Q on three and four distinct inputs against Monte Carlo:
    ``measure(..., full=True, dntk=True)`` (the dNTK by automatic differentiation of the
    networks: for relu the pointwise derivative, hence ``kinks="pointwise"`` in the
    prediction) over MC_NETWORKS networks at each of MC_WIDTHS, extrapolated by the weighted
    fit ``n E = a + b / n`` (the 1/n coefficient is what the flow predicts; narrow widths carry
    O(1/n^2) terms of 10-30%), equals the prediction entry by entry (``_check_fit``)."""
    runs = []
    with jax.enable_x64(True), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the fixed point's accuracy (unused here)
        for i, n in enumerate(MC_WIDTHS):
            runs.append(
                rgnn.measure(
                    _arch(name, n),
                    _x(4),
                    n_networks=MC_NETWORKS,
                    key=jax.random.key(40 + i),
                    dntk=True,
                    full=True,
                    batch_size=MC_NETWORKS,
                )
            )
    _check_fit(name, runs, NTK_FIELDS + DNTK_FIELDS, MC_WIDTHS)


DDNTK_WIDTHS = (16, 32, 64)
DDNTK_NETWORKS = 256


def test_ddntk_matches_monte_carlo_gelu():
    """R, S, T, U of gelu on three distinct inputs (every entry has all three): ``measure(...,
    full=True, ddntk=True)`` (third derivatives and Hessian products of the networks by
    automatic differentiation) over DDNTK_NETWORKS networks at each of DDNTK_WIDTHS, against
    the prediction by the same fit (``_check_fit``)."""
    runs = []
    with jax.enable_x64(True), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the fixed point's accuracy (unused here)
        for i, n in enumerate(DDNTK_WIDTHS):
            runs.append(
                rgnn.measure(
                    _arch("gelu", n),
                    _x(3),
                    n_networks=DDNTK_NETWORKS,
                    key=jax.random.key(70 + i),
                    ntk=False,
                    ddntk=True,
                    full=True,
                    batch_size=DDNTK_NETWORKS,
                )
            )
    _check_fit("gelu", runs, DDNTK_FIELDS, DDNTK_WIDTHS, n_inputs=3)
