"""The full four-index layout of a nonlinear residual MLP (``rgnn.perturbative(..., full=True)``
with ``shortcut=...``): the cross-layer moments of a set of three or four inputs from the
4-variable integrals of its pairs (rgnn._residual_multi, "Sets of three and four inputs"), the
full fields against the pair layout, the plain engine (gamma = 0) and the exact linear rules."""

import jax.numpy as jnp
import numpy as np
import pytest

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
@pytest.mark.parametrize("family", ["kernel", "ntk", "ddntk"])
@pytest.mark.parametrize(
    ("m", "coefs", "nodes"), [(4, (1.0, 0.3, 0.0), 5), (3, (1.0, 0.3, -0.1), 7)]
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
