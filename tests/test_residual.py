"""Residual MLPs (PDLT appendix B): the spec, finite networks, empirical kernels, training and
the fixed point (native against neural-tangents' FanOut/parallel/FanInSum blocks)."""

import math
import warnings
from functools import partial

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import rgnn
from rgnn.fixed_point import diag_maps
from tests.tiers import tiered
from tests.tolerances import EXACT, tol


def _inputs(n=3, n0=5, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, n0))
    return x / np.sqrt(np.mean(x**2, axis=1, keepdims=True)) * np.linspace(0.7, 1.2, n)[:, None]


# ----------------------------------------------------------------------------- the spec
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(width=(8, 9, 8), shortcut=0.5), "width: a residual MLP"),
        (dict(shortcut=(0.5,)), r"shortcut: expected one number or one per residual layer"),
        (dict(shortcut=0.5, branch=(1.0, 1.0, 1.0)), r"branch: expected one number or one"),
        (dict(shortcut=math.nan), "shortcut: expected a finite number"),
        (dict(shortcut="a"), "shortcut: expected a finite number"),
        (dict(shortcut=0.5, branch=math.inf), "branch: expected a finite number"),
        (dict(branch=0.5), "branch: a branch weight needs a residual shortcut"),
        (dict(shortcut=0.5, parameterization="mup"), "shortcut: residual MLPs are supported"),
    ],
)
def test_bad_residual_spec_names_the_argument(kwargs, match):
    kwargs = dict(dict(depth=3, width=8), **kwargs)
    with pytest.raises(ValueError, match=match):
        rgnn.MLP(**kwargs)


def test_residual_factors_per_layer():
    arch = rgnn.MLP(3, 8, shortcut=(0.5, 0.25), branch=0.75)
    assert arch.is_residual
    assert arch.residual() == ((0.0, 0.5, 0.25, 0.0), (1.0, 0.75, 0.75, 1.0))
    assert rgnn.MLP(3, 8).residual() == ((0.0,) * 4, (1.0,) * 4)
    assert not rgnn.MLP(1, 8, shortcut=0.5).is_residual  # no hidden-to-hidden layer
    rec = arch.recursion(5)
    assert rec.shortcut == (0.0, 0.5, 0.25, 0.0) and rec.branch == (1.0, 0.75, 0.75, 1.0)
    assert rgnn.MLP(3, 8).recursion(5).shortcut is None
    hash(arch)  # a static jit argument


# ----------------------------------------------------------------------------- finite networks
def test_forward_pass_is_the_residual_recursion(x64):
    arch = rgnn.MLP(3, 6, "tanh", bias_var=0.2, shortcut=(0.5, -0.3), branch=(0.8, 1.3))
    x = _inputs()
    net = arch.network(5, rngs=nnx.Rngs(3))
    zs = net.preactivations(jnp.asarray(x))
    plain = rgnn.MLP(3, 6, "tanh", bias_var=0.2).network(5, rngs=nnx.Rngs(3))
    z = plain.layers[0](x)
    np.testing.assert_array_equal(zs[0], z)
    for k, (g, xi) in enumerate([(0.5, 0.8), (-0.3, 1.3)], start=1):
        z = xi * plain.layers[k](jnp.tanh(z)) + g * z
        np.testing.assert_allclose(zs[k], z, **tol(EXACT, jnp.float64))
    np.testing.assert_allclose(zs[3], plain.layers[3](jnp.tanh(z)), **tol(EXACT, jnp.float64))
    # gamma = 0, xi = 1 is the plain network, bit for bit
    same = rgnn.MLP(3, 6, "tanh", bias_var=0.2, shortcut=0.0, branch=1.0).network(
        5, rngs=nnx.Rngs(3)
    )
    x = jnp.asarray(x)
    for a, b in zip(same.preactivations(x), plain.preactivations(x), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("parameterization", ["ntk", "standard"])
@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_structural_ntk_equals_jacobian_ntk(x64, activation, parameterization):
    """The empirical NTK from the layer structure equals J J^T of the flattened parameters
    (three outputs: the plain output layer passes no shortcut down)."""
    arch = rgnn.MLP(
        3,
        7,
        activation,
        bias_var=0.1,
        shortcut=(0.8, -0.4),
        branch=(0.5, 1.2),
        parameterization=parameterization,
        out_dim=3,
    )
    x = _inputs()
    net = arch.network(5, rngs=nnx.Rngs(1))
    theta = rgnn.empirical_ntk(net, x, unit=2)
    graphdef, state = nnx.split(net)
    flat, unravel = jax.flatten_util.ravel_pytree(state)
    for layer in range(arch.n_layers):

        def z(p, layer=layer):
            return nnx.merge(graphdef, unravel(p)).preactivations(jnp.asarray(x))[layer][:, 2 % 7]

        jac = jax.jacobian(z)(flat)
        np.testing.assert_allclose(theta[layer], jac @ jac.T, **tol(EXACT, jnp.float64))


def test_ensemble_and_training_accept_a_residual_mlp(x64):
    """An ensemble's NTK is its members' NTK; training records it at step 0 and lowers the loss."""
    arch = rgnn.MLP(2, 16, "relu", weight_var=1.5, shortcut=0.7, branch=0.6)
    x, y = rgnn.data.teacher_student(6, 4, seed=0)
    ens = rgnn.ensemble(arch, 4, n_networks=3, key=jax.random.key(0))
    ntk = rgnn.empirical_ntk(ens, x)
    np.testing.assert_allclose(
        ntk[1], rgnn.empirical_ntk(ens.member(1), x), **tol(EXACT, jnp.float64)
    )
    run = rgnn.train(arch, x, y, steps=20, learning_rate=0.1, n_networks=3, key=jax.random.key(0))
    np.testing.assert_allclose(
        run.ntk[0], rgnn.empirical_ntk(run.initial, x), **tol(EXACT, jnp.float64)
    )
    assert np.all(np.asarray(run.loss[-1]) < np.asarray(run.loss[0]))


# ----------------------------------------------------------------------------- fixed point
@pytest.mark.parametrize("parameterization", ["ntk", "standard"])
@pytest.mark.parametrize("activation", ["relu", "erf", "gelu", "tanh"])
def test_native_fixed_point_equals_neural_tangents(x64, activation, parameterization):
    """Native == neural-tangents' FanOut/parallel/FanInSum residual blocks to 1e-9, per layer.

    tanh has no closed form in neural-tangents: its Gauss-Hermite rule at 256 nodes is
    converged for these O(1) kernels (as in tests/test_fixed_point.py)."""
    arch = rgnn.MLP(
        4,
        32,
        activation,
        weight_var=1.4,
        bias_var=0.2,
        shortcut=(0.9, 0.5, -0.7),
        branch=(0.6, 1.1, 0.8),
        parameterization=parameterization,
    )
    x1, x2 = _inputs(4, seed=1), _inputs(3, seed=2)
    for other in (None, x2):
        fp = rgnn.fixed_point(arch, x1, other, rtol=math.inf)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # ElementwiseNumerical's notice
            ref = rgnn.fixed_point(
                arch, x1, other, backend="neural_tangents", quadrature_order=256, rtol=math.inf
            )
        for name in ("nngp", "ntk", "nngp_diag1", "nngp_diag2"):
            np.testing.assert_allclose(
                getattr(fp, name), getattr(ref, name), **tol(EXACT, jnp.float64), err_msg=name
            )


def test_trivial_shortcut_is_the_plain_fixed_point_to_a_few_ulps(x64):
    """gamma = 0, xi = 1 is the plain recursion: the same arithmetic (the residual update is
    ``1 * new + 0 * old``), in a separately compiled program, where XLA may fuse and order the
    quadrature sums differently: equal to 16 ulps (measured: at most 1 ulp; bit for bit while
    C_W and C_b were compile-time constants)."""
    x = _inputs(4)
    ulps = 16 * np.finfo(np.float64).eps
    for act in ("relu", "tanh"):
        plain = rgnn.fixed_point(rgnn.MLP(3, 8, act, bias_var=0.1), x)
        res = rgnn.fixed_point(rgnn.MLP(3, 8, act, bias_var=0.1, shortcut=0.0, branch=1.0), x)
        for name in ("nngp", "ntk", "nngp_diag1"):
            np.testing.assert_allclose(getattr(plain, name), getattr(res, name), rtol=ulps, atol=0)


def test_linear_residual_fixed_point_closed_form(x64):
    """Linear activation: K^(l) = C_b sum_k xi_k^2 prod_{m>k} gamma_m^2 + prod(...) K^(1),
    i.e. K^(l+1) = xi^2 (C_b + C_W K^(l)) + gamma^2 K^(l) solved layer by layer in NumPy;
    the NTK alike with lambda's."""
    arch = rgnn.MLP(5, 8, "linear", weight_var=0.9, bias_var=0.3, shortcut=(1.0, 0.5, 0.9, 0.2))
    x = _inputs(3)
    fp = rgnn.fixed_point(arch, x)
    gamma, xi = arch.residual()
    k = 0.3 + 0.9 * x @ x.T / 5
    t = 0.3 + 0.9 * x @ x.T / 5
    for layer in range(1, arch.n_layers):
        g2, x2 = gamma[layer] ** 2, xi[layer] ** 2
        k, t = x2 * (0.3 + 0.9 * k) + g2 * k, x2 * (0.3 + 0.9 * k + 0.9 * t) + g2 * t
        np.testing.assert_allclose(fp.nngp[layer], k, **tol(EXACT, jnp.float64))
        np.testing.assert_allclose(fp.ntk[layer], t, **tol(EXACT, jnp.float64))


# ----------------------------------------------------------------------------- perturbative
def test_perturbative_refuses_the_underived_statistics():
    arch = rgnn.MLP(3, 8, shortcut=0.5)
    # the ddNTK of relu exists on several inputs too, in the pointwise kink convention only
    with pytest.raises(ValueError, match=r"kinks: the ddNTK means of relu hold products"):
        rgnn.perturbative(arch, _inputs(2), ntk=False, ddntk=True)
    # one input: the whole NTK side, the dNTK and the ddNTK (no warning: warnings are errors)
    p = rgnn.perturbative(arch, _inputs(1), ddntk=True, kinks="pointwise", warn=False)
    for name in ("ntk_correction", "ntk_variance", "ntk_vertex", "mixed_vertex", "ntk_b"):
        assert np.all(np.isfinite(np.asarray(getattr(p, name)))), name
    for name in ("dntk_p", "dntk_q", "ddntk_r", "ddntk_s", "ddntk_t", "ddntk_u"):
        assert getattr(p, name).shape == (4, 1, 1, 2, 2, 2, 2), name
        assert np.all(np.isfinite(np.asarray(getattr(p, name)))), name
    # the dNTK alone: the NTK side is computed for it but not returned
    q = rgnn.perturbative(arch, _inputs(1), ntk=False, dntk=True, kinks="pointwise", warn=False)
    assert q.ntk is None
    np.testing.assert_array_equal(np.asarray(q.dntk_p), np.asarray(p.dntk_p))
    # several inputs with ntk=False: the kernel side only (rgnn._residual_multi; the NTK side,
    # the default, is checked by test_trivial_shortcut_on_several_inputs_is_the_plain_engine)
    p = rgnn.perturbative(arch, _inputs(2), ntk=False, warn=False)
    assert np.all(np.isfinite(np.asarray(p.vertex)))
    for name in ("ntk", "ntk_correction", "ntk_variance", "ntk_vertex", "mixed_vertex", "ntk_b"):
        assert getattr(p, name) is None, name
    with pytest.raises(ValueError, match=r"full: the full four-index layout of a residual MLP"):
        rgnn.perturbative(arch, _inputs(1), ntk=False, full=True)


@pytest.mark.parametrize("activation", ["linear", "relu", "tanh", "gelu"])
def test_trivial_shortcut_is_the_plain_perturbative_flow(x64, activation):
    """gamma = 0, xi = 1 gives the plain MLP's statistics: linear through the flow engine on
    three inputs (to roundoff: the residual program is compiled separately, so XLA may order
    its sums differently; shortcut=None runs the very same program as before), the nonlinear
    activations through the single-input flow of rgnn._residual_single (to the two
    computations' estimated quadrature errors), the dNTK P, Q included, and the ddNTK R, S, T,
    U for linear and tanh (relu and gelu: the slow tier's
    test_single_input_ddntk_of_a_trivial_shortcut_is_the_plain_engine)."""
    linear = activation == "linear"
    x = _inputs(3 if linear else 1)
    # the NTK side and the dNTK; linear and tanh: the ddNTK too (relu: automatic
    # differentiation's kink convention, which the single-input flow follows as the engine)
    dd = activation in ("linear", "tanh")
    kw = dict(ntk=True, dntk=True, ddntk=dd, kinks="pointwise")
    plain = rgnn.perturbative(rgnn.MLP(4, 64, activation, bias_var=0.1), x, **kw)
    trivial = rgnn.MLP(4, 64, activation, bias_var=0.1, shortcut=0.0, branch=1.0)
    res = rgnn.perturbative(trivial, x, **kw)
    rtol = plain.quadrature_error + res.quadrature_error + tol(EXACT, jnp.float64)["rtol"]
    names = ["vertex", "nngp_variance", "kurtosis", "coupling"]
    names += ["ntk_vertex", "mixed_vertex", "ntk_b", "ntk_variance", "dntk_p", "dntk_q"]
    if dd:
        names += ["ddntk_r", "ddntk_s", "ddntk_t", "ddntk_u"]
    for name in names:
        a, b = np.asarray(getattr(res, name)), np.asarray(getattr(plain, name))
        np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * np.abs(b).max(), err_msg=name)
    # the corrections vanish for relu and linear: relative to the kernels they correct
    for name, kernel in (("nngp_correction", "nngp"), ("ntk_correction", "ntk")):
        scale = np.max(np.asarray(getattr(plain, kernel)))
        np.testing.assert_allclose(getattr(res, name), getattr(plain, name), atol=rtol * scale)


