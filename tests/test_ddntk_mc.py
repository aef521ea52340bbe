"""Monte Carlo estimates of the ddNTK means R, S, T, U (PDLT ch. infinity) from
``measure(..., ddntk=True)``: against brute-force third derivatives of tiny networks, the
identity that ties them to the second derivative of the NTK, the exact zeros of linear layers
and the exact per-network symmetries of the estimators."""

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import rgnn
from rgnn.empirical import DNTK_UNITS
from rgnn.networks import ensemble
from tests.test_perturbative import _inputs
from tests.tolerances import EXACT, tol

FIELDS = ("ddntk_r", "ddntk_s", "ddntk_t", "ddntk_u")
# one output unit: the output layer has no unit pair (NaN); layers 1 and 2 are checked
TINY = rgnn.MLP(2, 3, "tanh", weight_var=1.5, bias_var=0.2, out_dim=1)
N_TINY = 4


def _brute_force(graphdef, state, x, layer, units):
    """Full ``ddI``, ``ddII`` and ``D^2 H[g, g]`` tensors of layer ``layer`` of one network by
    ``jax.jacfwd`` / ``jax.hessian`` over the flattened parameters; rows ``(a, i)``."""
    flat, unravel = jax.flatten_util.ravel_pytree(state)

    def z(theta):
        return nnx.merge(graphdef, unravel(theta)).preactivations(x)[layer][:, :units].reshape(-1)

    def ntk(theta):
        jac = jax.jacfwd(z)(theta)
        return jac @ jac.T

    jac = jax.jacfwd(z)(flat)
    hess = jax.hessian(z)(flat)
    third = jax.jacfwd(jax.hessian(z))(flat)
    dd1 = jnp.einsum("xmnr,ym,zn,wr->xyzw", third, jac, jac, jac)
    dd2 = jnp.einsum("xmn,ymr,zn,wr->xyzw", hess, hess, jac, jac)
    d2h = jnp.einsum("yzmn,xm,wn->yzxw", jax.hessian(ntk)(flat), jac, jac)
    return dd1, dd2, d2h


def _estimators(dd1, dd2, n, units, width):
    """The four unit-pair averages from the full tensors (written independently of the
    library's contractions): ``[N, N, N, N]`` each."""
    shape = (n, units) * 4
    dd1, dd2 = dd1.reshape(shape), dd2.reshape(shape)
    off = (1.0 - np.eye(units)) * width / (units * (units - 1))
    r = np.einsum("aibicjdj,ij->abcd", dd1, off)  # ddI_{i i j j; a0 a1 a2 a3}
    s = np.einsum("aibicjdj,ij->abcd", dd2, off)  # ddII_{i i j j; a1 a2 a3 a4}
    # T_{a1 a3 a4 a2} = ddII_{i j i j; a1 a2 a3 a4}: T[b0, b1, b2, b3] at (b0, b3, b1, b2)
    t = np.einsum("aidjbicj,ij->abcd", dd2, off)
    # U_{a1 a4 a2 a3} = ddII_{i j j i; a1 a2 a3 a4}: U[b0, b1, b2, b3] at (b0, b2, b3, b1)
    u = np.einsum("aicjdjbi,ij->abcd", dd2, off)
    return r, s, t, u


def _pair(full, a, b):
    """``[N, N, N, N]`` -> the ``[2, 2, 2, 2]`` components of the pair ``(a, b)``."""
    sel = (a, b)
    out = np.empty((2, 2, 2, 2))
    for c in np.ndindex(2, 2, 2, 2):
        out[c] = full[tuple(sel[k] for k in c)]
    return out


@pytest.fixture(scope="module")
def tiny():
    """The tiny tanh network's measurement and the brute-force tensors of the same networks."""
    with jax.enable_x64(True):
        x = jnp.asarray(_inputs(2, dim=2))
        key = jax.random.key(5)
        meas = rgnn.measure(TINY, x, n_networks=N_TINY, key=key, ntk=False, ddntk=True)
        # measure draws its first batch from fold_in(key, 0)
        ens = ensemble(TINY, 2, n_networks=N_TINY, key=jax.random.fold_in(key, 0), dtype=x.dtype)
        dims = TINY.layer_dims(2)
        brute = []
        for layer in range(len(dims) - 2):
            units = min(DNTK_UNITS, dims[layer + 1])
            per_net = []
            for k in range(N_TINY):
                state = jax.tree_util.tree_map(lambda a, k=k: a[k], ens.state)
                dd1, dd2, d2h = jax.jit(_brute_force, static_argnums=(0, 3, 4))(
                    ens.graphdef, state, x, layer, units
                )
                per_net.append((np.asarray(dd1), np.asarray(dd2), np.asarray(d2h), units))
            brute.append((dims[layer], per_net))
        return x, meas, brute


