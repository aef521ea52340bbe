"""Closed-form exact-GELU kernels (rgnn._gelu) against independent numerical integration.

Reference. ``E[f(u) g(v)]`` by the trapezoidal rule in the whitened coordinates
``u = sqrt(k11) z1``, ``v = sqrt(k22) (rho z1 + sqrt(1 - rho^2) z2)`` with ``z ~ N(0, I)``, step
``h`` on ``[-10, 10]^2``, plain numpy/scipy. For an entire integrand times a Gaussian the
trapezoidal rule converges like ``exp(-c / h^2)`` (much faster than Gauss-Hermite here, whose
nodes spread out as the order grows: 200 nodes leave 1e-6..1e-4 error at k = 10, rho = +-1), and the
truncation at ``|z| = 10`` costs ``~exp(-50)``. It is exact on ``rho = +-1`` (then
``sqrt(1 - rho^2) = 0``). The discretisation error is measured, not assumed: the rule at ``h`` and
at a coarser ``5h/4`` agree to ``QUAD_AGREE`` (asserted below; measured <= 8e-15 on the grid,
which is the roundoff of the 40,000-term weighted sum where the integrand changes sign).

Tolerances (float64). ``RTOL = 1e-12`` is the contract; with the reference good to ~1e-14 and the
closed forms measured at <= 6e-15 on this grid, a failure means a wrong formula, not noise. The
grid avoids the zeros of the kernels (``gelu_nngp`` changes sign at some ``rho < 0``), so the
plain relative error is meaningful. Price's theorem checks compare ``jax.grad`` (exact
differentiation of the formula: ``PRICE_RTOL = 1e-12``) and a 5-point finite difference
(truncation ~h^4, roundoff ~eps/h with h = 1e-3 sqrt(k11 k22): ``FD_RTOL = 1e-8``).
"""

from __future__ import annotations

import contextlib
import itertools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import ndtr

from rgnn._gelu import gelu_dnngp, gelu_mean, gelu_nngp, gelu_second

RTOL = 1e-12
QUAD_AGREE = 1e-13
PRICE_RTOL = 1e-12
FD_RTOL = 1e-8
JIT_RTOL = 1e-14

KS = (1e-3, 0.1, 1.0, 10.0)
RHOS = (-1.0, -0.999, -0.5, 0.0, 0.3, 0.9, 0.999999, 1.0)


@contextlib.contextmanager
def _x64():
    """Local 64-bit mode, restored afterwards (never a global switch)."""
    if hasattr(jax, "enable_x64"):
        with jax.enable_x64(True):
            yield
    else:  # older JAX
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            from jax.experimental import enable_x64
        with enable_x64():
            yield


def _sigma(x):
    return x * ndtr(x)


def _dsigma(x):
    return ndtr(x) + x * np.exp(-0.5 * x * x) / np.sqrt(2.0 * np.pi)


def _trapezoid(h, half_width=10.0):
    n = int(round(half_width / h))
    z = np.arange(-n, n + 1) * h
    return z, h * np.exp(-0.5 * z * z) / np.sqrt(2.0 * np.pi)


def _quad2(f, k11, k22, rho, h):
    """``E[f(u) f(v)]`` by the 2D trapezoidal rule in whitened coordinates."""
    z, w = _trapezoid(h)
    u = np.sqrt(k11) * z
    v = np.sqrt(k22) * (rho * z[:, None] + np.sqrt(max(1.0 - rho * rho, 0.0)) * z[None, :])
    return float(np.sum(w[:, None] * w[None, :] * f(u)[:, None] * f(v)))


def _quad1(g, k, h=0.1):
    """``E[g(u)]``, ``u ~ N(0, k)``, by the 1D trapezoidal rule; the step shrinks with sqrt(k)
    so that ``Phi(u)`` (width 1 in u) stays resolved."""
    z, w = _trapezoid(h / max(1.0, np.sqrt(k)))
    return float(np.sum(w * g(np.sqrt(k) * z)))


def _grid():
    k11, k22, rho = (np.array(t) for t in zip(*itertools.product(KS, KS, RHOS), strict=True))
    return k11, k22, rho, rho * np.sqrt(k11 * k22)


@pytest.fixture(scope="module")
def reference():
    k11, k22, rho, _ = _grid()
    out = {}
    for name, f in (("nngp", _sigma), ("dnngp", _dsigma)):
        for h in (0.1, 0.125):
            out[name, h] = np.array(
                [_quad2(f, a, b, r, h) for a, b, r in zip(k11, k22, rho, strict=True)]
            )
    return out


def _rel(x, y):
    return np.abs(np.asarray(x) - y) / np.abs(y)


@pytest.mark.parametrize("name", ["nngp", "dnngp"])
def test_reference_quadrature_converged(reference, name):
    assert np.max(_rel(reference[name, 0.125], reference[name, 0.1])) < QUAD_AGREE


@pytest.mark.parametrize("name, fn", [("nngp", gelu_nngp), ("dnngp", gelu_dnngp)])
def test_closed_form_matches_quadrature(reference, name, fn):
    k11, k22, rho, k12 = _grid()
    with _x64():
        got = np.asarray(fn(k11, k22, k12))
    assert got.dtype == np.float64
    err = _rel(got, reference[name, 0.1])
    worst = np.argmax(err)
    assert err[worst] < RTOL, (k11[worst], k22[worst], rho[worst], err[worst])