# slow tier: the default run checks tanh through rgnn.perturbative
# (test_trivial_shortcut_is_the_plain_perturbative_flow) and the grid's ddNTK against the
# linear residual rules (test_single_input_flow_of_a_linear_residual_mlp_...)
@pytest.mark.slow
@pytest.mark.parametrize("activation", ["relu", "tanh", "gelu"])
def test_single_input_ddntk_of_a_trivial_shortcut_is_the_plain_engine(x64, activation):
    """The ddNTK recursions of the single-input flow (rgnn._residual_single) at gamma = 0,
    xi = 1 equal the flow engine's R, S, T, U of the plain MLP (relu: the pointwise kink
    convention), to the grid's estimated error (1201 vs 801 nodes) plus the engine's: the
    residual-only form J stays zero there."""
    from rgnn._residual_single import single_input_flow

    x = _inputs(1)
    plain = rgnn.perturbative(
        rgnn.MLP(4, 64, activation, bias_var=0.1), x, ddntk=True, kinks="pointwise"
    )
    trivial = rgnn.MLP(4, 64, activation, bias_var=0.1, shortcut=0.0, branch=1.0)
    rec = trivial.recursion(x.shape[1])
    kw = dict(
        ntk=(float(plain.ntk[0, 0, 0]), rec.lambda_b, rec.lambda_w), dntk="pointwise", ddntk=True
    )
    k1 = float(plain.nngp[0, 0, 0])
    fine, coarse = (
        single_input_flow(trivial, k1, **kw),
        single_input_flow(trivial, k1, points=801, **kw),
    )
    for name in ("ddntk_r", "ddntk_s", "ddntk_t", "ddntk_u"):
        ref = np.asarray(getattr(plain, name))[:, 0, 0, 0, 0, 0, 0]
        got = getattr(fine, name)
        scale = np.abs(ref).max()
        if scale == 0:  # relu's R and U (pointwise): zero in both
            np.testing.assert_array_equal(got, 0.0, err_msg=name)
            continue
        grid = np.abs(got - getattr(coarse, name)).max() / scale
        rtol = grid + plain.quadrature_error + tol(EXACT, jnp.float64)["rtol"]
        np.testing.assert_allclose(got, ref, rtol=rtol, atol=rtol * scale, err_msg=name)


def test_deep_linear_residual_vertex_closed_form(x64):
    """Linear activation, full four-index vertex on 3 inputs: with s = xi^2 C_W + gamma^2 the
    residual recursion closes, V' = s^2 V + (s^2 - gamma^4)(K_ac K_bd + K_ad K_bc) (r = 1),
    and the kernel correction vanishes (E z z = K exactly for a linear network). Independent
    derivation: E[z'_ia z'_ib | z] = gamma^2 z_ia z_ib + xi^2 (C_b + C_W zhat_ab) with
    zhat = (1/n) sum_j z_j z_j, whose covariances between units are (KK + V)/n."""
    gamma, xi = (0.9, 0.4, 1.0), (0.5, 1.1, 0.7)
    cw, cb = 0.8, 0.2
    arch = rgnn.MLP(4, 50, "linear", weight_var=cw, bias_var=cb, shortcut=gamma, branch=xi)
    x = _inputs(3)
    p = rgnn.perturbative(arch, x, ntk=False, full=True, warn=False)
    k = np.asarray(p.nngp)
    v = np.zeros((3,) * 4)
    np.testing.assert_array_equal(p.vertex[0], v)
    for layer in range(1, arch.n_layers):
        g, c = arch.residual()[0][layer], arch.residual()[1][layer]
        kk = np.einsum("ac,bd->abcd", k[layer - 1], k[layer - 1])
        kk = kk + kk.transpose(0, 1, 3, 2)
        s = c * c * cw + g * g
        v = s * s * v + (s * s - g**4) * kk  # r = 1 wherever V != 0
        np.testing.assert_allclose(p.vertex[layer], v, **tol(EXACT, jnp.float64))
    np.testing.assert_allclose(p.nngp_correction, 0.0, atol=tol(EXACT, jnp.float64)["atol"])


def _perm(t, s):
    """``result[abcd] = t[s]`` for a four-index array (``s`` the source letters)."""
    return np.einsum(s + "->abcd", t)


