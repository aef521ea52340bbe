"""Tests of ``rgnn._compat``: neural-tangents 0.6.5 on current JAX, checked independently.

Every network here uses neural-tangents' default NTK parameterization, on both sides of each
comparison. All numerics run in float64, switched on locally with ``jax.enable_x64``.
"""

import json
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

import rgnn._compat

nt = rgnn._compat.import_neural_tangents()
stax = nt.stax

# One tolerance table, keyed by dtype: agreement expected between two exact computations
# of the same quantity in that precision.
TOLERANCES = {
    np.dtype(np.float32): {"rtol": 1e-5, "atol": 1e-6},
    np.dtype(np.float64): {"rtol": 1e-10, "atol": 1e-12},
}
# Monte Carlo estimates must lie within this many measured standard errors of the exact value.
N_STANDARD_ERRORS = 5.0

W_STD, B_STD = 1.3, 0.2
WIDTH_IN, N1, N2 = 5, 4, 3


def _arccos_at_one_rtol(x):
    """Relative error of arccos-kernel entries at equal inputs: arccos(1 - eps) ~ sqrt(2 eps)."""
    return float(np.sqrt(np.finfo(np.asarray(x).dtype).eps))


def assert_close(actual, expected):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    np.testing.assert_allclose(actual, expected, **TOLERANCES[actual.dtype])


