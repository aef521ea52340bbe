"""Gaussian expectations of one and two correlated variables by Gauss-Hermite quadrature.

For ``(u, v) ~ N(0, [[k11, k12], [k12, k22]])`` write ``u = sqrt(k11) x`` and
``v = (k12 / sqrt(k11)) x + sqrt(k22 - k12^2 / k11) y`` with ``x, y`` independent standard
normals (a Cholesky factorization), and integrate each with the probabilists' Gauss-Hermite
rule of ``order`` nodes:

.. math::

    \\langle f(u) g(v) \\rangle \\approx \\sum_{i,j} w_i w_j f(u(x_i)) g(v(x_i, y_j)),
    \\qquad \\sum_i w_i = 1 .

The rule is exact for polynomials of degree ``2 order - 1`` in each variable; for functions
analytic in a strip it converges exponentially in ``sqrt(order)``; for kinks (relu) only
algebraically, which is why relu-like activations use closed forms (:mod:`rgnn.activations`).
:func:`quadrature_error` estimates the error of a rule by comparing it with a rule of twice the
order. Memory is ``O(batch * order)``: the outer sum is a ``lax.scan`` over nodes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["hermite_rule", "expect", "expect_pair", "expect_pairs", "quadrature_error"]


def hermite_rule(order: int, dtype=None) -> tuple[jax.Array, jax.Array]:
    """Nodes and weights of the ``order``-point Gauss-Hermite rule for a standard normal.

    ``sum_i w_i f(x_i) ~ E[f(x)], x ~ N(0, 1)``; weights sum to one.
    """
    if not isinstance(order, int | np.integer) or order < 1:
        raise ValueError(f"order: expected a positive integer, got {order!r}")
    t, w = np.polynomial.hermite.hermgauss(int(order))
    dtype = dtype or jnp.result_type(float)
    return jnp.asarray(t * np.sqrt(2.0), dtype), jnp.asarray(w / np.sqrt(np.pi), dtype)


def expect(f: Callable, k: jax.Array, *, order: int = 64) -> jax.Array:
    """``E[f(u)]`` for ``u ~ N(0, k)``, elementwise over the array ``k``."""
    k = jnp.asarray(k)
    x, w = hermite_rule(order, jnp.result_type(k.dtype, float))
    sd = jnp.sqrt(jnp.maximum(k, 0.0))[..., None]
    return jnp.sum(w * f(sd * x), axis=-1)


def _cholesky(k11, k22, k12):
    s1 = jnp.sqrt(jnp.maximum(k11, 0.0))
    safe = jnp.where(s1 > 0, s1, 1.0)
    c = jnp.where(s1 > 0, k12 / safe, 0.0)
    s2 = jnp.sqrt(jnp.maximum(k22 - c * c, 0.0))
    return s1, c, s2


def expect_pairs(
    pairs: Sequence[tuple[Callable, Callable]],
    k11: jax.Array,
    k22: jax.Array,
    k12: jax.Array,
    *,
    order: int = 64,
    max_block: int = 2**24,
) -> tuple[jax.Array, ...]:
    """``E[f(u) g(v)]`` for each ``(f, g)`` in ``pairs``, sharing the quadrature nodes.

    Elementwise over the broadcast of ``k11, k22, k12`` (variances and covariance). The outer
    node sum is a ``lax.scan``; the inner one is vectorized while ``entries * order`` stays
    below ``max_block`` elements and scanned too otherwise, so memory stays ``O(entries)``.
    """
    k11, k22, k12 = jnp.broadcast_arrays(*(jnp.asarray(a) for a in (k11, k22, k12)))
    dtype = jnp.result_type(k11.dtype, float)
    x, w = hermite_rule(order, dtype)
    s1, c, s2 = _cholesky(k11, k22, k12)
    zero = tuple(jnp.zeros(k11.shape, dtype) for _ in pairs)

    if k11.size * order <= max_block:

        def step(acc, node):
            xi, wi = node
            u = s1 * xi
            v = (c * xi)[..., None] + s2[..., None] * x
            return tuple(
                a + wi * f(u) * jnp.sum(w * g(v), axis=-1)
                for a, (f, g) in zip(acc, pairs, strict=True)
            ), None

        acc, _ = jax.lax.scan(step, zero, (x, w))
        return acc

    xx = jnp.repeat(x, order)
    yy = jnp.tile(x, order)
    ww = jnp.repeat(w, order) * jnp.tile(w, order)

    def step2(acc, node):
        xi, yj, wij = node
        u = s1 * xi
        v = c * xi + s2 * yj
        return tuple(a + wij * f(u) * g(v) for a, (f, g) in zip(acc, pairs, strict=True)), None

    acc, _ = jax.lax.scan(step2, zero, (xx, yy, ww))
    return acc


def expect_pair(
    f: Callable,
    g: Callable,
    k11: jax.Array,
    k22: jax.Array,
    k12: jax.Array,
    *,
    order: int = 64,
) -> jax.Array:
    """``E[f(u) g(v)]`` for the bivariate normal ``(k11, k22, k12)``, elementwise (broadcasting).

    Args:
      f, g: elementwise JAX functions.
      k11, k22, k12: variances and covariance, broadcastable arrays.
      order: Gauss-Hermite nodes per dimension (``order**2`` evaluations per entry).
    """
    return expect_pairs([(f, g)], k11, k22, k12, order=order)[0]


def quadrature_error(
    f: Callable,
    g: Callable,
    k11: jax.Array,
    k22: jax.Array,
    k12: jax.Array,
    *,
    order: int = 64,
) -> jax.Array:
    """Estimated absolute error of :func:`expect_pair` at ``order``: ``|E_order - E_(2 order)|``."""
    lo = expect_pair(f, g, k11, k22, k12, order=order)
    hi = expect_pair(f, g, k11, k22, k12, order=2 * order)
    return jnp.abs(lo - hi)