def _exact_linear_moments(arch, x, eps):
    """Exact finite-width moments of a deep linear (residual) MLP of equal hidden widths
    ``n = 1 / eps`` on the inputs ``x``, layer by layer (an independent, Monte-Carlo-free
    reference for the NTK-side rules; derived here by Wick's theorem, not from the rules).

    A linear network's preactivations ``z`` and NTK ``H`` of one hidden layer are invariant
    under a common rotation of the units (``W -> O^T W O`` on every hidden layer), so their
    joint fourth moments are three isotropic structures each, exactly at finite ``n``: for
    units ``1 != 2``, ``alpha_{ab,cd} = E[z_1a z_1b z_2c z_2d]``, ``beta1_{ab,cd} =
    E[H_11;ab z_2c z_2d]``, ``beta2_{ab,cd} = E[H_12;ab z_1c z_2d]``, ``gamma1_{ab,cd} =
    E[H_11;ab H_22;cd]``, ``gamma2_{ab,cd} = E[H_12;ab H_12;cd]`` (``E[z_ia z_ib z_ic z_id]``
    is then ``alpha_{ab,cd} + alpha_{ac,bd} + alpha_{ad,bc}``, and so on), plus ``k = E z z`` and
    ``t = E H_ii``. A residual step ``z' = g z + xi (b + W z)``,
    ``H' = xi^2 (lambda_b + lambda_W zhat) + M H M^T``, ``M = xi W + g``, maps them by Gaussian
    averages over ``W`` and ``b`` (units 1, 2 use different rows), unit sums counted exactly
    (``(1/n) sum_k`` of a two-unit moment = the moment plus ``eps`` times its same-unit
    excess). The dNTK-preactivation correlator is isotropic too,
    ``E[dH_{i0 i1 i2; 012} z_{i3; 3}] = d03 d12 p_{0123} + d01 d23 q_{0123} + d02 d13 q_{0213}``;
    ``dH'`` has the three terms of the layer's weights and the lower parameters,
    ``xi^2 (lambda_W / n) [d_{i0 i1} sum z_{k0} M_{i2 l} H_{kl} + (1 <-> 2)
    + d_{i1 i2} sum M_{i0 k} (z_{j1} H_{kj;02} + z_{j2} H_{kj;01})]
    + sum M_{i0 k0} M_{i1 k1} M_{i2 k2} dH_{k0 k1 k2}``, whose products with
    ``z'_{i3} = xi b + sum M_{i3 m} z_m`` average over ``M`` (mean ``g``, two or four entries of
    ``W`` paired) to the ``p, q`` updates below. Returns per layer
    ``(k, t, alpha, beta1, beta2, gamma1, gamma2, p, q)``, complex when ``eps`` is (for the
    complex-step derivative)."""
    fp = rgnn.fixed_point(arch, x)
    k = np.asarray(fp.nngp[0]).astype(complex)
    t = np.asarray(fp.ntk[0]).astype(complex)
    rec = arch.recursion(x.shape[1])
    cw, cb = arch.weight_var, arch.effective_bias_var
    shortcut, branch = arch.residual()
    al, b1, g1 = (np.einsum("ab,cd->abcd", p, q) for p, q in ((k, k), (t, k), (t, t)))
    b2, g2, p, q = (np.zeros_like(al) for _ in range(4))
    out = [(k, t, al, b1, b2, g1, g2, p, q)]
    for layer in range(1, arch.n_layers):
        gg, xx = shortcut[layer] ** 2, branch[layer] ** 2
        lb, lw = rec.lambda_b[layer], rec.lambda_w[layer]
        z1 = al + eps * (_perm(al, "acbd") + _perm(al, "adbc"))  # E[zhat_ab zhat_cd]
        y1 = b1 + eps * (b2 + _perm(b2, "abdc"))  # E[Hbar_ab zhat_cd]
        y2 = b2 + eps * (b1 + _perm(b2, "abdc"))  # (1/n) sum_p E[H_p2;ab z_pc z_2d]
        x1 = g1 + eps * (g2 + _perm(g2, "abdc"))  # E[Hbar_ab Hbar_cd]
        x2 = g2 + eps * (g1 + _perm(g2, "abdc"))  # (1/n) sum_p E[H_p2;ab H_p2;cd]
        kab, kcd, tab, tcd = k[:, :, None, None], k[None, None], t[:, :, None, None], t[None, None]
        zg = cb * kab + cw * z1  # E[z_1a z_1b G_cd]
        gg_ = cb * cb + cb * cw * (kab + kcd) + cw * cw * z1  # E[G_ab G_cd]
        al_new = gg * gg * al + gg * xx * (zg + _perm(zg, "cdab")) + xx * xx * gg_
        pzz = (
            lb * kcd + lw * z1 + cw * y1
        )  # E[P_ab z_2c z_2d], P = lambda_b + lambda_W zhat + C_W Hbar
        pg = lb * cb + lb * cw * kcd + lw * (cb * kab + cw * z1) + cw * (cb * tab + cw * y1)
        b1_new = xx * gg * pzz + xx * xx * pg + gg * gg * b1 + gg * xx * (cb * tab + cw * y1)
        b2_new = (xx * xx * cw * cw + 2 * xx * gg * cw) * y2 + gg * gg * b2
        y1t = _perm(y1, "cdab")
        pp = (
            lb * lb
            + lb * lw * (kab + kcd)
            + lb * cw * (tab + tcd)
            + lw * lw * z1
            + lw * cw * (y1 + y1t)
            + cw * cw * x1
        )
        ph = lb * tcd + lw * y1t + cw * x1 + lb * tab + lw * y1 + cw * x1
        g1_new = xx * xx * pp + xx * gg * ph + gg * gg * g1
        g2_new = (xx * xx * cw * cw + 2 * xx * gg * cw) * x2 + gg * gg * g2
        # the dNTK: E[dH_{i0 i1 i2} z_{i3}] = d03 d12 p + d01 d23 q_{0123} + d02 d13 q_{0213}
        chi = gg + xx * cw
        q2 = _perm(q, "acbd")  # q_{0213}
        p_new = (
            chi * chi * p
            + (chi * chi - gg * gg) * eps * (q + q2)
            + xx * lw * chi * (eps * (b1 + b2 + _perm(b1, "acbd") + _perm(b2, "acbd")))
            + xx * lw * chi * (_perm(b2, "abdc") + _perm(b2, "acdb"))
        )
        q_new = (
            chi * chi * q
            + (chi * chi - gg * gg) * eps * (p + q2)
            + xx * lw * chi * (eps * (_perm(b1, "bcad") + _perm(b2, "bcda")) + _perm(b2, "bcad"))
        )
        t = xx * (lb + lw * k + cw * t) + gg * t
        k = xx * (cb + cw * k) + gg * k
        al, b1, b2, g1, g2, p, q = al_new, b1_new, b2_new, g1_new, g2_new, p_new, q_new
        out.append((k, t, al, b1, b2, g1, g2, p, q))
    return out


def _exact_linear_coefficients(arch, x):
    """The O(1/n) coefficients of :func:`_exact_linear_moments` (a complex-step derivative in
    ``eps`` at 0: exact for these polynomials): ``V, A, D, B, F, DG, DH, P, Q`` per layer, in the
    layouts of the flow engine (``B_{xyzw} = n E[H_12;xz H_12;yw]``, ``F_{xy;cd} =
    n E[H_12;xy z_1c z_2d]``, ``D_{(ab)(cd)} = n Cov(z_1a z_1b, H_22;cd)``)."""
    h = 1e-30
    kk = partial(np.einsum, "ab,cd->abcd")
    f = {name: [] for name in ("V", "A", "D", "B", "F", "DG", "DH", "P", "Q")}
    for k, t, al, b1, b2, g1, g2, p, q in _exact_linear_moments(arch, x, 1j * h):
        f["P"].append(p.imag / h)
        f["Q"].append(q.imag / h)
        f["V"].append((al - kk(k, k)).imag / h)
        f["A"].append((g1 - kk(t, t)).imag / h)
        f["D"].append((_perm(b1, "cdab") - kk(k, t)).imag / h)
        f["B"].append(_perm(g2, "acbd").imag / h)
        f["F"].append(b2.imag / h)
        f["DG"].append(k.imag / h)
        f["DH"].append(t.imag / h)
    return {name: np.stack(v) for name, v in f.items()}


@pytest.mark.parametrize(
    "shortcut, branch, parameterization",
    [(None, 1.0, "ntk"), (0.8, 0.6, "ntk"), ((0.9, -0.4), (0.5, 1.1), "standard")],
)
def test_deep_linear_residual_ntk_side_is_exact(x64, shortcut, branch, parameterization):
    """Linear activation, every four-index field on 3 inputs (and the pair layout): the NTK-side
    residual rules (rgnn.flow.rules, "Residual layers"; the dNTK P, Q included) equal the O(1/n)
    coefficients of the exact finite-width Wick recursion above, to roundoff; so do the NTK variance
    ``(A_abab + B_aabb + B_abba) / n`` and the mean shifts (zero for a linear network). The
    plain MLP (shortcut None) checks the reference against the plain engine."""
    kw = {} if shortcut is None else dict(shortcut=shortcut, branch=branch)
    arch = rgnn.MLP(
        3, 50, "linear", weight_var=0.8, bias_var=0.2, parameterization=parameterization, **kw
    )
    x = _inputs(3)
    ref = _exact_linear_coefficients(arch, x)
    p = rgnn.perturbative(arch, x, full=True, dntk=True, warn=False)
    t = tol(EXACT, jnp.float64)
    for name, key in (
        ("vertex", "V"),
        ("ntk_vertex", "A"),
        ("mixed_vertex", "D"),
        ("ntk_b", "B"),
        ("dntk_p", "P"),
        ("dntk_q", "Q"),
    ):
        got = np.asarray(getattr(p, name))
        np.testing.assert_allclose(
            got, ref[key], rtol=t["rtol"], atol=t["rtol"] * np.abs(ref[key]).max(), err_msg=name
        )
    n = np.asarray(p.widths)[:, None, None]
    var = np.einsum("labab->lab", ref["A"]) + np.einsum("laabb->lab", ref["B"])
    var = var + np.einsum("labba->lab", ref["B"])
    np.testing.assert_allclose(
        p.ntk_variance, var / n, rtol=t["rtol"], atol=t["rtol"] * np.abs(var).max()
    )
    for got, key in ((p.nngp_correction, "DG"), (p.ntk_correction, "DH")):
        np.testing.assert_array_equal(ref[key], 0.0)
        np.testing.assert_allclose(got, 0.0, atol=t["atol"])
    # the pair layout holds the same numbers
    q = rgnn.perturbative(arch, x, warn=False)
    comps = [(0, 0), (0, 1), (1, 1)]
    for a, b in ((0, 1), (0, 2), (1, 2)):
        for name in ("vertex", "ntk_vertex", "mixed_vertex"):
            full = np.asarray(getattr(p, name))
            for i, (u, v) in enumerate(comps):
                for j, (w, z) in enumerate(comps):
                    s = (a, b)
                    np.testing.assert_allclose(
                        np.asarray(getattr(q, name))[:, a, b, i, j],
                        full[:, s[u], s[v], s[w], s[z]],
                        rtol=t["rtol"],
                        atol=t["rtol"] * np.abs(full).max(),
                    )
        np.testing.assert_allclose(q.ntk_b[:, a, b, 0], p.ntk_b[:, a, a, b, b], rtol=t["rtol"])
        np.testing.assert_allclose(q.ntk_b[:, a, b, 1], p.ntk_b[:, a, b, b, a], rtol=t["rtol"])
    np.testing.assert_allclose(q.ntk_variance, p.ntk_variance, rtol=t["rtol"])


@pytest.mark.parametrize(
    "shortcut, branch, parameterization",
    [(0.8, 0.6, "ntk"), ((0.9, -0.4, 1.0), (0.5, 1.1, 0.5), "standard")],
)
def test_single_input_flow_of_a_linear_residual_mlp_is_the_residual_rules(
    x64, shortcut, branch, parameterization
):
    """The single-input grid flow (rgnn._residual_single), which carries the whole two-unit
    correlation, run on a linear activation equals the residual rules of the flow engine (exact
    there by the units' rotation symmetry, and checked against the exact Wick recursion above)
    on every field of one input, the NTK variance, A, B, D, the dNTK P, Q and the ddNTK
    R, S, T, U included, to roundoff: the grid integrates polynomials times Gaussians
    exactly."""
    from rgnn._residual_single import single_input_flow

    arch = rgnn.MLP(
        4,
        50,
        "linear",
        weight_var=0.8,
        bias_var=0.2,
        parameterization=parameterization,
        shortcut=shortcut,
        branch=branch,
    )
    x = _inputs(1)
    p = rgnn.perturbative(arch, x, ddntk=True, warn=False)
    rec = arch.recursion(x.shape[1])
    ntk = (float(p.ntk[0, 0, 0]), rec.lambda_b, rec.lambda_w)
    s = single_input_flow(
        arch, float(p.nngp[0, 0, 0]), points=401, ntk=ntk, dntk="pointwise", ddntk=True
    )
    n = np.asarray(p.widths)
    t = tol(EXACT, jnp.float64)
    for name, ref in (
        ("vertex", np.asarray(p.vertex)[:, 0, 0, 0, 0]),
        ("ntk", np.asarray(p.ntk)[:, 0, 0]),
        ("ntk_variance", np.asarray(p.ntk_variance)[:, 0, 0] * n),
        ("ntk_vertex", np.asarray(p.ntk_vertex)[:, 0, 0, 0, 0]),
        ("mixed_vertex", np.asarray(p.mixed_vertex)[:, 0, 0, 0, 0]),
        ("ntk_b", np.asarray(p.ntk_b)[:, 0, 0, 0]),
        ("dntk_p", np.asarray(p.dntk_p)[:, 0, 0, 0, 0, 0, 0]),
        ("dntk_q", np.asarray(p.dntk_q)[:, 0, 0, 0, 0, 0, 0]),
        ("ddntk_s", np.asarray(p.ddntk_s)[:, 0, 0, 0, 0, 0, 0]),
        ("ddntk_t", np.asarray(p.ddntk_t)[:, 0, 0, 0, 0, 0, 0]),
    ):
        got = getattr(s, name)
        np.testing.assert_allclose(
            got, ref, rtol=t["rtol"], atol=t["rtol"] * np.abs(ref).max(), err_msg=name
        )
    # the mean shifts of a linear network vanish, and so do R and U
    for got, kernel in ((s.nngp_correction, s.nngp), (s.ntk_correction, s.ntk)):
        np.testing.assert_allclose(got, 0.0, atol=t["rtol"] * np.abs(kernel).max())
    for got in (s.ddntk_r, s.ddntk_u):
        np.testing.assert_allclose(got, 0.0, atol=t["rtol"] * np.abs(s.ddntk_s).max())


