"""The Gaussian fixed point: native recursions vs neural-tangents, closed forms vs quadrature."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rgnn
from rgnn import gaussian
from tests.tolerances import EXACT, QUADRATURE, tol

ACTIVATIONS = list(rgnn.KNOWN_ACTIVATIONS) + ["custom"]


def _custom(x):
    """A JAX-traceable callable with no registry entry: integrated by quadrature."""
    return jnp.tanh(x) + 0.1 * x


def _act(name):
    return _custom if name == "custom" else name


def _inputs(dtype=np.float64):
    """Inputs with |x|^2 / n_0 in [0.25, 1.2], so that every kernel stays O(1)."""
    rng = np.random.RandomState(0)
    x1 = rng.randn(4, 5)
    x1 *= np.array([1.0, 0.8, 1.1, 0.6])[:, None] / np.sqrt(np.mean(x1**2, axis=1, keepdims=True))
    x1[3] = 0.5 * x1[0]  # a pair of parallel inputs
    x2 = rng.randn(3, 5)
    x2 *= np.array([0.9, 1.0, 0.7])[:, None] / np.sqrt(np.mean(x2**2, axis=1, keepdims=True))
    return x1.astype(dtype), x2.astype(dtype)


def _nt(arch, x1, x2, order=256):
    with warnings.catch_warnings():
        # ElementwiseNumerical warns that it uses quadrature: that is what is being compared.
        warnings.simplefilter("ignore", UserWarning)
        return rgnn.fixed_point(arch, x1, x2, backend="neural_tangents", quadrature_order=order)


@pytest.mark.parametrize("parameterization", ["ntk", "standard"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_backends_agree(x64, activation, parameterization):
    """Native == neural-tangents to 1e-9 relative, every layer of depths 1 and 10, x2 same/other.

    Layer l of a depth-10 network is the output of a depth-(l-1) network with the same widths,
    so the depth-10 comparison covers the per-layer kernels of depths 1..10. Activations
    without a closed form are integrated by two different rules: rgnn's trapezoid rule (96
    nodes) and neural-tangents' Gauss-Hermite rule at 256 nodes, where it is converged for
    these O(1) kernels (tanh at K = 2: |GH_256 - exact| ~ 5e-14, measured against GH_512).
    Agreement to EXACT therefore checks both against the true Gaussian integral.
    """
    x1, x2 = _inputs()
    for depth in (1, 10):
        arch = rgnn.MLP(
            depth,
            (64,) * (depth - 1) + (96,),
            _act(activation),
            weight_var=1.6,
            bias_var=0.3,
            parameterization=parameterization,
        )
        for other in (None, x2):
            fp = rgnn.fixed_point(arch, x1, other)
            ref = _nt(arch, x1, other)
            assert fp.nngp.shape == (depth + 1, 4, 4 if other is None else 3)
            assert fp.nngp.dtype == jnp.float64
            for name in ("nngp", "nngp_diag1", "nngp_diag2"):
                np.testing.assert_allclose(
                    getattr(fp, name), getattr(ref, name), **tol(EXACT, jnp.float64), err_msg=name
                )
            _assert_ntk_agrees(arch, fp, ref)


def _assert_ntk_agrees(arch, fp, ref):
    """NTKs agree to EXACT, except where neural-tangents' relu formula is ill-conditioned.

    For relu and leaky relu the NTK uses the angle theta = arccos(rho); neural-tangents takes
    it as atan2(sqrt(K_aa K_bb - K_ab^2), K_ab), and for (anti)parallel inputs the difference
    under the square root is a few ulps of roundoff, so its theta, and the NTK, carry an error
    of order sqrt(eps) ~ 1.5e-8 per layer (measured: 3.6e-9 relative at depth 10). There the
    tolerance is sqrt(eps) times the number of layers, and rgnn's own diagonal is checked
    against the exact scalar recursion in ``test_relu_diagonal_ntk_is_exact``.
    """
    exact = tol(EXACT, jnp.float64)
    if arch.act.negative_slope is None:
        np.testing.assert_allclose(fp.ntk, ref.ntk, **exact, err_msg="ntk")
        return
    rho = fp.nngp / np.sqrt(fp.nngp_diag1[:, :, None] * fp.nngp_diag2[:, None, :])
    parallel = np.zeros_like(rho, dtype=bool)
    parallel[1:] = np.abs(rho[:-1]) > 1 - 1e-6  # the angle that enters layer l is layer l-1's
    loose = np.sqrt(np.finfo(np.float64).eps) * arch.n_layers
    err = np.abs(np.asarray(fp.ntk) - np.asarray(ref.ntk)) / np.abs(np.asarray(ref.ntk))
    assert np.all(err[~parallel] <= exact["rtol"]), err[~parallel].max()
    assert np.all(err[parallel] <= loose), err[parallel].max()


@pytest.mark.parametrize("parameterization", ["ntk", "standard"])
@pytest.mark.parametrize("slope", [0.0, 0.2])
def test_relu_diagonal_ntk_is_exact(x64, slope, parameterization):
    """On the diagonal the relu-family maps are linear, K' = C_b + C_W (1 + a^2) K / 2 and
    Theta' = lambda_b + lambda_W (1 + a^2) K / 2 + C_W (1 + a^2) Theta / 2: rgnn must reproduce
    this scalar recursion to roundoff."""
    x1, _ = _inputs()
    cw, cb = 1.6, 0.3
    arch = rgnn.MLP(
        10,
        32,
        rgnn.leaky_relu(slope),
        weight_var=cw,
        bias_var=cb,
        parameterization=parameterization,
    )
    fp = rgnn.fixed_point(arch, x1)
    rec = arch.recursion(x1.shape[1])
    half = (1 + slope**2) / 2
    k = cb + cw * np.sum(x1**2, axis=1) / x1.shape[1]
    theta = rec.lambda_b[0] + rec.lambda_w[0] * np.sum(x1**2, axis=1) / x1.shape[1]
    for layer in range(arch.n_layers):
        np.testing.assert_allclose(np.diagonal(fp.nngp[layer]), k, rtol=1e-13)
        np.testing.assert_allclose(np.diagonal(fp.ntk[layer]), theta, rtol=1e-13)
        if layer + 1 < arch.n_layers:
            lb, lw = rec.lambda_b[layer + 1], rec.lambda_w[layer + 1]
            k, theta = cb + cw * half * k, lb + lw * half * k + cw * half * theta


@pytest.mark.parametrize("activation", ["tanh", "sigmoid", "softplus", "swish", "custom"])
def test_quadrature_is_converged(x64, activation):
    """The default rule (96 nodes) agrees with a 192-node rule on kernels up to K ~ 3.3 (the
    range the docstring of rgnn.gaussian promises 1e-10 in): the default numbers are the
    Gaussian integrals themselves, not an artifact of the rule."""
    x1, x2 = _inputs()
    arch = rgnn.MLP(6, 64, _act(activation), weight_var=2.5, bias_var=0.3)
    lo = rgnn.fixed_point(arch, x1, x2)
    hi = rgnn.fixed_point(arch, x1, x2, quadrature_order=192)
    np.testing.assert_allclose(lo.nngp, hi.nngp, **tol(QUADRATURE, jnp.float64))
    np.testing.assert_allclose(lo.ntk, hi.ntk, **tol(QUADRATURE, jnp.float64))


@pytest.mark.parametrize("activation", ["erf", "gelu", "sin", "linear"])
def test_closed_forms_match_quadrature(x64, activation):
    """Each smooth closed form equals Gauss-Hermite quadrature of the same activation."""
    act = rgnn.get_activation(activation)
    by_quadrature = rgnn.Activation("quadrature", act.fn)
    x1, x2 = _inputs()
    kw = dict(weight_var=1.4, bias_var=0.2)
    exact = rgnn.fixed_point(rgnn.MLP(5, 64, act, **kw), x1, x2)
    quad = rgnn.fixed_point(rgnn.MLP(5, 64, by_quadrature, **kw), x1, x2)
    np.testing.assert_allclose(exact.nngp, quad.nngp, **tol(QUADRATURE, jnp.float64))
    np.testing.assert_allclose(exact.ntk, quad.ntk, **tol(QUADRATURE, jnp.float64))


@pytest.mark.parametrize("slope", [0.0, 0.01, 0.3])
def test_relu_closed_form_matches_quadrature(x64, slope):
    """Relu kinks make Gauss-Hermite converge only algebraically; the closed form must sit
    inside the measured quadrature error (|order 512 - order 256|, times 4)."""
    act = rgnn.leaky_relu(slope)
    k11, k22 = jnp.array([0.7, 1.3, 2.0]), jnp.array([1.1, 1.3, 0.4])
    k12 = jnp.array([0.3, 1.3, -0.5])
    exact = act.nngp_map(k11, k22, k12), act.ntk_map(k11, k22, k12)
    for got, (f, g) in zip(
        exact, [(act.fn, act.fn), (act.derivative, act.derivative)], strict=True
    ):
        hi = gaussian.expect_pair(f, g, k11, k22, k12, order=512)
        err = gaussian.quadrature_error(f, g, k11, k22, k12, order=256)
        assert np.all(np.abs(got - hi) <= 4 * err + 1e-12), (got, hi, err)


def test_deep_linear_network_is_exact(x64):
    """Linear activation: K^(l) = C_b (1 + C_W + ... + C_W^(l-1)) + C_W^l x.x/n0."""
    x1, x2 = _inputs()
    cw, cb = 1.3, 0.2
    fp = rgnn.fixed_point(rgnn.MLP(4, 10, "linear", weight_var=cw, bias_var=cb), x1, x2)
    dot = x1 @ x2.T / x1.shape[1]
    for layer in range(1, 6):
        expected = cb * sum(cw**j for j in range(layer)) + cw**layer * dot
        np.testing.assert_allclose(fp.nngp[layer - 1], expected, **tol(EXACT, jnp.float64))


def test_relu_critical_preserves_norm(x64):
    """ReLU at criticality (C_W = 2, C_b = 0): K_aa is the same on every layer (PDLT 5.2)."""
    x1, _ = _inputs()
    fp = rgnn.fixed_point(rgnn.MLP(8, 10, "relu", weight_var=2.0), x1)
    diag = fp.nngp_diag1
    np.testing.assert_allclose(diag, np.broadcast_to(diag[0], diag.shape), rtol=1e-12)
    # the NTK grows linearly with depth at criticality (PDLT eq. 9.76 with lambda = C = 2):
    # Theta^(l)_aa = l * K_aa for the diagonal
    layers = np.arange(1, 10)[:, None]
    np.testing.assert_allclose(
        np.diagonal(fp.ntk, axis1=1, axis2=2), layers * np.asarray(diag[0])[None, :], rtol=1e-12
    )


def test_float32_in_float32_out():
    x1, x2 = _inputs(np.float32)
    fp = rgnn.fixed_point(rgnn.MLP(3, 8, "tanh"), x1, x2)
    assert fp.nngp.dtype == jnp.float32 and fp.ntk.dtype == jnp.float32
    with jax.enable_x64(True):
        ref = rgnn.fixed_point(rgnn.MLP(3, 8, "tanh"), x1.astype(np.float64), x2)
    np.testing.assert_allclose(fp.nngp, ref.nngp, **tol(EXACT, jnp.float32))


def test_jit_vmap_and_no_recompilation(x64):
    """fixed_point works under jit and vmap, and a second call with new values does not
    recompile the native kernel."""
    from rgnn.fixed_point import _native

    arch = rgnn.MLP(3, 8, "gelu", weight_var=1.5)
    x1, x2 = _inputs()
    eager = rgnn.fixed_point(arch, x1, x2)
    jitted = jax.jit(lambda a, b: rgnn.fixed_point(arch, a, b))(x1, x2)
    np.testing.assert_allclose(jitted.nngp, eager.nngp, **tol(EXACT, jnp.float64))
    batched = jax.vmap(lambda a: rgnn.fixed_point(arch, a, x2).ntk)(np.stack([x1, 2 * x1]))
    np.testing.assert_allclose(batched[0], eager.ntk, **tol(EXACT, jnp.float64))
    before = _native._cache_size()
    rgnn.fixed_point(arch, x1 + 1.0, x2 - 1.0)
    assert _native._cache_size() == before


def test_gradient_matches_finite_difference(x64):
    """d K^(L+1) / d x by autodiff equals a central finite difference."""
    arch = rgnn.MLP(2, 8, "erf", weight_var=1.5, bias_var=0.1)
    x1, x2 = _inputs()

    def f(x):
        return rgnn.fixed_point(arch, x, x2).nngp[-1, 0, 1]

    g = jax.grad(f)(jnp.asarray(x1))
    eps = 1e-6
    bump = np.zeros_like(x1)
    bump[0, 2] = eps
    fd = (f(x1 + bump) - f(x1 - bump)) / (2 * eps)
    np.testing.assert_allclose(g[0, 2], fd, rtol=1e-6)