def test_second_derivative_of_the_ntk(tiny):
    """Differentiating H_{23} = sum_mu dz_2/dth_mu dz_3/dth_mu twice, along g_0 then g_1:
    D^2 H_{23}[g_0, g_1] = ddI_{2 3 0 1} + ddI_{3 2 0 1} + ddII_{2 3 0 1} + ddII_{2 3 1 0}
    (third derivative of either factor, or one Hessian on each), for every row of every layer
    of each network; and ddI is symmetric in its last three slots."""
    _, _, brute = tiny
    for _, per_net in brute:
        for dd1, dd2, d2h, _ in per_net:
            want = dd1 + dd1.transpose(1, 0, 2, 3) + dd2 + dd2.transpose(0, 1, 3, 2)
            np.testing.assert_allclose(d2h, want, rtol=1e-10, atol=1e-10)
            for perm in ((0, 2, 1, 3), (0, 1, 3, 2), (0, 3, 2, 1)):
                np.testing.assert_allclose(dd1, dd1.transpose(perm), rtol=1e-10, atol=1e-12)


def test_estimators_match_brute_force(tiny):
    """measure's R, S, T, U (nested JVPs and Hessian-vector products) are, entry by entry in the
    pair layout, n_{l-1} times the unit-pair averages of the brute-force ddI and ddII tensors of
    the same networks; layer 1 is exactly zero; float64 is preserved."""
    x, meas, brute = tiny
    n = x.shape[0]
    for layer, (width, per_net) in enumerate(brute):
        est = np.mean(
            [_estimators(dd1, dd2, n, units, width) for dd1, dd2, _, units in per_net], axis=0
        )
        for f, want in zip(FIELDS, est, strict=True):
            got = getattr(meas, f)[layer]
            assert got.shape == (n, n, 2, 2, 2, 2) and got.dtype == np.float64
            for a in range(n):
                for b in range(n):
                    np.testing.assert_allclose(got[a, b], _pair(want, a, b), rtol=1e-10, atol=1e-10)
            if layer == 0:
                np.testing.assert_array_equal(got, 0.0)
        # the fluctuation across the 4 networks is real (a standard error, not a copy)
        assert np.all(np.isfinite(meas.ddntk_s_se[layer]))
    assert np.abs(meas.ddntk_r[1]).max() > 1e-3 and np.abs(meas.ddntk_u[1]).max() > 1e-3


def test_exact_symmetries_per_network(tiny):
    """Exact per network (so exactly for the Monte Carlo means): R_{a0 a1 a2 a3} =
    R_{a0 a1 a3 a2} (D^3 z is symmetric), and from ddII_{i1 i2 i3 i4; a1 a2 a3 a4} =
    ddII_{i2 i1 i4 i3; a2 a1 a4 a3} (a transpose) with the sum over ordered unit pairs:
    S_{a1 a2 a3 a4} = S_{a2 a1 a4 a3}, T_{a0 a1 a2 a3} = T_{a3 a2 a1 a0},
    U_{a0 a1 a2 a3} = U_{a2 a3 a0 a1}; swapping the pair (a, b) swaps the slots."""
    x, meas, _ = tiny
    n = x.shape[0]
    perms = {
        "ddntk_r": (0, 1, 3, 2),
        "ddntk_s": (1, 0, 3, 2),
        "ddntk_t": (3, 2, 1, 0),
        "ddntk_u": (2, 3, 0, 1),
    }
    for f, perm in perms.items():
        v = getattr(meas, f)
        for layer in range(v.shape[0] - 1):
            for a in range(n):
                for b in range(n):
                    c = v[layer, a, b]
                    np.testing.assert_allclose(c, c.transpose(perm), **tol(EXACT, c.dtype))
                    swapped = v[layer, b, a][::-1, ::-1, ::-1, ::-1]  # slot k -> 1 - k
                    np.testing.assert_allclose(c, swapped, **tol(EXACT, c.dtype))


def test_deep_linear_zeros(x64):
    """A deep linear network (C_b = 0) is multilinear in the layer weights: z^(1) is linear, so
    R, S, T, U vanish on layer 1, and z^(2) is bilinear, so D^3 z^(2) = 0 and R^(2) = 0
    exactly; the Hessians are not zero (S^(2) != 0) and neither is D^3 z^(3) (R^(3) != 0)."""
    arch = rgnn.MLP(2, 6, "linear", weight_var=1.0, bias_var=0.0, out_dim=3)
    x = jnp.asarray(_inputs(2, dim=4))
    meas = rgnn.measure(arch, x, n_networks=4, key=jax.random.key(2), ntk=False, ddntk=True)
    for f in FIELDS:
        np.testing.assert_array_equal(getattr(meas, f)[0], 0.0)
        np.testing.assert_array_equal(getattr(meas, f + "_se")[0], 0.0)
    np.testing.assert_array_equal(meas.ddntk_r[1], 0.0)
    assert np.abs(meas.ddntk_s[1]).min() > 1e-3
    assert np.abs(meas.ddntk_r[2]).max() > 1e-3


def test_off_by_default_and_narrow_layers(tiny):
    """Without ddntk=True the fields are None; a layer of one unit has no pair (NaN)."""
    x, meas, _ = tiny
    for f in FIELDS:
        assert np.all(np.isnan(getattr(meas, f)[-1]))
        assert np.all(np.isnan(getattr(meas, f + "_se")[-1]))
        assert np.all(np.isfinite(getattr(meas, f)[:-1]))
    with jax.enable_x64(True):
        off = rgnn.measure(TINY, x, n_networks=N_TINY, key=jax.random.key(0), ntk=False)
    assert all(getattr(off, f) is None and getattr(off, f + "_se") is None for f in FIELDS)