@pytest.mark.slow  # four grid flows, two of them on 2401 nodes: about 10 s
def test_residual_relu_dntk_kinks_are_the_smooth_limit(x64):
    """The distributional kink convention of the residual dNTK (rgnn._residual_single: the
    delta of relu's s'' held on the grid node at 0) is the limit of smooth activations: the
    single-input flow on softplus(beta z) / beta at beta = 20, 40 (2401 grid nodes, to resolve
    the smooth kink), extrapolated to beta -> oo (Richardson, error O(1/beta)), lands on the
    distributional P, Q within the last step |f(40) - f(20)| (the extrapolation's own error
    estimate), while the pointwise ones (relu''
    = 0) are further off than that on the residual layers 3..L+1, where the shortcut makes the
    delta term ``F(s'' s', .)`` survive (on one input a plain layer's vanishes)."""
    from rgnn._residual_single import single_input_flow

    relu = rgnn.MLP(3, 32, "relu", weight_var=2.0, bias_var=0.1, shortcut=0.8, branch=0.6)
    x = _inputs(1, 4)
    fp = rgnn.fixed_point(relu, x)
    rec = relu.recursion(x.shape[1])
    k1 = float(fp.nngp[0, 0, 0])
    kw = dict(ntk=(float(fp.ntk[0, 0, 0]), rec.lambda_b, rec.lambda_w))
    flows = {m: single_input_flow(relu, k1, dntk=m, **kw) for m in ("distributional", "pointwise")}
    smooth = []
    for beta in (20.0, 40.0):
        act = partial(lambda z, b: jax.nn.softplus(b * z) / b, b=beta)
        arch = rgnn.MLP(3, 32, act, weight_var=2.0, bias_var=0.1, shortcut=0.8, branch=0.6)
        smooth.append(single_input_flow(arch, k1, points=2401, dntk="pointwise", **kw))
    for name in ("dntk_p", "dntk_q"):
        f20, f40 = (getattr(s, name)[2:] for s in smooth)
        limit, step = 2 * f40 - f20, np.abs(f40 - f20)
        assert np.all(np.abs(limit - getattr(flows["distributional"], name)[2:]) < step), name
        assert np.all(np.abs(limit - getattr(flows["pointwise"], name)[2:]) > step), name


def test_deep_linear_residual_f_is_exact(x64):
    """``F`` (internal to the NTK side: it feeds the NTK mean shift and the dNTK) through the
    flow engine's residual rule equals the exact Wick recursion's coefficient."""
    from rgnn.flow.engine import flow
    from rgnn.flow.moments import rules

    arch = rgnn.MLP(
        4,
        50,
        "linear",
        weight_var=0.8,
        bias_var=0.2,
        shortcut=(0.9, 0.3, -0.5),
        branch=(0.5, 1.1, 0.7),
    )
    x = _inputs(3)
    ref = _exact_linear_coefficients(arch, x)
    fp = rgnn.fixed_point(arch, x)
    rec = arch.recursion(x.shape[1])
    dims = np.asarray(arch.layer_dims(x.shape[1]), float)[: arch.n_layers]
    res = tuple(jnp.asarray(v[1:]) for v in arch.residual())
    out, _ = flow(
        arch.act,
        arch.weight_var,
        jnp.asarray(rec.lambda_w[1:]),
        jnp.asarray(dims[1:] / dims[:-1]),
        jnp.asarray(1 / dims[:-1]),
        fp.nngp[:, None],
        fp.ntk[:, None],
        rules(8, 8, 8, jnp.float64),
        stats=("F",),
        residual=res,
    )
    t = tol(EXACT, jnp.float64)
    np.testing.assert_allclose(
        out["F"][:, 0], ref["F"], rtol=t["rtol"], atol=t["rtol"] * np.abs(ref["F"]).max()
    )


def _intercept(widths, y, se):
    """Weighted fit ``y = a + b / n`` per entry (``y, se`` ``[W, ...]``): ``(a, se_a)``."""
    xs = (1 / np.asarray(widths, float)).reshape((-1,) + (1,) * (y.ndim - 1))
    w = 1 / se**2
    s0, s1, s2 = w.sum(0), (w * xs).sum(0), (w * xs * xs).sum(0)
    t0, t1 = (w * y).sum(0), (w * xs * y).sum(0)
    det = s0 * s2 - s1 * s1
    return (s2 * t0 - s1 * t1) / det, np.sqrt(s2 / det)


#: The fields that are a 1/n correction to a kernel (or the variance of one), as the number of
#: their input axes: ``n E`` of them tends to the O(1/n) coefficient; the others (vertices,
#: dNTK, ddNTK) are already ``n`` times a covariance.
_TIMES_WIDTH = {"kurtosis": 1, "nngp_correction": 2, "ntk_variance": 2, "ntk_correction": 2}


def _times_width(name, field, n):
    """``field [L+1, ...]`` times the layer widths ``n [L+1]`` where ``name`` is in
    ``_TIMES_WIDTH``, unchanged otherwise."""
    axes = _TIMES_WIDTH.get(name)
    return field if axes is None else field * np.reshape(n, (-1,) + (1,) * axes)


def _residual_family(activation, weight_var=1.0, *, depth=3, out_dim=1):
    """``width -> rgnn.MLP`` of the Monte Carlo tests across widths: ``bias_var=0.1``,
    ``shortcut=0.8``, ``branch=0.6``."""
    return partial(
        rgnn.MLP,
        depth,
        activation=activation,
        weight_var=weight_var,
        bias_var=0.1,
        shortcut=0.8,
        branch=0.6,
        out_dim=out_dim,
    )


def _measure_across_widths(make, x, widths, names, n_networks, **statistics):
    """``rgnn.measure`` of the networks ``make(width)`` on ``x`` at each width (key
    ``width``; ``statistics`` its keywords): ``{name: (y, se)}``, each ``[W, L, ...]`` on
    layers 2..L+1, times the width where the field is a 1/n correction."""
    out = {name: ([], []) for name in names}
    for width in widths:
        arch = make(width)
        m = rgnn.measure(arch, x, n_networks=n_networks, key=jax.random.key(width), **statistics)
        n = np.asarray(arch.layer_dims(x.shape[1]), float)[:-1]
        for name in names:
            out[name][0].append(_times_width(name, np.asarray(getattr(m, name)), n))
            out[name][1].append(_times_width(name, np.asarray(getattr(m, name + "_se")), n))
    return {k: (np.stack(y)[:, 1:], np.stack(se)[:, 1:]) for k, (y, se) in out.items()}


def _z_scores(widths, y, se, p, name):
    """``(a - prediction) / se_a`` of the weighted fit ``a + b / n`` (:func:`_intercept`) of
    the measured ``y, se [W, L, ...]`` against ``name`` of the :class:`rgnn.Perturbative`
    ``p`` (layers 2..L+1, times the width like the measurement), on the entries that vary
    over networks; an entry that does not vary at any width (for example R on layer 2,
    bilinear in the parameters) has no spread to fit: it must be zero in every network and
    in the prediction (and gets ``z = 0``). Returns ``z [L, ...]``."""
    pred = _times_width(name, np.asarray(getattr(p, name)), np.asarray(p.widths, float))[1:]
    still = np.all(se == 0, axis=0)
    np.testing.assert_array_equal(y[:, still], 0.0)
    np.testing.assert_allclose(pred[still], 0.0, atol=tol(EXACT, jnp.float64)["atol"])
    a, sa = _intercept(widths, y[:, ~still], se[:, ~still])
    z = np.zeros(y.shape[1:])
    z[~still] = (a - pred[~still]) / sa
    return z


def _assert_intercepts(widths, measured, p):
    """Every measured field's intercept within ``MC_SIGMAS`` fit standard errors of ``p``."""
    from tests.tolerances import MC_SIGMAS

    for name, (y, se) in measured.items():
        z = np.abs(_z_scores(widths, y, se, p, name))
        assert np.all(z <= MC_SIGMAS), f"{name}: max |z| = {np.max(z):.2f}"


# tanh in the slow tier: relu and linear stay in the default run
@pytest.mark.parametrize("activation", tiered(["relu", "tanh", "linear"], ("tanh",)))
def test_monte_carlo_vertex_across_widths(x64, activation):
    """rgnn.measure on residual networks of widths 16/32/64 (256 networks each): the weighted
    fit n E = a + b/n of the vertex, n x kurtosis and n x kernel correction has intercepts
    within MC_SIGMAS fit standard errors of the prediction (layers 2..L+1; one input for the
    nonlinear activations, every pair component of two inputs for linear, where the NTK side
    is checked too: A, D, B, n x NTK variance, n x NTK mean shift). The full check at widths
    32/64/128 with 1024 networks and gelu is tools/residual_monte_carlo.py."""
    widths = (16, 32, 64)
    linear = activation == "linear"
    x = _inputs(2 if linear else 1, 4)
    cw = 2.0 if activation == "relu" else 1.0
    names = ["vertex", "kurtosis", "nngp_correction"]
    if linear:
        names += ["ntk_vertex", "mixed_vertex", "ntk_b", "ntk_variance", "ntk_correction"]
    # two outputs: A and B need two different units on every layer
    make = _residual_family(activation, cw, depth=3, out_dim=2 if linear else 1)
    measured = _measure_across_widths(make, x, widths, names, 256, ntk=linear, vertex=True)
    _assert_intercepts(
        widths, measured, rgnn.perturbative(make(widths[-1]), x, ntk=linear, warn=False)
    )