@pytest.mark.parametrize("k", [0.0, 1e-6, 1e-3, 0.1, 1.0, 10.0, 1e3])
def test_single_variable_and_diagonal(k):
    with _x64():
        mean, second = float(gelu_mean(k)), float(gelu_second(k))
        diag = float(gelu_nngp(k, k, k))
        anti = float(gelu_nngp(k, k, -k))
        d_diag = float(gelu_dnngp(k, k, k))
        d_anti = float(gelu_dnngp(k, k, -k))
    if k == 0.0:
        assert (mean, second, diag, anti, d_diag, d_anti) == (0.0, 0.0, 0.0, 0.0, 0.25, 0.25)
        return
    # 1D references (rho = +-1 means v = +-u); for k up to 1e3 the step is 0.1 / sqrt(k).
    refs = {
        "mean": (mean, _quad1(_sigma, k)),
        "second": (second, _quad1(lambda u: _sigma(u) ** 2, k)),
        "diag": (diag, _quad1(lambda u: _sigma(u) ** 2, k)),
        "anti": (anti, _quad1(lambda u: _sigma(u) * _sigma(-u), k)),
        "d_diag": (d_diag, _quad1(lambda u: _dsigma(u) ** 2, k)),
        "d_anti": (d_anti, _quad1(lambda u: _dsigma(u) * _dsigma(-u), k)),
    }
    for key, (got, ref) in refs.items():
        assert abs(got - ref) <= RTOL * abs(ref), (key, got, ref)


def test_degenerate_variances():
    # k11 = 0: u = 0, sigma(u) = 0 and sigma'(u) = 1/2, so F = 0 and dF = E[sigma'(v)] / 2 = 1/4.
    with _x64():
        assert float(gelu_nngp(0.0, 0.0, 0.0)) == 0.0
        assert float(gelu_dnngp(0.0, 0.0, 0.0)) == 0.25
        np.testing.assert_allclose(gelu_nngp(0.0, 3.0, 0.0), 0.0, atol=1e-300)
        np.testing.assert_allclose(gelu_dnngp(0.0, 3.0, 0.0), 0.25, rtol=RTOL)


def test_price_theorem_autodiff():
    # Exact differentiation of (NNGP) must reproduce (NTK), including at rho = +-1 where the
    # formulas stay smooth (D >= 1).
    k11, k22, _, k12 = _grid()
    with _x64():
        grad = jax.vmap(jax.grad(gelu_nngp, argnums=2))(k11, k22, k12)
        np.testing.assert_allclose(grad, gelu_dnngp(k11, k22, k12), rtol=PRICE_RTOL, atol=0)


def test_price_theorem_finite_difference():
    k11, k22, rho = (
        np.array(t)
        for t in zip(
            *itertools.product((0.1, 1.0, 10.0), (0.1, 1.0, 10.0), (-0.5, 0.3, 0.9)), strict=True
        )
    )
    k12 = rho * np.sqrt(k11 * k22)
    h = 1e-3 * np.sqrt(k11 * k22)
    with _x64():

        def f(c):
            return np.asarray(gelu_nngp(k11, k22, c))

        fd = (-f(k12 + 2 * h) + 8 * f(k12 + h) - 8 * f(k12 - h) + f(k12 - 2 * h)) / (12 * h)
        np.testing.assert_allclose(fd, gelu_dnngp(k11, k22, k12), rtol=FD_RTOL, atol=0)


@pytest.mark.parametrize("fn", [gelu_nngp, gelu_dnngp])
def test_jit_matches_eager(fn):
    k11, k22, _, k12 = _grid()
    with _x64():
        np.testing.assert_allclose(
            jax.jit(fn)(k11, k22, k12), fn(k11, k22, k12), rtol=JIT_RTOL, atol=0
        )


@pytest.mark.parametrize("fn", [gelu_nngp, gelu_dnngp])
@pytest.mark.parametrize("k", [0.0, 1e-6, 1.0, 1e3])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_gradients_finite_on_the_diagonal(fn, k, sign):
    with _x64():
        for args in [(k, k, sign * k), (k, 2.0 * k, sign * np.sqrt(2.0) * k)]:
            grads = jax.grad(fn, argnums=(0, 1, 2))(*args)
            assert all(np.isfinite(float(g)) for g in grads), (args, grads)
        for single in (gelu_mean, gelu_second):
            assert np.isfinite(float(jax.grad(single)(k)))


def test_broadcast_and_vmap():
    with _x64():
        k11 = np.array([0.5, 2.0, 7.0])
        k12 = np.array([[0.1], [-0.3]])
        full = gelu_nngp(k11, 1.5, k12)
        assert full.shape == (2, 3)
        by_vmap = jax.vmap(lambda c: gelu_nngp(k11, 1.5, c))(k12[:, 0])
        np.testing.assert_allclose(by_vmap, full, rtol=JIT_RTOL, atol=0)


@pytest.mark.parametrize("fn", [gelu_nngp, gelu_dnngp])
def test_float32_follows_input_dtype(fn):
    k11, k22, _, k12 = (np.asarray(x, np.float32) for x in _grid())
    out32 = fn(k11, k22, k12)
    assert out32.dtype == jnp.float32
    assert gelu_mean(np.float32(1.0)).dtype == jnp.float32
    assert gelu_second(np.float32(1.0)).dtype == jnp.float32
    with _x64():
        assert fn(k11, k22, k12).dtype == jnp.float32  # still float32 with x64 enabled
        a, b, c = (x.astype(np.float64) for x in (k11, k22, k12))
        out64 = np.asarray(fn(a, b, c))
        # Error relative to the natural scale (Cauchy-Schwarz bound for F; |dF| <= ~1.2).
        scale = np.sqrt(gelu_second(a) * gelu_second(b)) if fn is gelu_nngp else 1.0
    assert np.max(np.abs(np.asarray(out32, np.float64) - out64) / scale) < 1e-5
