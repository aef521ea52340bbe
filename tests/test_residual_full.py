"""The full four-index layout of a nonlinear residual MLP (``rgnn.perturbative(..., full=True)``
with ``shortcut=...``): the cross-layer moments of a set of three or four inputs from the
4-variable integrals of its pairs (rgnn._residual_multi, "Sets of three and four inputs"), the
full fields against the pair layout, the plain engine (gamma = 0) and the exact linear rules."""

import jax.numpy as jnp
import numpy as np
import pytest

import rgnn
from rgnn import _residual_multi as rm
from rgnn import gaussian
from rgnn.activations import get_activation
from rgnn.flow import moments as flow_moments
from tests.tolerances import EXACT, tol


def _kernels(m, g, seed=0):
    """Two positive-definite ``[m, m]`` kernels ``K^(i)``, ``K^(r)`` with ``K^(r) - g^2 K^(i)``
    positive definite (one unit's chain from layer ``i`` to layer ``r``)."""
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=(2, m, 6))
    ki = a @ a.T / 6 + 0.2 * np.eye(m)
    kr = g * g * ki + b @ b.T / 6 + 0.1 * np.eye(m)
    return jnp.asarray(ki), jnp.asarray(kr)


# A polynomial activation makes every cross-layer moment a Gaussian moment of a polynomial:
# Gauss-Hermite with n nodes integrates degree 2n - 1 per dimension exactly, so the 2m-variable
# rule and the pairs' 4-variable rules both give the exact value (to rounding). Four inputs
# (disjoint pairs among the combinations) with a quadratic at 5 nodes; three inputs with a cubic
# at 7 nodes (sigma''' != 0: the ddNTK's r = s''' s' and c = s'' s'' kinds are live).
# The kernel side and the ddNTK family on four inputs (12 s and 20 s) in the slow tier (the
# suite's time): three inputs check every family with every kind live, the NTK side four.
@pytest.mark.parametrize(
    ("family", "m", "coefs", "nodes"),
    [
        pytest.param("kernel", 4, (1.0, 0.3, 0.0), 5, marks=pytest.mark.slow),
        ("ntk", 4, (1.0, 0.3, 0.0), 5),
        pytest.param("ddntk", 4, (1.0, 0.3, 0.0), 5, marks=pytest.mark.slow),
        ("kernel", 3, (1.0, 0.3, -0.1), 7),
        ("ntk", 3, (1.0, 0.3, -0.1), 7),
        ("ddntk", 3, (1.0, 0.3, -0.1), 7),
    ],
)
def test_pair_restricted_cross_moments_are_the_full_rule(x64, family, m, coefs, nodes):
    """Every cross-layer table of a set of m inputs (kernel side, NTK side, dNTK, ddNTK) from
    the pairs' 4-variable rules (member on a pair w, anchor on a pair v, X_w = M Y_v + e) equals
    the 2m-variable tensor rule of the whole set, for a polynomial activation (both exact): EXACT
    relative to the table's largest entry."""
    c1, c2, c3 = coefs
    act = get_activation(lambda z: c1 * z + c2 * z**2 + c3 * z**3)
    g = 0.7
    ki, kr = _kernels(m, g)
    x, w = gaussian.hermite_rule(nodes, jnp.float64, rule="hermite")
    if family == "kernel":
        run = lambda r: rm._cross_layer(act, ki, kr, g, x, w, restrict=r)  # noqa: E731
    elif family == "ntk":
        run = lambda r: rm._ntk_cross(act, ki, kr, g, x, w, restrict=r)  # noqa: E731
    else:
        table = rm._DDNTK_KINDS if family == "ddntk" else rm._DNTK_KINDS
        rules = flow_moments.rules(48, 192, 12, jnp.float64)
        same, _, _ = rm._dntk_same(act, ki, rules, False, table)
        run = lambda r: rm._dntk_cross(act, ki, kr, g, x, w, same, False, table, restrict=r)  # noqa: E731
    full, pairs = np.asarray(run(False)), np.asarray(run(True))
    assert full.shape == pairs.shape
    scale = np.abs(full).max()
    assert scale > 0
    np.testing.assert_allclose(pairs, full, rtol=0, atol=tol(EXACT, jnp.float64)["rtol"] * scale)