def test_monte_carlo_linear_residual_dntk_ddntk_across_widths(x64):
    """The dNTK correlators P, Q and the ddNTK means R, S, T, U of a linear residual MLP (two
    inputs, every pair component): rgnn.measure at widths 8/16/32 (128 networks each),
    weighted fit a + b/n, intercepts within MC_SIGMAS fit standard errors of rgnn.perturbative
    (layers 2..L+1; R and U vanish for a linear network). Measured fit SE: about 2.5% (P, Q)
    and 1-2% (S, T) of the largest entry. Widths 32/64/128 with 1024 networks:
    tools/residual_monte_carlo.py."""
    widths = (8, 16, 32)
    names = ("dntk_p", "dntk_q", "ddntk_r", "ddntk_s", "ddntk_t", "ddntk_u")
    # three outputs: the statistics need two different units on the output layer too
    make = _residual_family("linear", depth=2, out_dim=3)
    x = _inputs(2, 4)
    measured = _measure_across_widths(make, x, widths, names, 128, ntk=False, dntk=True, ddntk=True)
    _assert_intercepts(
        widths, measured, rgnn.perturbative(make(widths[-1]), x, ntk=False, ddntk=True, warn=False)
    )


@pytest.mark.slow
@pytest.mark.parametrize("activation", ["relu", "gelu", "tanh"])
def test_monte_carlo_nonlinear_residual_dntk_one_input_across_widths(x64, activation):
    """The dNTK correlators P, Q and (gelu, tanh) the ddNTK means R, S, T, U of a nonlinear
    residual MLP on one input (the single-input flow, rgnn._residual_single, U with its
    residual-only form J): rgnn.measure at widths 16/32/64 (512 networks each), weighted fit
    a + b/n, intercepts within MC_SIGMAS fit standard errors of rgnn.perturbative on layers
    2..L+1 (relu in the pointwise kink convention: what automatic differentiation of the
    networks gives; entries that vanish in every network must be predicted zero). tanh at
    depth 4, where U without J is rejected (measured with these networks, layers 3, 4: that
    prediction 3.0 and 5.0 SE below the fit; with J 1.6 and 1.1 SE above); gelu at depth 3,
    where these networks do not separate the two (layer 3: 1.6 SE below, with J 0.8 above).
    Larger runs (widths up to 128, 2048 networks, three residual settings):
    tools/residual_monte_carlo.py --dntk --ddntk."""
    widths = (16, 32, 64)
    x = _inputs(1, 4)
    cw = {"relu": 2.0, "gelu": 1.98, "tanh": 1.0}[activation]
    # the ddNTK on gelu and tanh (relu's R, U vanish in the pointwise convention): its
    # estimators compile for tens of seconds per width
    dd = activation != "relu"
    names = ("dntk_p", "dntk_q") + (("ddntk_r", "ddntk_s", "ddntk_t", "ddntk_u") if dd else ())
    make = _residual_family(activation, cw, depth=4 if activation == "tanh" else 3, out_dim=2)
    measured = _measure_across_widths(make, x, widths, names, 512, ntk=False, dntk=True, ddntk=dd)
    p = rgnn.perturbative(
        make(widths[-1]), x, ntk=False, dntk=True, ddntk=dd, kinks="pointwise", warn=False
    )
    _assert_intercepts(widths, measured, p)


# ----------------------------------------------------------------------------- criticality
@pytest.mark.parametrize("activation", ["gelu", "tanh"])
def test_residual_critical_point_holds_the_kernel_fixed(x64, activation):
    """At the residual critical point the native fixed point started at K* stays there on the
    residual layers, and chi_parallel, chi_perp (finite differences of the residual recursion
    K' = xi^2 (C_b + C_W g(K)) + gamma^2 K) are 1."""
    gamma, xi = 0.6, 0.8
    crit = rgnn.critical_point(activation, shortcut=gamma, branch=xi)
    plain = rgnn.critical_point(activation)
    scale = (1 - gamma**2) / xi**2
    np.testing.assert_allclose(crit.weight_var, plain.weight_var * scale, rtol=1e-14)
    np.testing.assert_allclose(crit.bias_var, plain.bias_var * scale, rtol=1e-14)
    assert crit.is_critical and crit.fixed_point == plain.fixed_point
    kstar = crit.fixed_point if crit.fixed_point > 0 else 0.3
    arch = rgnn.MLP(
        5,
        16,
        activation,
        weight_var=crit.weight_var,
        bias_var=crit.bias_var,
        shortcut=gamma,
        branch=xi,
    )
    # one input with K^(1) = C_b + C_W |x|^2 / n0 = K* (tanh: K* = 0 is the trivial point,
    # checked instead through the susceptibilities at small K)
    q = (kstar - crit.bias_var) / crit.weight_var
    x = np.full((1, 4), np.sqrt(q))
    k = np.asarray(rgnn.fixed_point(arch, x).nngp_diag1)[:-1, 0]
    act = rgnn.activations.get_activation(activation)

    def step(kk):
        f = diag_maps(act, jnp.asarray(kk), order=256)[0]
        return xi**2 * (crit.bias_var + crit.weight_var * float(f)) + gamma**2 * kk

    if crit.fixed_point > 0:
        np.testing.assert_allclose(k, kstar, rtol=1e-9)
        h = 1e-4 * kstar
        chi_par = (step(kstar + h) - step(kstar - h)) / (2 * h)
        np.testing.assert_allclose(chi_par, 1.0, atol=1e-6)
    else:  # K* = 0: K' = K + O(K^2), the slope at 0 is 1
        h = 1e-5
        np.testing.assert_allclose(step(h) / h, 1.0, atol=1e-4)


def test_relu_coupling_flow_with_shortcuts(x64):
    """relu at the residual critical point (C_W = 2, xi^2 = 1 - gamma^2): the first residual
    layer adds (1 - gamma^2)(5 - gamma^2) to V / K^2 (closed form, rgnn.criticality), the plain
    output layer adds 5 plus the propagated V, and gamma = 0.9 keeps the coupling below the
    plain MLP's on every layer; gamma = 0 is the plain flow (the engine's numbers)."""
    x = np.ones((1, 3))
    plain = rgnn.perturbative(rgnn.MLP(6, 64, "relu", weight_var=2.0), x, ntk=False, warn=False)
    flows = {}
    for gamma in (0.0, 0.5, 0.9):
        arch = rgnn.MLP(6, 64, "relu", weight_var=2.0, shortcut=gamma, branch=(1 - gamma**2) ** 0.5)
        p = rgnn.perturbative(arch, x, ntk=False, warn=False)
        flows[gamma] = np.asarray(p.coupling) * np.asarray(p.widths)
        first = (1 - gamma**2) * (5 - gamma**2)
        np.testing.assert_allclose(
            flows[gamma][1], first, rtol=p.quadrature_error + tol(EXACT, jnp.float64)["rtol"]
        )
    np.testing.assert_allclose(flows[0.0], np.asarray(plain.coupling) * 64, rtol=1e-9)
    assert np.all(flows[0.9][1:] < flows[0.0][1:])


def test_bad_residual_criticality():
    with pytest.raises(ValueError, match=r"shortcut: expected \|gamma\| < 1"):
        rgnn.critical_point("relu", shortcut=1.0)
    with pytest.raises(ValueError, match="branch: expected xi != 0"):
        rgnn.criticality("relu", 2.0, 0.0, shortcut=0.5, branch=0.0)


