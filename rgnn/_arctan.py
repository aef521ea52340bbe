r"""``arctan2`` as a polynomial that XLA vectorizes, with the exact derivative.

On the CPU, XLA lowers ``jnp.arctan2`` to one scalar library call per element: measured at
N = 2000 (4M float32 entries) it takes 100 ms, against 2 ms for a square root and 1.3 ms for a
degree-10 polynomial over the same array. The angle of the relu family's arc-cosine kernel and
the ``T`` of the exact GELU kernel (:mod:`rgnn._gelu`) are such angles, once per kernel entry
per layer, so :func:`arctan2` is written here in operations that vectorize.

Derivation (ours). For ``(x, y)`` put ``big = max(|x|, |y|)``, ``small = min(|x|, |y|)``, so
``atan(small / big)`` is in ``[0, pi/4]``. Where ``small > tan(pi/8) big`` use
``atan(q) = pi/4 + atan((q - 1) / (q + 1))``, i.e. divide ``small - big`` by ``small + big``
instead of ``small`` by ``big``: one division either way, and the reduced argument ``u``
satisfies ``|u| <= tan(pi/8)``, so ``z = u^2 <= 3 - 2 sqrt 2 = 0.1716``. There

.. math::

    \arctan u = u + u z\, g(z), \qquad
    g(z) = \sum_{k \ge 1} \frac{(-1)^k z^{k-1}}{2k + 1} = -\tfrac13 + \tfrac{z}{5} - \dots

and ``g`` is replaced by a polynomial ``P`` of ``n`` terms. ``P`` was fitted (by us, with
NumPy) to minimize the largest relative error of ``arctan u``, ``z |P - g| / (1 + z g)``, on
``z`` in ``[0, 0.1716]``: weighted least squares on 3000 Chebyshev points with ``g`` from its
series in ``long double``, iteratively reweighted towards the minimax solution (Lawson). The
largest relative error of the polynomial is ``6.7e-10`` with ``n = 5`` (float32, whose half
ulp is ``6e-8``) and ``1.3e-18`` with ``n = 11`` (float64, half ulp ``1.1e-16``); what remains
is the rounding of a handful of operations. The octant is then restored exactly:
``pi/2 - a`` where ``|y| > |x|``, ``pi - a`` where ``x < 0`` (``x = -0.0`` included) and the
sign of ``y`` (``y = -0.0`` included), as ``jnp.arctan2`` does, and ``arctan2(0, 0) = 0``.
Measured against ``np.arctan2`` in ``long double`` (tests/test_fixed_point.py): at most 2 ulp
in float32 and float64.

The derivative is the exact one, ``d atan2(y, x) = (x dy - y dx) / (x^2 + y^2)``
(``jax.custom_jvp``), not the derivative of the polynomial, and higher derivatives follow
from it.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

__all__ = ["arctan2"]

_TAN_PI_8 = math.sqrt(2.0) - 1.0

_COEF = {
    # n = 5: largest relative error of the polynomial 6.7e-10 (for float32 and narrower)
    32: (
        -0.333333151879909,
        0.1999847148390088,
        -0.1424353282426968,
        0.10593810275711955,
        -0.06078213407246762,
    ),
    # n = 11: 1.3e-18 (for float64)
    64: (
        -0.333333333333332,
        0.19999999999953208,
        -0.14285714280162534,
        0.11111110781953319,
        -0.09090897719477713,
        0.07692059615564986,
        -0.06663098058019397,
        0.05847851034299361,
        -0.05039153756964099,
        0.0380612197390743,
        -0.01790404407876832,
    ),
}
"""Coefficients of ``P(z) = sum_k c_k z^k`` (module docstring), by the float's bits."""


@jax.custom_jvp
def arctan2(y: jax.typing.ArrayLike, x: jax.typing.ArrayLike) -> jax.Array:
    """``atan2(y, x)`` elementwise, in ``[-pi, pi]``; the dtype follows the inputs.

    A drop-in for ``jnp.arctan2`` on floating inputs (module docstring): within 2 ulp of the
    true angle, vectorized by XLA, with the exact derivative.
    """
    dtype = jnp.result_type(y, x)
    if not jnp.issubdtype(dtype, jnp.floating):
        dtype = jnp.result_type(dtype, float)
    y, x = jnp.broadcast_arrays(jnp.asarray(y, dtype), jnp.asarray(x, dtype))
    coef = _COEF[64 if jnp.finfo(dtype).bits > 32 else 32]
    ax, ay = jnp.abs(x), jnp.abs(y)
    big, small = jnp.maximum(ax, ay), jnp.minimum(ax, ay)
    far = small > _TAN_PI_8 * big
    num = jnp.where(far, small - big, small)
    den = jnp.where(far, small + big, big)
    # a product with the reciprocal: XLA then fuses the whole function into one loop (a
    # quotient used twice is not fused, and each unfused step is a pass over memory)
    u = num * (1.0 / jnp.where(den > 0, den, 1.0))
    z = u * u
    p = jnp.full_like(z, coef[-1])
    for c in reversed(coef[:-1]):
        p = p * z + c
    a = u + u * (z * p)
    a = jnp.where(far, math.pi / 4 + a, a)
    a = jnp.where(ay > ax, math.pi / 2 - a, a)
    a = jnp.where(jnp.signbit(x), math.pi - a, a)
    return jnp.where(jnp.signbit(y), -a, a)


@arctan2.defjvp
def _arctan2_jvp(primals, tangents):
    y, x = primals
    dy, dx = tangents
    out = arctan2(y, x)
    return out, (x * dy - y * dx) / (x * x + y * y)
