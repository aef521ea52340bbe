r"""Closed-form Gaussian kernels of the exact GELU, ``sigma(x) = x Phi(x)``.

Notation. ``(u, v) ~ N(0, [[a, c], [c, b]])`` with ``a = k11``, ``b = k22``, ``c = k12``;
``phi``/``Phi`` are the standard normal density/CDF; ``H`` is the Heaviside step, ``delta = H'``.

Derivation.

(D0) Lifting. With ``xi1, xi2 ~ N(0, 1)`` independent of ``(u, v)``, ``Phi(u) = E[H(u - xi1) | u]``.
  Put ``A = u - xi1``, ``B = v - xi2``. Then ``sigma(u) sigma(v) -> u v H(A) H(B)`` in
  expectation, and ``(u, v, A, B)`` is jointly Gaussian with
  ``Var A = a + 1``, ``Var B = b + 1``, ``Cov(A, B) = c``,
  ``Cov(u, A) = a``, ``Cov(u, B) = c``, ``Cov(v, A) = c``, ``Cov(v, B) = b``.
  Define ``P = (a + 1)(b + 1)`` and ``D = P - c^2 = (a b - c^2) + a + b + 1 >= 1``
  (the determinant of ``Cov(A, B)``). Because ``D >= 1`` even on the diagonal ``c^2 = a b``,
  none of the formulas below is singular at ``rho = c / sqrt(a b) = +-1``.

(D1) Three Gaussian facts for ``(A, B)``:
  ``E[H(A) H(B)] = 1/4 + arcsin(c / sqrt(P)) / (2 pi) = T / (2 pi)``, where
  ``T = pi/2 + arcsin(c / sqrt P) = atan2(sqrt D, -c)`` (the atan2 form has no cancellation for
  ``c < 0``);
  ``E[delta(A) delta(B)] = p_AB(0, 0) = 1 / (2 pi sqrt D)``;
  ``E[delta'(A) H(B)] = -d/dx [p_A(x) P(B > 0 | A = x)]_{x=0} = -c / (2 pi (a + 1) sqrt D)``
  (``p_A'(0) = 0``; ``B | A = x ~ N(c x / (a+1), D / (a+1))``), and symmetrically
  ``E[H(A) delta'(B)] = -c / (2 pi (b + 1) sqrt D)``.

(D2) Stein's lemma ``E[X g(Y)] = sum_i Cov(X, Y_i) E[d_i g(Y)]``, first on ``u``:
  ``E[u v H(A) H(B)] = c E[H H] + a E[v delta(A) H(B)] + c E[v H(A) delta(B)]``, then on ``v``:
  ``E[v delta(A) H(B)] = c E[delta'(A) H(B)] + b E[delta(A) delta(B)]``,
  ``E[v H(A) delta(B)] = c E[delta(A) delta(B)] + b E[H(A) delta'(B)]``.
  Inserting (D1), the ``1/(2 pi sqrt D)`` terms collect to
  ``a b - a c^2/(a+1) + c^2 - b c^2/(b+1) = (a b D + c^2) / P``, so

  (NNGP)   ``E[sigma(u) sigma(v)] = c T / (2 pi) + (a b D + c^2) / (2 pi P sqrt D)``.

(D3) Price's theorem, ``E[sigma'(u) sigma'(v)] = d/dc E[sigma(u) sigma(v)]``. With
  ``dT/dc = 1 / sqrt D`` and ``dD/dc = -2 c``:
  ``d/dc (c T) = T + c / sqrt D`` and
  ``d/dc ((a b D + c^2) D^(-1/2)) = c (2 D - a b D + c^2) / D^(3/2)``; using
  ``P - a b = a + b + 1``,

  (NTK)    ``E[sigma'(u) sigma'(v)] = T / (2 pi) + c ((a + b + 3) D + c^2) / (2 pi P D^(3/2))``.

  Checks: ``c = 0`` gives ``E[sigma(u)] E[sigma(v)]`` and ``1/4 = (1/2)^2``; ``a = b = c = 0``
  gives ``0`` and ``1/4``.

(D4) One variable. Stein: ``E[u Phi(u)] = a E[phi(u)] = a / sqrt(2 pi (1 + a))``, so

  (MEAN)   ``E[sigma(u)] = a / sqrt(2 pi (1 + a))``.

  The diagonal ``a = b = c = k`` of (NNGP) has ``P = (k + 1)^2``, ``D = 2 k + 1``,
  ``T = atan2(sqrt(2k + 1), -k) = pi - arccos(k / (k + 1))``:

  (SECOND) ``E[sigma(u)^2] = k T / (2 pi) + k^2 / (pi (k + 1) sqrt(2 k + 1))``.

(D5) Stable rearrangement. ``T`` is the angle with ``cos T = -c / sqrt P``,
  ``sin T = sqrt(D / P)``, so ``sin T cos T = -c sqrt(D) / P``. Let
  ``S = T - sin T cos T = T + c sqrt(D) / P = (2T - sin 2T) / 2`` and ``det = a b - c^2``.
  Substituting ``a b = det + c^2`` and ``a + b + 1 = D - det`` into (NNGP) and (NTK):

  (NNGP')  ``2 pi E[sigma(u) sigma(v)] = c S + (det D + c^2) / (P sqrt D)``,
  (NTK')   ``2 pi E[sigma'(u) sigma'(v)] = S + c (c^2 + (2 - det) D) / (P D^(3/2))``.

  For ``c < 0`` (``T < pi/2``), (NNGP) subtracts two ``O(sqrt a)`` terms to get an
  ``O(1/sqrt a)`` result when ``c ~ -sqrt(a b)``, ``a, b >> 1``; in (NNGP') that cancellation is
  carried analytically by ``S = O(T^3)``, evaluated for ``T < 1`` by the Taylor series of
  ``(x - sin x) / 2``, ``x = 2T`` (12 terms: truncation below float64 eps on ``x < 2``), and
  directly as ``T + c sqrt(D) / P`` otherwise (no cancellation for ``c >= 0``; at most a factor
  ~2 for ``c < 0``, ``T >= 1``).

Numerics. ``T = atan2(sqrt D, -c)`` is accurate for all ``c`` (the vectorized
:func:`rgnn._arctan.arctan2`, within 3 ulp: ``jnp.arctan2`` is one scalar library call per entry on
the CPU, 50 times slower); the series of (D5) keeps 7 terms in float32 (truncation 3e-10 relative);
``D`` is assembled as ``det + (a + b + 1)``, so the ``c^2 ~ a b`` cancellation only touches ``det``,
whose rounding error (``~ eps a b``) is that of a half-ulp perturbation of the inputs. ``D >= 1``
means no ``where`` guards against ``0/0`` are needed: values and gradients are finite on the whole
closed domain, including ``rho = +-1`` and ``a = b = 0``. All constants are Python floats, so the
computation follows the floating dtype of the inputs (integer inputs are promoted to the default
float dtype).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from rgnn._arctan import arctan2

__all__ = ["gelu_nngp", "gelu_dnngp", "gelu_mean", "gelu_second"]

_TWO_PI = 2.0 * math.pi
# Taylor coefficients of (x - sin x) / 2 = x^3 sum_n _S_COEF[n] (x^2)^n, n = 0..11.
_S_COEF = tuple((-1.0) ** n / (2.0 * math.factorial(2 * n + 3)) for n in range(12))
# Terms of the series used, for float32 and narrower (False) and float64 (True): the first
# omitted term, relative to the leading one on x < 2, is 4^n 3! / (2n + 3)!: 2.8e-10 for
# n = 7 (float32 eps 1.2e-7), 9.2e-21 for n = 12 (float64 eps 2.2e-16).
_S_TERMS = {False: 7, True: 12}


def _as_float(*xs: jax.typing.ArrayLike) -> list[jax.Array]:
    """Cast to the common dtype of ``xs`` (the default float dtype if that is not inexact) and
    broadcast explicitly (so strict rank promotion is respected)."""
    dtype = jnp.result_type(*xs)
    if not jnp.issubdtype(dtype, jnp.inexact):
        dtype = jnp.result_type(dtype, float)
    return jnp.broadcast_arrays(*(jnp.asarray(x, dtype) for x in xs))


def _lifted(k11, k22, k12):
    """``(c, P, D, sqrt D, det, S)`` of (D0), (D1), (D5) in the module docstring."""
    a, b, c = _as_float(k11, k22, k12)
    p = (a + 1.0) * (b + 1.0)
    det = a * b - c * c
    d = det + (a + b + 1.0)
    sqrt_d = jnp.sqrt(d)
    t = arctan2(sqrt_d, -c)
    # S = T - sin T cos T: Taylor series in x = 2T for T < 1, direct otherwise (D5).
    x2 = 4.0 * t * t
    series = jnp.zeros_like(t)
    for coef in reversed(_S_COEF[: _S_TERMS[jnp.finfo(t.dtype).bits > 32]]):
        series = series * x2 + coef
    s = jnp.where(t < 1.0, 8.0 * t * t * t * series, t + c * sqrt_d / p)
    return c, p, d, sqrt_d, det, s


def gelu_nngp(k11: jax.typing.ArrayLike, k22: jax.typing.ArrayLike, k12: jax.typing.ArrayLike):
    """``E[sigma(u) sigma(v)]`` for the exact GELU; formulas (NNGP) = (NNGP') of the docstring.

    ``(c S + (det D + c^2) / (P sqrt D)) / (2 pi)`` with ``a, b, c = k11, k22, k12``,
    ``P = (a+1)(b+1)``, ``det = a b - c^2``, ``D = P - c^2``, ``T = atan2(sqrt D, -c)``,
    ``S = T + c sqrt(D) / P``. Broadcasts elementwise.
    """
    c, p, d, sqrt_d, det, s = _lifted(k11, k22, k12)
    return (c * s + (det * d + c * c) / (p * sqrt_d)) / _TWO_PI


def gelu_dnngp(k11: jax.typing.ArrayLike, k22: jax.typing.ArrayLike, k12: jax.typing.ArrayLike):
    """``E[sigma'(u) sigma'(v)]``, ``sigma' = Phi + x phi``; formulas (NTK) = (NTK') of the docs.

    ``(S + c (c^2 + (2 - det) D) / (P D^(3/2))) / (2 pi)``; equals ``d gelu_nngp / d k12``.
    """
    c, p, d, sqrt_d, det, s = _lifted(k11, k22, k12)
    return (s + c * (c * c + (2.0 - det) * d) / (p * d * sqrt_d)) / _TWO_PI


def gelu_mean(k: jax.typing.ArrayLike):
    """``E[sigma(u)]`` for ``u ~ N(0, k)``; formula (MEAN): ``k / sqrt(2 pi (1 + k))``."""
    (k,) = _as_float(k)
    return k / jnp.sqrt(_TWO_PI * (1.0 + k))


def gelu_second(k: jax.typing.ArrayLike):
    """``E[sigma(u)^2]`` for ``u ~ N(0, k)``; formula (SECOND), the diagonal of (NNGP).

    ``k T / (2 pi) + k^2 / (pi (k + 1) sqrt(2k + 1))`` with ``T = atan2(sqrt(2k + 1), -k)``.
    """
    (k,) = _as_float(k)
    s = jnp.sqrt(2.0 * k + 1.0)
    t = jnp.arctan2(s, -k)
    return (k * t + 2.0 * k * k / ((k + 1.0) * s)) / _TWO_PI


def gelu_maps(k11: jax.typing.ArrayLike, k22: jax.typing.ArrayLike, k12: jax.typing.ArrayLike):
    """``(gelu_nngp, gelu_dnngp)`` sharing one evaluation of the common terms."""
    c, p, d, sqrt_d, det, s = _lifted(k11, k22, k12)
    nngp = (c * s + (det * d + c * c) / (p * sqrt_d)) / _TWO_PI
    dnngp = (s + c * (c * c + (2.0 - det) * d) / (p * d * sqrt_d)) / _TWO_PI
    return nngp, dnngp