# ----------------------------------------------------------------------------- command line
def test_cli_sweep_residual_bad_input_is_one_line(tmp_path, capsys):
    from rgnn.cli import main

    rc = main(["sweep", "--widths", "8,9", "--shortcut", "inf", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "shortcut: expected a finite number" in err[0]
    assert not any(tmp_path.iterdir())  # nothing written before the arguments are checked


def test_coupling_plot_with_shortcuts(tmp_path):
    from rgnn import plotting

    path = plotting.plot_couplings(
        tmp_path / "c.png", activations=("relu",), depth=3, shortcuts=(0.5, 0.9)
    )
    assert path.stat().st_size > 10_000


def test_compare_on_a_residual_ensemble(x64):
    """compare: the metric-based kurtosis/variance are NaN on residual hidden layers and finite
    on the plain output layer; predictions exist for a linear residual MLP (exact flow) and for
    a nonlinear one (the several-input kernel side of rgnn._residual_multi)."""
    x, y = rgnn.data.teacher_student(6, 4, seed=1)
    for act in ("relu", "linear"):
        arch = rgnn.MLP(3, 16, act, weight_var=1.0, shortcut=0.7, branch=0.5)
        run = rgnn.train(
            arch, x, y, steps=3, learning_rate=0.1, n_networks=6, key=jax.random.key(0)
        )
        cmp = rgnn.compare(arch, x, run)
        kurt = np.asarray(cmp.kurtosis)
        assert np.all(np.isnan(kurt[1:-1])) and np.all(np.isfinite(kurt[-1]))
        pred = np.asarray(cmp.kurtosis_predicted)
        assert np.all(np.isfinite(pred))


# nonlinear on two inputs in the slow tier: the default run reaches that path through
# tests/test_models.py::test_residual_point_with_predictions_on_asks_only_for_derived_statistics
@pytest.mark.parametrize(
    ("activation", "n_inputs"),
    [("relu", 1), ("linear", 2), pytest.param("relu", 2, marks=pytest.mark.slow)],
)
def test_sweep_ntk_fluctuation_is_predicted_where_the_residual_rules_exist(
    x64, activation, n_inputs
):
    """The sweep's NTK-fluctuation measure (rgnn.study) predicts ``Var(H) / Theta^2`` on the
    output layer for a residual MLP: nonlinear from the single-input flow on each input, linear
    from the exact rules on all inputs at once. On two inputs the one-input flows are the
    diagonal of the pair flow of rgnn._residual_multi, within the two quadrature errors."""
    from rgnn.study import _ntk_fluctuation

    ntk0 = np.random.default_rng(0).uniform(1.0, 2.0, size=(4, n_inputs, n_inputs))
    arch = rgnn.MLP(2, 16, activation, shortcut=0.5, branch=0.8)
    x = _inputs(n_inputs)
    got = _ntk_fluctuation(arch, x, ntk0, predict=True)
    rows = [x[a : a + 1] for a in range(n_inputs)] if activation != "linear" else [x]
    parts = [rgnn.perturbative(arch, r, warn=False) for r in rows]
    ratio = np.concatenate(
        [np.diagonal(p.ntk_variance[-1]) / np.diagonal(p.ntk[-1]) ** 2 for p in parts]
    )
    ref = float(np.mean(ratio))
    assert math.isclose(got["predicted"], ref, rel_tol=tol(EXACT, jnp.float64)["rtol"])
    assert math.isfinite(got["value"])
    if n_inputs > 1 and activation != "linear":
        pair = rgnn.perturbative(arch, x, warn=False)
        diag = np.diagonal(pair.ntk_variance[-1]) / np.diagonal(pair.ntk[-1]) ** 2
        err = float(pair.quadrature_error) + max(float(p.quadrature_error) for p in parts)
        np.testing.assert_allclose(ratio, diag, rtol=err)


# ----------------------------------------------------------------------------- several inputs
def _set_flow(arch, x, cross):
    """rgnn._residual_multi on every set of the pair layout (one input: the set of it):
    ``(V [L+1, S, m, m, m, m], DG [L+1, S, m, m], D4 [L+1, S, m])``, times the width."""
    from rgnn import _residual_multi as rm
    from rgnn.flow import moments as flow_moments
    from rgnn.perturbative import _sets

    k = rgnn.fixed_point(arch, x).nngp
    gamma, xi = (jnp.asarray(v) for v in arch.residual())
    rules = flow_moments.rules(48, 192, 2, k.dtype)
    ks = rm.set_kernels(k, jnp.asarray(_sets(x.shape[0], False)))
    return rm.sets_flow(arch.act, arch.weight_var, gamma, xi, ks, rules, cross), k


def _ntk_set_flow(arch, x, cross):
    """The NTK side of rgnn._residual_multi on every set of the pair layout, times the width:
    ``{name: [L+1, S, ...]}`` for ``ntk_correction`` (``[m, m]``), ``mixed_vertex``,
    ``ntk_variance``, ``ntk_vertex`` and ``ntk_b`` (``[m, m, m, m]``: ``Bo_(ab)(cd)``)."""
    from rgnn import _residual_multi as rm
    from rgnn.flow import moments as flow_moments
    from rgnn.perturbative import _sets

    fp = rgnn.fixed_point(arch, x)
    gamma, xi = (jnp.asarray(v) for v in arch.residual())
    lam_w = jnp.asarray(arch.recursion(x.shape[1]).lambda_w)
    rules = flow_moments.rules(48, 192, 2, fp.nngp.dtype)
    sets = jnp.asarray(_sets(x.shape[0], False))
    ks, ts = rm.set_kernels(fp.nngp, sets), rm.set_kernels(fp.ntk, sets)
    out = rm.ntk_sets_flow(arch.act, arch.weight_var, gamma, xi, lam_w, ks, ts, rules, cross)
    names = ("ntk_correction", "mixed_vertex", "ntk_variance", "ntk_vertex", "ntk_b")
    return dict(zip(names, (np.asarray(v) for v in out), strict=True)), fp


@pytest.mark.parametrize("activation", ["tanh", "gelu", "relu"])
def test_several_input_flow_on_one_input_is_the_grid_flow(x64, activation):
    """rgnn._residual_multi (the unrolled flow: cross-layer moments of one unit's chain) on one
    input equals the grid flow of rgnn._residual_single (a different discretization of the same
    recursion): the vertex, n x kernel correction and n x excess kurtosis on every layer. Smooth
    activations to the QUADRATURE tolerance (measured 1e-13); relu's kinks make the cross-layer
    rule converge algebraically, so there the tolerance is 4 times the change between 32 and 64
    Gauss-Hermite nodes (which bounds the 64-node rule's error; measured 1e-5 against the grid,
    whose own error is about 1e-6)."""
    from rgnn import gaussian
    from rgnn._residual_single import single_input_flow
    from tests.tolerances import QUADRATURE

    cw = 2.0 if activation == "relu" else 1.0
    arch = rgnn.MLP(4, 64, activation, weight_var=cw, bias_var=0.1, shortcut=0.8, branch=0.6)
    x = _inputs(1)
    runs = {}
    for nodes in (32, 64):
        (v, dg, d4), k = _set_flow(
            arch, x, gaussian.hermite_rule(nodes, jnp.float64, rule="hermite")
        )
        kk = np.asarray(k)[:, 0, 0]
        d2 = np.asarray(dg)[:, 0, 0, 0]
        runs[nodes] = dict(
            vertex=np.asarray(v)[:, 0, 0, 0, 0, 0],
            nngp_correction=d2,
            kurtosis=(np.asarray(d4)[:, 0, 0] - 6 * kk * d2) / kk**2,
        )
    ref = single_input_flow(arch, float(kk[0]))
    for name, got in runs[64].items():
        want = getattr(ref, name)
        scale = np.max(np.abs(kk)) if name == "nngp_correction" else np.max(np.abs(want))
        if activation == "relu":
            rtol = 4 * np.max(np.abs(got - runs[32][name])) / scale
        else:
            rtol = tol(QUADRATURE, jnp.float64)["rtol"]
        np.testing.assert_allclose(got, want, rtol=0, atol=rtol * scale, err_msg=name)


# relu and gelu in the slow tier (two more compilations of the NTK flow each)
@pytest.mark.parametrize("activation", tiered(["tanh", "gelu", "relu"], ("gelu", "relu")))
def test_several_input_ntk_side_on_one_input_is_the_grid_flow(x64, activation):
    """The NTK side of rgnn._residual_multi on one input (m = 1 sets) equals the grid flow of
    rgnn._residual_single: n x NTK mean shift, n x NTK variance, A, B and D on every layer.
    The tolerance is 4 times the change between 32 and 64 Gauss-Hermite nodes (which bounds
    the 64-node rule's error; the grid's own is about 1e-13 for tanh, measured 1201 against
    2401 nodes): relu's kinks converge algebraically (measured 1e-4 at 20 nodes), and tanh's
    poles slow Gauss-Hermite on the derivatives up to the third (measured 5e-9 at 64 nodes)."""
    from rgnn import gaussian
    from rgnn._residual_single import single_input_flow

    cw = 2.0 if activation == "relu" else 1.0
    arch = rgnn.MLP(4, 64, activation, weight_var=cw, bias_var=0.1, shortcut=0.8, branch=0.6)
    x = _inputs(1)
    runs = {}
    for nodes in (32, 64):
        ntk, fp = _ntk_set_flow(arch, x, gaussian.hermite_rule(nodes, jnp.float64, rule="hermite"))
        runs[nodes] = {k: v.reshape(v.shape[0], -1)[:, 0] for k, v in ntk.items()}
    rec = arch.recursion(x.shape[1])
    theta = np.asarray(fp.ntk)[:, 0, 0]
    k1 = float(np.asarray(fp.nngp)[0, 0, 0])
    ref = single_input_flow(arch, k1, ntk=(float(theta[0]), rec.lambda_b, rec.lambda_w))
    for name, got in runs[64].items():
        want = getattr(ref, name)
        atol = 4 * np.max(np.abs(got - runs[32][name]))
        np.testing.assert_allclose(got, want, rtol=0, atol=atol, err_msg=name)


# gelu in the slow tier: its Gauss-Hermite cross-layer rule stays in the default run through
# test_several_input_flow_on_one_input_is_the_grid_flow; the NTK side (a compilation of its
# own) in the default run for relu only
@pytest.mark.parametrize(
    ("activation", "ntk"),
    [
        ("relu", True),
        ("tanh", False),
        pytest.param("tanh", True, marks=pytest.mark.slow),
        pytest.param("gelu", True, marks=pytest.mark.slow),
    ],
)
def test_trivial_shortcut_on_several_inputs_is_the_plain_engine(x64, activation, ntk):
    """gamma = 0, xi = 1 on three inputs: rgnn.perturbative's several-input residual path (every
    shortcut product vanishes, so the cross-layer moments drop out and the recursion is PDLT's
    eq. 4.90 and sec. 4.3, and ch. 8 for the NTK side) equals the plain flow engine on every
    kernel-side and NTK-side (``ntk``) field, through the public API: relu to
    roundoff (closed forms and exact polar integrals on both sides), tanh and gelu to the
    QUADRATURE tolerance (two quadratures of the kernel map's derivatives)."""
    from tests.tolerances import QUADRATURE

    x = _inputs(3)
    cw = 2.0 if activation == "relu" else 1.0
    kw = dict(weight_var=cw, bias_var=0.1)
    plain = rgnn.perturbative(rgnn.MLP(3, 64, activation, **kw), x, ntk=ntk)
    trivial = rgnn.MLP(3, 64, activation, shortcut=0.0, branch=1.0, **kw)
    res = rgnn.perturbative(trivial, x, ntk=ntk)
    table = EXACT if activation == "relu" else QUADRATURE
    rtol = tol(table, jnp.float64)["rtol"]
    names = ("vertex", "nngp_variance", "kurtosis", "coupling", "nngp_correction")
    if ntk:
        names += ("ntk", "ntk_correction", "ntk_variance", "ntk_vertex", "mixed_vertex", "ntk_b")
    else:
        assert res.ntk is None
    for name in names:
        a, b = np.asarray(getattr(res, name)), np.asarray(getattr(plain, name))
        scale = 1.0
        if name in ("nngp_correction", "ntk_correction"):
            kernel = plain.nngp if name == "nngp_correction" else plain.ntk
            scale = np.abs(np.asarray(kernel)).max() / 64
        np.testing.assert_allclose(
            a, b, rtol=rtol, atol=rtol * max(np.abs(b).max(), scale), err_msg=name
        )


# the NTK side (a compilation of its own) in the slow tier
@pytest.mark.parametrize(
    ("shortcut", "branch", "ntk"),
    [
        (0.8, 0.6, False),
        ((0.9, -0.5), (0.5, 1.1), False),
        pytest.param(0.8, 0.6, True, marks=pytest.mark.slow),
        pytest.param((0.9, -0.5), (0.5, 1.1), True, marks=pytest.mark.slow),
    ],
)
def test_several_input_flow_of_a_linear_activation_is_the_residual_rules(
    x64, shortcut, branch, ntk
):
    """The unrolled several-input flow run on a linear activation equals the residual rules of
    the flow engine (exact there by the units' rotation symmetry) on three inputs, kernel side
    and NTK side, to roundoff:
    every cross-layer moment is a polynomial times a Gaussian, integrated exactly."""
    from rgnn.perturbative import _run_residual_multi

    arch = rgnn.MLP(3, 40, "linear", weight_var=0.9, bias_var=0.2, shortcut=shortcut, branch=branch)
    x = _inputs(3)
    ref = rgnn.perturbative(arch, x, ntk=ntk, warn=False)
    got = _run_residual_multi(arch, x, 48, False, ntk=ntk)
    t = tol(EXACT, jnp.float64)
    names = ("vertex", "nngp_variance", "kurtosis", "coupling", "nngp_correction")
    if ntk:
        names += ("ntk_correction", "ntk_variance", "ntk_vertex", "mixed_vertex", "ntk_b")
    for name in names:
        a, b = np.asarray(getattr(got, name)), np.asarray(getattr(ref, name))
        scale = 0.0
        if name in ("nngp_correction", "ntk_correction"):
            kernel = ref.nngp if name == "nngp_correction" else ref.ntk
            scale = np.abs(np.asarray(kernel)).max()
        np.testing.assert_allclose(
            a, b, rtol=t["rtol"], atol=t["rtol"] * max(np.abs(b).max(), scale), err_msg=name
        )


# tanh in the slow tier: there the flow and the rotation-symmetric rules differ by 2%, so the
# relu case carries the check's power
@pytest.mark.parametrize("activation", tiered(["relu", "tanh"], ("tanh",)))
def test_monte_carlo_several_inputs_across_widths(x64, activation):
    """rgnn.measure on nonlinear residual networks on two inputs, widths 16/32/64 (768 networks
    each): the weighted fit n E = a + b/n of every pair component of the vertex, n x kernel
    correction and n x excess kurtosis has intercepts within MC_SIGMAS fit standard errors of
    the several-input flow (layers 2..L+1). The rotation-symmetric pair rules (the plain-MLP
    argument of rgnn.flow.rules, run on this nonlinear network) differ by 16-30% from layer 3
    on for relu (2% for tanh): there the test also requires the data to prefer the flow, i.e.
    sum z^2 over the vertex's distinct components and the kurtosis on layers 3..L+1 smaller for
    the flow than for those rules (a likelihood-ratio comparison; the expected difference is
    sum (gap / SE)^2, about 6 times its spread here). One network size too small to reject
    them at MC_SIGMAS on one entry (expected |z| about 3-4): tools/residual_monte_carlo.py
    --inputs 3 runs the full check (1024 networks, widths 32/64/128)."""
    from rgnn.perturbative import _run
    from tests.tolerances import MC_SIGMAS

    widths = (16, 32, 64)
    x = _inputs(2, 4)
    cw = 2.0 if activation == "relu" else 1.0
    names = ("vertex", "kurtosis", "nngp_correction")
    make = _residual_family(activation, cw)
    measured = _measure_across_widths(make, x, widths, names, 768, ntk=False, vertex=True)
    arch = make(widths[-1])
    p = rgnn.perturbative(arch, x, ntk=False, warn=False)  # the kernel side (its own check)
    rot, _ = _run(arch, x, 48, ntk=False)
    upper = np.triu_indices(3)
    chi2 = {"flow": 0.0, "rotation": 0.0}
    for name, (y, se) in measured.items():
        for label, pred in (("flow", p), ("rotation", rot)):
            z = _z_scores(widths, y, se, pred, name)
            if label == "flow":
                assert np.all(np.abs(z) <= MC_SIGMAS), f"{name}: max |z| = {np.max(np.abs(z)):.2f}"
            if name == "vertex":
                chi2[label] += float(np.sum(z[1:, 0, 1][:, upper[0], upper[1]] ** 2))
            elif name == "kurtosis":
                chi2[label] += float(np.sum(z[1:] ** 2))
    if activation == "relu":
        assert chi2["flow"] < chi2["rotation"], chi2


# the slow tier: the NTK side's exact reductions (one input, gamma = 0, linear) are in the
# default run; tools/residual_monte_carlo.py --inputs 2 runs the full check
@pytest.mark.slow
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_monte_carlo_several_inputs_ntk_side_across_widths(x64, activation):
    """rgnn.measure on nonlinear residual networks on two inputs, widths 16/32/64 (768 networks
    each, two outputs so that A and B have two different units on every layer): the weighted
    fit n E = a + b/n of every pair component of A, D, B, n x NTK variance and n x NTK mean
    shift has intercepts within MC_SIGMAS fit standard errors of the several-input flow's NTK
    side (layers 2..L+1)."""
    widths = (16, 32, 64)
    x = _inputs(2, 4)
    cw = 2.0 if activation == "relu" else 1.0
    names = ("ntk_vertex", "mixed_vertex", "ntk_b", "ntk_variance", "ntk_correction")
    make = _residual_family(activation, cw, depth=3, out_dim=2)
    measured = _measure_across_widths(make, x, widths, names, 768, ntk=True, vertex=True)
    _assert_intercepts(widths, measured, rgnn.perturbative(make(widths[-1]), x, warn=False))


def test_several_input_path_keeps_the_dtype_and_one_compilation():
    """float32 inputs give float32 fields (dtype follows the input), and another number of
    inputs reuses the compiled several-input flow (its sets come in fixed chunks)."""
    from rgnn import _residual_multi as rm

    arch = rgnn.MLP(2, 16, "relu", weight_var=2.0, bias_var=0.1, shortcut=0.8, branch=0.6)
    # the kernel side (the NTK side's float32 compilation would double the cost; its dtype
    # follows the same code path)
    p = rgnn.perturbative(arch, _inputs(2).astype(np.float32), ntk=False, warn=False)
    assert p.vertex.dtype == jnp.float32 and p.kurtosis.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(p.vertex)))
    size = rm.sets_flow._cache_size()
    rgnn.perturbative(arch, _inputs(4).astype(np.float32), ntk=False, warn=False)
    assert rm.sets_flow._cache_size() == size