def _inputs(n, n0=5, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, n0))
    return x / np.sqrt(np.mean(x**2, axis=1, keepdims=True)) * np.linspace(0.7, 1.2, n)[:, None]


def _cubic(z):
    return z + 0.3 * z**2 - 0.1 * z**3


_PAIR_SLOTS = [(0, 0), (0, 1), (1, 1)]  # the pair layout's (aa, ab, bb) components


def _pair_view(name, full, i, j):
    """The pair layout's entry ``(i, j)`` (``i != j``) of field ``name`` from its full layout."""
    ij = np.array([i, j])
    if name in ("nngp_correction", "nngp_variance", "ntk_correction", "ntk_variance"):
        return full[:, i, j]
    if name == "kurtosis":
        return full[:, i]
    if name in ("vertex", "ntk_vertex", "mixed_vertex"):
        s = _PAIR_SLOTS
        return np.stack(
            [
                np.stack([full[:, *ij[list(s[u])], *ij[list(s[v])]] for v in range(3)], -1)
                for u in range(3)
            ],
            -2,
        )
    if name == "ntk_b":
        return np.stack([full[:, i, i, j, j], full[:, i, j, j, i]], -1)
    out = np.zeros(full.shape[:1] + (2,) * 4)
    for c in np.ndindex(2, 2, 2, 2):
        out[(slice(None),) + c] = full[(slice(None),) + tuple(ij[list(c)])]
    return out


_KERNEL = ("vertex", "nngp_correction", "nngp_variance", "kurtosis")
_NTK = ("ntk_correction", "ntk_variance", "ntk_vertex", "mixed_vertex", "ntk_b")
_DNTK = ("dntk_p", "dntk_q")
_DDNTK = ("ddntk_r", "ddntk_s", "ddntk_t", "ddntk_u")


# the slow tier (a compilation of the full layout each, 24 s for the kernel side): the default
# run checks the full layout against the plain engine (gamma = 0) and its cross-layer moments
# against the whole set's rule
@pytest.mark.slow
@pytest.mark.parametrize("stats", ["kernel", "ntk", "ddntk"])
def test_full_layout_on_one_pair_is_the_pair_layout(x64, stats):
    """full=True on three inputs (one set of three: every cross-layer table from the pairs'
    4-variable rules) restricted to the components of each pair equals the pair layout, for a
    polynomial activation (every cross-layer rule exact, both layouts the same numbers): EXACT,
    on the kernel side, the NTK side and (slow tier) the dNTK and the ddNTK. With tanh or gelu
    the two differ by the cross-layer rule's error (20 nodes: gelu 1e-5, converging with the
    nodes: the single-input moments of one input come from different pairs' rules)."""
    arch = rgnn.MLP(2, 64, _cubic, weight_var=0.8, bias_var=0.1, shortcut=0.8, branch=0.6)
    x = _inputs(3)
    kw = dict(ntk=stats != "kernel", ddntk=stats == "ddntk", warn=False)
    full = rgnn.perturbative(arch, x, full=True, **kw)
    pair = rgnn.perturbative(arch, x, **kw)
    names = (
        _KERNEL + (_NTK if stats != "kernel" else ()) + (_DNTK + _DDNTK if stats == "ddntk" else ())
    )
    rtol = tol(EXACT, jnp.float64)["rtol"]
    for name in names:
        a, b = np.asarray(getattr(full, name)), np.asarray(getattr(pair, name))
        assert a.shape[1:] == (3,) * (4 if b.ndim > 3 else b.ndim - 1), name
        scale = np.abs(b).max()
        assert scale > 0, name
        for i, j in ((0, 1), (0, 2), (1, 2), (2, 1)):
            np.testing.assert_allclose(
                _pair_view(name, a, i, j),
                b[:, i, j] if b.ndim > 2 else b[:, i],
                rtol=0,
                atol=rtol * scale,
                err_msg=f"{name} {(i, j)}",
            )