def _inputs(seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    x1 = jax.random.normal(k1, (N1, WIDTH_IN), jnp.float64)
    x2 = jax.random.normal(k2, (N2, WIDTH_IN), jnp.float64)
    return x1, x2


def _mlp(width=64, out=1):
    return stax.serial(stax.Dense(width, W_STD, B_STD), stax.Relu(), stax.Dense(out, W_STD, B_STD))


def _arccos_kernels(x1, x2):
    """NNGP and NTK of Dense-Relu-Dense in NTK parameterization, in plain numpy.

    First layer: :math:`K^1(x, x') = \\sigma_w^2 x \\cdot x' / d + \\sigma_b^2`, and
    :math:`\\Theta^1 = K^1`. ReLU (arc-cosine kernel of degree 1 and its derivative, Cho & Saul
    2009, eq. 6; Jacot et al. 2018, eq. 6), with :math:`\\cos\\theta = K^1_{12} /
    \\sqrt{K^1_{11} K^1_{22}}`:
    :math:`E[\\phi\\phi'] = \\sqrt{K_{11} K_{22}} (\\sin\\theta + (\\pi - \\theta)\\cos\\theta) /
    (2\\pi)` and :math:`E[\\dot\\phi\\dot\\phi'] = (\\pi - \\theta) / (2\\pi)`. Second layer:
    :math:`K^2 = \\sigma_w^2 E[\\phi\\phi'] + \\sigma_b^2` and
    :math:`\\Theta^2 = K^2 + \\sigma_w^2 \\Theta^1 E[\\dot\\phi\\dot\\phi']`.
    """
    x1, x2 = np.asarray(x1), np.asarray(x2)
    d = x1.shape[1]

    def k1(a, b):
        return W_STD**2 * a @ b.T / d + B_STD**2

    k12 = k1(x1, x2)
    k11, k22 = np.diag(k1(x1, x1)), np.diag(k1(x2, x2))
    norms = np.sqrt(np.outer(k11, k22))
    theta = np.arccos(np.clip(k12 / norms, -1.0, 1.0))
    relu = norms * (np.sin(theta) + (np.pi - theta) * np.cos(theta)) / (2 * np.pi)
    relu_dot = (np.pi - theta) / (2 * np.pi)
    nngp = W_STD**2 * relu + B_STD**2
    ntk = nngp + W_STD**2 * k12 * relu_dot
    return nngp, ntk


def _jacobian_ntk(apply_fn, params, x1, x2):
    """NTK by explicit Jacobians: :math:`\\Theta_{ij,ab} = \\sum_p J_{ia,p}(x_1) J_{jb,p}(x_2)`.

    Returns shape ``(N1, N2, out, out)``, the layout of ``trace_axes=()``.
    """

    def flat_jacobian(x):
        jac = jax.jacobian(apply_fn)(params, x)
        n, out = x.shape[0], apply_fn(params, x).shape[1]
        return np.concatenate([np.reshape(j, (n, out, -1)) for j in jax.tree.leaves(jac)], -1)

    return np.einsum("iap,jbp->ijab", flat_jacobian(x1), flat_jacobian(x2))


def test_stax_kernel_fn_matches_arccos_recursion(x64):
    x1, x2 = _inputs()
    _, _, kernel_fn = _mlp()
    nngp, ntk = _arccos_kernels(x1, x2)
    kernel = kernel_fn(x1, x2, ("nngp", "ntk"))
    assert kernel.nngp.dtype == jnp.float64
    assert_close(kernel.nngp, nngp)
    assert_close(kernel.ntk, ntk)


def test_stax_kernel_fn_jit_matches_eager(x64):
    x1, x2 = _inputs()
    _, _, kernel_fn = _mlp()
    assert_close(jax.jit(kernel_fn, static_argnums=2)(x1, x2, "ntk"), kernel_fn(x1, x2, "ntk"))


@pytest.mark.parametrize(
    ("implementation", "same_inputs"),
    [(i, False) for i in nt.NtkImplementation]
    + [(nt.NtkImplementation.STRUCTURED_DERIVATIVES, True)],
    ids=lambda v: v.name if isinstance(v, nt.NtkImplementation) else ("x1_x1" if v else "x1_x2"),
)
def test_empirical_ntk_matches_explicit_jacobians(x64, implementation, same_inputs):
    x1, x2 = _inputs()
    x2 = None if same_inputs else x2
    init_fn, apply_fn, _ = _mlp(width=6, out=2)
    _, params = init_fn(jax.random.key(1), x1.shape)
    expected = _jacobian_ntk(apply_fn, params, x1, x1 if x2 is None else x2)

    ntk_fn = nt.empirical_ntk_fn(apply_fn, trace_axes=(), implementation=implementation)
    assert_close(ntk_fn(x1, x2, params), expected)
    # The default trace_axes=(-1,) takes the mean over the diagonal of the output axis.
    traced_fn = nt.empirical_ntk_fn(apply_fn, implementation=implementation)
    assert_close(traced_fn(x1, x2, params), np.einsum("ijaa->ij", expected) / expected.shape[-1])


def test_empirical_kernel_fn_nngp_is_output_outer_product(x64):
    x1, x2 = _inputs()
    init_fn, apply_fn, _ = _mlp(width=6, out=2)
    _, params = init_fn(jax.random.key(1), x1.shape)
    nngp = nt.empirical_nngp_fn(apply_fn, trace_axes=())(x1, x2, params)
    expected = np.einsum("ia,jb->ijab", apply_fn(params, x1), apply_fn(params, x2))
    assert_close(nngp, expected)
    kernel = nt.empirical_kernel_fn(apply_fn, trace_axes=())(x1, x2, "nngp", params)
    assert_close(kernel, expected)


@pytest.mark.parametrize("get", ["nngp", "ntk"])
def test_monte_carlo_within_standard_errors_of_analytic(x64, get):
    """A one-hidden-layer network's kernels are unbiased at any width, so no bias term."""
    x1, x2 = _inputs()
    init_fn, apply_fn, _ = _mlp(width=32)
    n_samples = 48
    # Running means after 1, 2, ..., n samples; differencing recovers each sample's estimate.
    mc_fn = nt.monte_carlo_kernel_fn(
        init_fn, apply_fn, jax.random.key(2), range(1, n_samples + 1), device_count=0
    )
    running = np.stack([np.asarray(k) for k in mc_fn(x1, x2, get)])
    counts = np.arange(1, n_samples + 1)[:, None, None]
    samples = counts * running - (counts - 1) * np.concatenate(
        [np.zeros_like(running[:1]), running[:-1]]
    )
    standard_error = samples.std(axis=0, ddof=1) / np.sqrt(n_samples)
    nngp, ntk = _arccos_kernels(x1, x2)
    expected = {"nngp": nngp, "ntk": ntk}[get]
    np.testing.assert_allclose(running[-1], samples.mean(axis=0), rtol=1e-10)
    assert np.all(np.abs(running[-1] - expected) <= N_STANDARD_ERRORS * standard_error), (
        running[-1] - expected
    ) / standard_error


def test_gradient_descent_mse_matches_matrix_exponential(x64):
    """Linearized MSE flow, loss :math:`\\|f - y\\|^2 / (2 n)` with ``n = y_train.size``.

    neural-tangents' convention: :math:`\\dot f = -\\eta \\Theta (f - y) / n` on the training
    set and :math:`\\dot f_* = -\\eta \\Theta_{*,train} (f - y) / n` on the test set, one copy
    per output channel (``trace_axes=(-1,)``). The reference integrates this linear system
    with ``scipy.linalg.expm`` of the stacked generator, with no eigendecomposition or solve.
    """
    x_train, x_test = _inputs()
    _, _, kernel_fn = _mlp()
    k_train_train = np.asarray(kernel_fn(x_train, None, "ntk"))
    k_test_train = np.asarray(kernel_fn(x_test, x_train, "ntk"))
    rng = np.random.default_rng(0)
    n_out = 2
    y_train = rng.normal(size=(N1, n_out))
    fx_train_0 = rng.normal(size=(N1, n_out))
    fx_test_0 = rng.normal(size=(N2, n_out))
    learning_rate, t = 0.7, 3.0

    predict_fn = nt.predict.gradient_descent_mse(
        jnp.asarray(k_train_train), jnp.asarray(y_train), learning_rate=learning_rate
    )
    fx_train_t, fx_test_t = predict_fn(
        t, jnp.asarray(fx_train_0), jnp.asarray(fx_test_0), jnp.asarray(k_test_train)
    )

    # z = (f_train - y, f_test) obeys dz/dt = A z.
    generator = (
        -learning_rate
        / y_train.size
        * np.block(
            [
                [k_train_train, np.zeros((N1, N2))],
                [k_test_train, np.zeros((N2, N2))],
            ]
        )
    )
    z_t = scipy.linalg.expm(generator * t) @ np.concatenate([fx_train_0 - y_train, fx_test_0])
    assert_close(fx_train_t, z_t[:N1] + y_train)
    assert_close(fx_test_t, z_t[N1:])


def test_batch_matches_unbatched(x64):
    x1 = jax.random.normal(jax.random.key(3), (8, WIDTH_IN), jnp.float64)
    _, _, kernel_fn = _mlp()
    batched = nt.batch(kernel_fn, batch_size=4, device_count=0)
    # Batched diagonal blocks see x1 and x2 as different arrays, so their diagonal goes
    # through arccos(1 - delta) with delta ~ eps, whose error is ~sqrt(eps); elsewhere exact.
    ntk = batched(x1, None, "ntk")
    diagonal = np.eye(x1.shape[0], dtype=bool)
    expected = np.asarray(kernel_fn(x1, None, "ntk"))
    assert_close(np.where(diagonal, expected, ntk), expected)
    np.testing.assert_allclose(np.diag(ntk), np.diag(expected), rtol=_arccos_at_one_rtol(ntk))
    x2 = jax.random.normal(jax.random.key(4), (4, WIDTH_IN), jnp.float64)
    assert_close(batched(x1, x2, "nngp"), kernel_fn(x1, x2, "nngp"))


def test_install_is_idempotent():
    before = list(sys.meta_path)
    rgnn._compat.install()
    rgnn._compat.install()
    assert sys.meta_path == before
    assert rgnn._compat.import_neural_tangents() is nt


def test_experimental_is_a_stub_that_explains_tensorflow():
    with pytest.raises(ImportError, match="tensorflow"):
        nt.experimental.empirical_ntk_fn_tf  # noqa: B018
    with pytest.raises(ImportError, match="tensorflow"):
        import neural_tangents.experimental.empirical_tf  # noqa: F401


def _run_python(code):
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, check=False
    )