# ----------------------------------------------------------------------------- the dNTK, pairs
def _dntk_set_flow(arch, x, cross, pointwise=True, ddntk=False):
    """The dNTK of rgnn._residual_multi on every set of the pair layout (``pointwise``: the
    kink convention): ``(P, Q)``, each ``[L+1, S, m, m, m, m]`` (``ddntk``: ``(P, Q, R, S, T,
    U)``)."""
    from rgnn import _residual_multi as rm
    from rgnn.flow import moments as flow_moments
    from rgnn.perturbative import _sets

    fp = rgnn.fixed_point(arch, x)
    gamma, xi = (jnp.asarray(v) for v in arch.residual())
    lam_w = jnp.asarray(arch.recursion(x.shape[1]).lambda_w)
    rules = flow_moments.rules(48, 192, 2, fp.nngp.dtype)
    sets = jnp.asarray(_sets(x.shape[0], False))
    ks, ts = rm.set_kernels(fp.nngp, sets), rm.set_kernels(fp.ntk, sets)
    out = rm.dntk_sets_flow(
        arch.act, pointwise, arch.weight_var, gamma, xi, lam_w, ks, ts, rules, cross, ddntk=ddntk
    )
    return tuple(np.asarray(v) for v in out), fp


# relu's default kink convention in the default run; the rest in the slow tier (a compilation
# of the dNTK flow each, and the plain engine's dNTK at 96 nodes)
@pytest.mark.parametrize(
    ("activation", "kinks"),
    [
        ("relu", "distributional"),
        pytest.param("relu", "pointwise", marks=pytest.mark.slow),
        pytest.param("tanh", "pointwise", marks=pytest.mark.slow),
        pytest.param("gelu", "pointwise", marks=pytest.mark.slow),
    ],
)
def test_several_input_dntk_of_a_trivial_shortcut_is_the_plain_engine(x64, activation, kinks):
    """gamma = 0, xi = 1 on three inputs: the dNTK P, Q of rgnn._residual_multi (the shortcut
    products vanish, so the recursion is PDLT ch. 11's, rgnn.flow.rules) equal the plain
    engine's in every pair component, through the public API: relu in both kink conventions
    to roundoff (exact polar integrals on both sides; the distributional one through the
    delta terms of sigma''); tanh and gelu with both at 96 nodes of the two-input rule, to the
    QUADRATURE tolerance (measured 4e-16 for tanh; at the default 48 nodes the two differ by
    6e-8, within the rule's own error, 1.5e-6)."""
    from tests.tolerances import QUADRATURE

    x = _inputs(3)
    cw = 2.0 if activation == "relu" else 1.0
    kw = dict(weight_var=cw, bias_var=0.1)
    run = dict(ntk=False, dntk=True, kinks=kinks, warn=False)
    if activation != "relu":
        run["quadrature_order"] = 96
    plain = rgnn.perturbative(rgnn.MLP(4, 64, activation, **kw), x, **run)
    res = rgnn.perturbative(rgnn.MLP(4, 64, activation, shortcut=0.0, branch=1.0, **kw), x, **run)
    rtol = tol(EXACT if activation == "relu" else QUADRATURE, jnp.float64)["rtol"]
    for name in ("dntk_p", "dntk_q"):
        a, b = np.asarray(getattr(res, name)), np.asarray(getattr(plain, name))
        assert a.shape == (5, 3, 3, 2, 2, 2, 2), name
        np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * np.abs(b).max(), err_msg=name)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("activation", "kinks"),
    [
        ("tanh", "pointwise"),
        ("gelu", "pointwise"),
        ("relu", "pointwise"),
        ("relu", "distributional"),
    ],
)
def test_several_input_dntk_on_one_input_is_the_grid_flow(x64, activation, kinks):
    """The dNTK of rgnn._residual_multi on one input (m = 1 sets) equals the grid flow of
    rgnn._residual_single in the same kink convention, P and Q on every layer, to 4 times the
    change between 32 and 64 Gauss-Hermite nodes of the cross-layer rule (which bounds the
    64-node rule's error; measured against the grid: tanh and gelu 1e-7 or better; relu
    pointwise 6e-5 at 20 nodes, distributional 5e-4 at 20 and 3e-5 at 40: the kinks)."""
    from rgnn import gaussian
    from rgnn._residual_single import single_input_flow

    cw = 2.0 if activation == "relu" else 1.0
    arch = rgnn.MLP(4, 64, activation, weight_var=cw, bias_var=0.1, shortcut=0.8, branch=0.6)
    x = _inputs(1)
    runs = {}
    for nodes in (32, 64):
        rule = gaussian.hermite_rule(nodes, jnp.float64, rule="hermite")
        (p, q), fp = _dntk_set_flow(arch, x, rule, pointwise=kinks == "pointwise")
        runs[nodes] = dict(dntk_p=p[:, 0, 0, 0, 0, 0], dntk_q=q[:, 0, 0, 0, 0, 0])
    rec = arch.recursion(x.shape[1])
    theta1, k1 = float(np.asarray(fp.ntk)[0, 0, 0]), float(np.asarray(fp.nngp)[0, 0, 0])
    ref = single_input_flow(arch, k1, ntk=(theta1, rec.lambda_b, rec.lambda_w), dntk=kinks)
    for name, got in runs[64].items():
        want = getattr(ref, name)
        atol = 4 * np.max(np.abs(got - runs[32][name])) + tol(EXACT, jnp.float64)["rtol"] * np.max(
            np.abs(want)
        )
        np.testing.assert_allclose(got, want, rtol=0, atol=atol, err_msg=name)