@pytest.mark.parametrize(
    ("activation", "stats", "n"),
    [("gelu", "kernel", 3), pytest.param("tanh", "ddntk", 4, marks=pytest.mark.slow)],
)
def test_trivial_shortcut_full_layout_is_the_plain_engine(x64, activation, stats, n):
    """gamma = 0, xi = 1 on three (default run) and four inputs: full=True of a residual MLP
    (every shortcut product vanishes: the cross-layer moments drop out, exactly, as each pair
    combination's covariance is taken from its own rule) equals the plain engine's full layout
    on every field, through the public API, both with the same rules (the same-layer moments
    on three and four inputs from rgnn.flow.moments.Moments, the plain engine's): QUADRATURE
    (two quadratures of the kernel maps' derivatives)."""
    from tests.tolerances import QUADRATURE

    x = _inputs(n)
    kw = dict(weight_var=1.0, bias_var=0.1)
    run = dict(ntk=stats != "kernel", ddntk=stats == "ddntk", warn=False, full=True)
    if stats == "ddntk":
        # both at 96 nodes of the two-input rule (at 48 the dNTK carries the two codes' different
        # uses of that rule, 6e-8 of P; as the pair layout's check in tests/test_residual.py)
        run.update(kinks="pointwise", quadrature_order=96, quadrature_order_multi=48)
    plain = rgnn.perturbative(rgnn.MLP(2, 64, activation, **kw), x, **run)
    res = rgnn.perturbative(rgnn.MLP(2, 64, activation, shortcut=0.0, branch=1.0, **kw), x, **run)
    names = _KERNEL + ("coupling",)
    if stats != "kernel":
        names += ("ntk",) + _NTK + _DNTK + _DDNTK
    rtol = tol(QUADRATURE, jnp.float64)["rtol"]
    for name in names:
        a, b = np.asarray(getattr(res, name)), np.asarray(getattr(plain, name))
        assert a.shape == b.shape, name
        scale = np.abs(b).max()
        if name in ("nngp_correction", "ntk_correction"):
            kernel = plain.nngp if name == "nngp_correction" else plain.ntk
            scale = max(scale, np.abs(np.asarray(kernel)).max() / 64)
        np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * scale, err_msg=name)


# the slow tier (the suite's time, 21 s): exact, like the plain-engine check in the default run
@pytest.mark.slow
@pytest.mark.parametrize(("stats"), ["kernel", "ddntk"])
def test_full_layout_of_a_linear_activation_is_the_residual_rules(x64, stats):
    """The full layout of the set flows (every cross-layer table of a set of four from its
    pairs) run on the identity as a custom smooth activation (the built-in "linear" takes the
    exact rules) equals the exact full layout of the residual rules of rgnn.flow.rules on every
    field (every moment a polynomial times a Gaussian, integrated exactly): EXACT."""
    kw = dict(weight_var=0.9, bias_var=0.2, shortcut=0.9, branch=0.5)
    x = _inputs(4)
    ntk, ddntk = stats != "kernel", stats == "ddntk"
    run = dict(ntk=ntk, ddntk=ddntk, full=True, warn=False)
    ref = rgnn.perturbative(rgnn.MLP(2, 40, "linear", **kw), x, **run)
    got = rgnn.perturbative(rgnn.MLP(2, 40, lambda z: 1.0 * z, **kw), x, **run)
    names = _KERNEL + ("coupling",) + ((_NTK + _DNTK + _DDNTK) if ntk else ())
    rtol = tol(EXACT, jnp.float64)["rtol"]
    for name in names:
        a, b = np.asarray(getattr(got, name)), np.asarray(getattr(ref, name))
        scale = np.abs(b).max()
        if name in ("nngp_correction", "ntk_correction"):
            kernel = ref.nngp if name == "nngp_correction" else ref.ntk
            scale = max(scale, np.abs(np.asarray(kernel)).max())
        np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * scale, err_msg=name)


def test_full_layout_refusals_name_the_argument(x64):
    """Kinked activations keep the pair layout (full=True refused, naming ``full``); a ddNTK
    request whose tables of one set of four exceed memory_limit is refused before anything
    runs, naming ``x`` (float64: depth 5 needs about 15 GiB)."""
    x = _inputs(4)
    with pytest.raises(ValueError, match=r"full: the full four-index layout .* smooth"):
        rgnn.perturbative(rgnn.MLP(3, 8, "relu", shortcut=0.5), x, full=True)
    deep = rgnn.MLP(5, 8, "tanh", shortcut=0.5)
    with pytest.raises(ValueError, match=r"x: 4 inputs over 6 layers need about .* GiB"):
        rgnn.perturbative(deep, x, full=True, ddntk=True)