def test_import_does_not_import_tensorflow():
    result = _run_python(
        """
        import sys
        import rgnn._compat
        nt = rgnn._compat.import_neural_tangents()
        nt.stax.Dense(1)
        bad = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "tf2jax"))
        assert not bad, bad
        """
    )
    assert result.returncode == 0, result.stderr


_ERROR_PATHS = """
    import importlib.metadata, json, sys, types
    import rgnn._compat

    def fake_version(result):
        def version(name):
            if result is None:
                raise importlib.metadata.PackageNotFoundError(name)
            return result
        return version

    messages = {}
    real_version = importlib.metadata.version
    for case, result in [("wrong_version", "0.6.4"), ("missing", None)]:
        importlib.metadata.version = fake_version(result)
        try:
            rgnn._compat.install()
        except ImportError as e:
            messages[case] = str(e)
    importlib.metadata.version = real_version
    sys.modules["neural_tangents"] = types.ModuleType("neural_tangents")
    try:
        rgnn._compat.install()
    except ImportError as e:
        messages["imported_without_hook"] = str(e)
    print(json.dumps(messages))
"""


@pytest.fixture(scope="module")
def install_errors():
    """``install()``'s error messages, from a fresh interpreter (this one has the hook)."""
    result = _run_python(_ERROR_PATHS)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("wrong_version", "supports neural-tangents 0.6.5 only, found 0.6.4"),
        ("missing", "neural-tangents is not installed"),
        ("imported_without_hook", "imported before rgnn._compat.install()"),
    ],
)
def test_install_errors_are_actionable(install_errors, case, message):
    assert message in install_errors[case]
    if case != "imported_without_hook":
        assert "pip install --no-deps neural-tangents==0.6.5" in install_errors[case]