@pytest.mark.parametrize(("shortcut", "branch"), [(0.8, 0.6), ((0.9, -0.5), (0.5, 1.1))])
def test_several_input_dntk_of_a_linear_activation_is_the_residual_rules(x64, shortcut, branch):
    """The dNTK flow of rgnn._residual_multi run on a linear activation (three inputs, every
    pair) equals the exact linear residual rules of rgnn.flow.rules (what rgnn.perturbative
    returns there) on every pair component of P and Q: EXACT (no quadrature error enters:
    the linear activation's moments are polynomial and its cross-layer rule is exact)."""
    from rgnn import gaussian
    from rgnn.perturbative import _sets

    arch = rgnn.MLP(3, 64, "linear", weight_var=1.0, bias_var=0.1, shortcut=shortcut, branch=branch)
    x = _inputs(3)
    (p, q), _ = _dntk_set_flow(arch, x, gaussian.hermite_rule(20, jnp.float64, rule="hermite"))
    ref = rgnn.perturbative(arch, x, dntk=True, warn=False)
    rtol = tol(EXACT, jnp.float64)["rtol"]
    for name, got in (("dntk_p", p), ("dntk_q", q)):
        want = np.asarray(getattr(ref, name))
        for s, (a, b) in enumerate(_sets(3, False)):
            np.testing.assert_allclose(
                got[:, s],
                want[:, a, b],
                rtol=rtol,
                atol=rtol * np.abs(want).max(),
                err_msg=f"{name} pair {(a, b)}",
            )


_DDNTK = ("ddntk_r", "ddntk_s", "ddntk_t", "ddntk_u")


# relu in the default run (about 10 s CPU: the plain engine's ddNTK and the pair flow's); tanh
# and gelu in the slow tier (both at 96 nodes of the two-input rule)
@pytest.mark.parametrize(
    "activation",
    [
        "relu",
        pytest.param("tanh", marks=pytest.mark.slow),
        pytest.param("gelu", marks=pytest.mark.slow),
    ],
)
def test_several_input_ddntk_of_a_trivial_shortcut_is_the_plain_engine(x64, activation):
    """gamma = 0, xi = 1 on three inputs: the ddNTK R, S, T, U of rgnn._residual_multi (the
    shortcut terms and J vanish: PDLT ch. infinity's recursions, rgnn.flow.rules) equal the
    plain engine's in every pair component, through the public API, in the pointwise kink
    convention: relu to roundoff (EXACT; R = U = 0 there), tanh and gelu with both at 96
    nodes of the two-input rule, to QUADRATURE (gelu measured 3e-16 at 48 nodes)."""
    from tests.tolerances import QUADRATURE

    x = _inputs(3)
    cw = 2.0 if activation == "relu" else 1.0
    kw = dict(weight_var=cw, bias_var=0.1)
    run = dict(ntk=False, ddntk=True, kinks="pointwise", warn=False)
    if activation != "relu":
        run["quadrature_order"] = 96
    plain = rgnn.perturbative(rgnn.MLP(3, 64, activation, **kw), x, **run)
    res = rgnn.perturbative(rgnn.MLP(3, 64, activation, shortcut=0.0, branch=1.0, **kw), x, **run)
    rtol = tol(EXACT if activation == "relu" else QUADRATURE, jnp.float64)["rtol"]
    scale = max(np.abs(np.asarray(getattr(plain, n))).max() for n in _DDNTK)
    assert scale > 0
    for name in ("dntk_p", "dntk_q") + _DDNTK:
        a, b = np.asarray(getattr(res, name)), np.asarray(getattr(plain, name))
        assert a.shape == (4, 3, 3, 2, 2, 2, 2), name
        np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * scale, err_msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("activation", ["tanh", "gelu", "relu"])
def test_several_input_ddntk_on_one_input_is_the_grid_flow(x64, activation):
    """The ddNTK R, S, T, U of rgnn._residual_multi on one input (m = 1 sets; relu pointwise)
    equal the grid flow of rgnn._residual_single (J included) on every layer, to 4 times the
    change between 32 and 64 Gauss-Hermite nodes of the cross-layer rule (measured at depth
    3, gamma 0.8, xi 0.6: tanh at 64 and gelu at 20 nodes equal to 8 printed digits; relu at
    40 nodes 3e-4 relative on S at the last layer, the kinks' algebraic convergence)."""
    from rgnn import gaussian
    from rgnn._residual_single import single_input_flow

    cw = 2.0 if activation == "relu" else 1.0
    arch = rgnn.MLP(4, 64, activation, weight_var=cw, bias_var=0.1, shortcut=0.8, branch=0.6)
    x = _inputs(1)
    runs = {}
    for nodes in (32, 64):
        rule = gaussian.hermite_rule(nodes, jnp.float64, rule="hermite")
        out, fp = _dntk_set_flow(arch, x, rule, ddntk=True)
        runs[nodes] = {n: v[:, 0, 0, 0, 0, 0] for n, v in zip(_DDNTK, out[2:], strict=True)}
    rec = arch.recursion(x.shape[1])
    theta1, k1 = float(np.asarray(fp.ntk)[0, 0, 0]), float(np.asarray(fp.nngp)[0, 0, 0])
    ref = single_input_flow(
        arch, k1, ntk=(theta1, rec.lambda_b, rec.lambda_w), dntk="pointwise", ddntk=True
    )
    for name, got in runs[64].items():
        want = getattr(ref, name)
        atol = 4 * np.max(np.abs(got - runs[32][name])) + tol(EXACT, jnp.float64)["rtol"] * np.max(
            np.abs(want)
        )
        np.testing.assert_allclose(got, want, rtol=0, atol=atol, err_msg=name)
    if activation != "relu":  # U (and J) are live for a smooth activation; relu pointwise: 0
        assert np.abs(ref.ddntk_u).max() > 0


@pytest.mark.slow
def test_several_input_ddntk_of_a_linear_activation_is_the_residual_rules(x64):
    """The ddNTK flow of rgnn._residual_multi run on a linear activation (three inputs, every
    pair, per-layer gamma and xi) equals the exact linear residual rules of rgnn.flow.rules on
    every pair component of R, S, T, U: EXACT (R = U = 0; S, T carry the shortcut)."""
    from rgnn import gaussian
    from rgnn.perturbative import _sets

    arch = rgnn.MLP(
        3, 64, "linear", weight_var=1.0, bias_var=0.1, shortcut=(0.9, -0.5), branch=(0.5, 1.1)
    )
    x = _inputs(3)
    rule = gaussian.hermite_rule(20, jnp.float64, rule="hermite")
    out, _ = _dntk_set_flow(arch, x, rule, ddntk=True)
    ref = rgnn.perturbative(arch, x, ddntk=True, warn=False)
    rtol = tol(EXACT, jnp.float64)["rtol"]
    scale = max(np.abs(np.asarray(getattr(ref, n))).max() for n in _DDNTK)
    for name, got in zip(_DDNTK, out[2:], strict=True):
        want = np.asarray(getattr(ref, name))
        for s, (a, b) in enumerate(_sets(3, False)):
            np.testing.assert_allclose(
                got[:, s], want[:, a, b], rtol=rtol, atol=rtol * scale, err_msg=f"{name} {(a, b)}"
            )


# the slow tier: the exact reductions are in the default run;
# tools/residual_monte_carlo.py --dntk --inputs 2 runs the full check
@pytest.mark.slow
@pytest.mark.parametrize("activation", ["relu", "tanh", "gelu"])
def test_monte_carlo_several_inputs_dntk_across_widths(x64, activation):
    """rgnn.measure (automatic differentiation: the pointwise kink convention) on nonlinear
    residual networks on two inputs, widths 16/32/64: the weighted fit a + b/n of every pair
    component of P and Q has intercepts within MC_SIGMAS fit standard errors of the
    several-input flow's dNTK (layers 2..L+1)."""
    widths = (16, 32, 64)
    x = _inputs(2, 4)
    cw = {"relu": 2.0, "tanh": 1.0, "gelu": 1.98}[activation]
    make = _residual_family(activation, cw, depth=3, out_dim=2)
    measured = _measure_across_widths(
        make, x, widths, ("dntk_p", "dntk_q"), 512, ntk=True, dntk=True
    )
    p = rgnn.perturbative(make(widths[-1]), x, ntk=False, dntk=True, kinks="pointwise", warn=False)
    _assert_intercepts(widths, measured, p)


# the slow tier: a float32 compilation of its own
@pytest.mark.slow
def test_several_input_dntk_keeps_the_dtype_and_one_compilation():
    """float32 inputs give float32 dNTK fields, and another number of inputs reuses the
    compiled dNTK flow (its sets come in the fixed chunks of the pair flow)."""
    from rgnn import _residual_multi as rm

    arch = rgnn.MLP(2, 16, "relu", weight_var=2.0, bias_var=0.1, shortcut=0.8, branch=0.6)
    p = rgnn.perturbative(arch, _inputs(2).astype(np.float32), ntk=False, dntk=True, warn=False)
    assert p.dntk_p.dtype == jnp.float32 and p.dntk_q.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(p.dntk_p))) and np.all(np.isfinite(np.asarray(p.dntk_q)))
    size = rm.dntk_sets_flow._cache_size()
    q = rgnn.perturbative(arch, _inputs(4).astype(np.float32), ntk=False, dntk=True, warn=False)
    assert rm.dntk_sets_flow._cache_size() == size
    assert q.dntk_p.shape == (3, 4, 4, 2, 2, 2, 2)
