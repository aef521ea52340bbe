"""Correlation tables: the caching strategy of the moment engine for one-norm layers.

Every two-input moment the flow needs -- the kernel maps ``<sigma(z_a) sigma(z_b)>``, the
moments of products of ``sigma`` and its derivatives that the update rules and their Price
operators read (:class:`rgnn.flow.moments.Moments`) -- is a Gaussian expectation
``S(K_aa, K_bb, K_ab)``. When a layer's variances are all equal, ``K_aa = q`` for every input
(normalized inputs: every layer then keeps one norm), each is a function of the correlation
``rho = K_ab / q`` alone, and the ``N (N - 1) / 2`` pair quadratures of the layer
(``order^2`` nodes each) can be replaced by ``G + 1`` of them on the nodes
``rho_g = -1 + 2 g / G`` and a local interpolation:

.. math::

    S(q, q, \\rho q) \\approx \\sum_{k=0}^{5} \\ell_k(t)\\, S(q, q, \\rho_{s+k} q), \\qquad
    t = \\frac{\\rho + 1}{h} - s,\\quad h = \\frac{2}{G},

with ``ell_k`` the degree-5 Lagrange basis on the six nodes ``s .. s+5`` around ``rho``
(``s = floor((rho + 1) / h) - 2``, clipped to the table). The interpolation error is

.. math::

    |S - \\hat S| \\le \\frac{h^6}{6!} \\max_{t} |t (t-1) \\cdots (t-5)|
        \\max \\Big|\\frac{d^6 S}{d\\rho^6}\\Big|, \\qquad
    \\frac{d^n}{d\\rho^n} \\langle F(z_a) G(z_b) \\rangle = q^n \\langle F^{(n)}(z_a)
        G^{(n)}(z_b) \\rangle

(Price's identity): finite up to ``rho = +-1`` for smooth activations, so the error falls like
``G^-6`` (``G = 1024``: below ``1e-8`` of each moment's scale for tanh at ``q <= 1``).
Kinks (relu) make ``d^2 S / d rho^2`` singular at ``rho = 1``; the scale-invariant class is
never tabulated (its exact polar integrals are cheap).

Honesty of the result. The error is *measured* on every layer, not assumed: at every midpoint
``(rho_g + rho_{g+1}) / 2``, where the Lagrange remainder is largest, the direct quadrature is
compared with the interpolant. Twice the largest difference, relative to the largest value of
the same moment on the table, is the layer's table error; the factor 2 covers the remainder's
peak off the midpoint in the first and last interval (the node polynomial there is up to 15%
larger than at the midpoint).

Two users: the moment engine (:func:`rgnn.flow.engine.moment_table`: the table of every moment
a set of statistics records, built once per layer outside the map over pairs, whose values
each pair's :class:`~rgnn.flow.moments.Moments` interpolates instead of integrating; the
update rules read the same moments either way), and the fixed point's kernel maps
(:func:`tabulated`, which decides the one-norm test per layer at run time and falls back to the
direct maps). Everything is jit-able and the dtype follows the kernel.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

INTERVALS = 1024
"""``G``: intervals of the correlation table (``G + 1`` nodes plus ``G`` midpoint checks)."""

_DEGREE = 5
_CHECK_PAIRS = 8
_SPREAD_EPS = 32


def worth_it(n_pairs: int) -> bool:
    """Whether a table (``2 G + 1`` direct evaluations plus checks) beats ``n_pairs`` of them."""
    return n_pairs >= 4 * INTERVALS


def _nodes(intervals: int, dtype):
    return jnp.linspace(-1.0, 1.0, intervals + 1, dtype=dtype)


def _lagrange(rho, intervals: int):
    """``(start [P], weights [P, 6])`` of the local degree-5 interpolant at ``rho``."""
    h = 2.0 / intervals
    pos = (rho + 1.0) / h
    start = jnp.clip(jnp.floor(pos).astype(jnp.int32) - 2, 0, intervals - _DEGREE)
    t = pos - start.astype(rho.dtype)
    ks = np.arange(_DEGREE + 1)
    cols = []
    for k in ks:
        num = jnp.ones_like(t)
        den = 1.0
        for m in ks:
            if m != k:
                num = num * (t - m)
                den *= float(k - m)
        cols.append(num / den)
    return start, jnp.stack(cols, axis=-1)


def interpolate(table, rho, intervals: int):
    """Interpolate every leaf ``[G + 1, ...]`` of ``table`` at the correlations ``rho [P]``."""
    start, weights = _lagrange(rho, intervals)
    leaves, tree = jax.tree_util.tree_flatten(table)
    # one [G + 1, F] table for all leaves, so each pair gathers six rows once
    flat = jnp.concatenate([leaf.reshape(leaf.shape[0], -1) for leaf in leaves], axis=1)
    out = weights[:, 0, None] * flat[start]
    for k in range(1, _DEGREE + 1):  # elementwise (a batched [6] x [6, F] dot is slow on CPU)
        out = out + weights[:, k, None] * flat[start + k]
    parts, at = [], 0
    for leaf in leaves:
        size = int(np.prod(leaf.shape[1:]))
        parts.append(out[:, at : at + size].reshape((rho.shape[0],) + leaf.shape[1:]))
        at += size
    return jax.tree_util.tree_unflatten(tree, parts)


def _relative_gap(exact, approx, scale_tree):
    gaps = jax.tree_util.tree_map(
        lambda e, a, s: jnp.max(jnp.abs(e - a)) / jnp.where(s > 0, s, 1.0),
        exact,
        approx,
        scale_tree,
    )
    return jnp.max(jnp.stack(jax.tree_util.tree_leaves(gaps)))


def tabulated(
    batch_fn: Callable,
    kaa: jax.Array,
    kab: jax.Array,
    kbb: jax.Array,
    *,
    intervals: int | None = None,
) -> tuple[object, jax.Array]:
    """``(batch_fn(kaa, kab, kbb), table_error)`` on the flat pair arrays ``[P]``.

    ``batch_fn`` maps three ``[B]`` arrays to a pytree of ``[B, ...]`` statistics. On a layer
    with one norm the statistics come from the correlation table (module docstring) and
    ``table_error`` is its measured relative error; otherwise from ``batch_fn`` on every pair
    and ``table_error = 0``. ``intervals`` defaults to :data:`INTERVALS`.
    """
    intervals = INTERVALS if intervals is None else intervals
    zero = jnp.zeros((), kab.dtype)
    diag = jnp.concatenate([kaa, kbb])
    q = jnp.mean(diag)
    eps = jnp.finfo(kab.dtype).eps
    one_norm = (q > 0) & (jnp.max(jnp.abs(diag - q)) <= _SPREAD_EPS * eps * q)

    def table_branch(k):
        kaa, kab, kbb = k
        rho_g = _nodes(intervals, kab.dtype)
        qq = jnp.full_like(rho_g, q)
        table = batch_fn(qq, q * rho_g, qq)
        rho = jnp.clip(kab / jnp.sqrt(kaa * kbb), -1.0, 1.0)
        out = interpolate(table, rho, intervals)
        scale = jax.tree_util.tree_map(lambda t: jnp.max(jnp.abs(t)), table)
        mid = 0.5 * (rho_g[1:] + rho_g[:-1])
        exact_mid = batch_fn(qq[1:], q * mid, qq[1:])
        err = _relative_gap(exact_mid, interpolate(table, mid, intervals), scale)
        pair_dev = jnp.abs(kaa - q) + jnp.abs(kbb - q)
        worst = jax.lax.top_k(pair_dev, min(_CHECK_PAIRS, kab.shape[0]))[1]
        exact_dev = batch_fn(kaa[worst], kab[worst], kbb[worst])
        approx_dev = jax.tree_util.tree_map(lambda o: o[worst], out)
        err = jnp.maximum(err, _relative_gap(exact_dev, approx_dev, scale))
        return out, 2 * err

    def direct_branch(k):
        return batch_fn(*k), zero

    return jax.lax.cond(one_norm, table_branch, direct_branch, (kaa, kab, kbb))


def one_norm(kd) -> bool:
    """Whether every row of the variances ``kd [L, N]`` (NumPy, outside jit) is one positive
    norm within the rounding of normalized inputs (a relative spread of ``32 eps``), so that
    the layer's two-input moments are functions of the correlation alone. The residual spread
    changes a moment by about ``32 eps`` times its logarithmic derivative in the variance:
    rounding level."""
    kd = np.asarray(kd)
    q = np.mean(kd, axis=-1, keepdims=True)
    eps = np.finfo(kd.dtype).eps
    return bool(np.all(q > 0) and np.all(np.abs(kd - q) <= _SPREAD_EPS * eps * q))


def midpoints(intervals: int, dtype):
    """The ``G`` midpoints of the table's intervals, where its error is measured."""
    rho = _nodes(intervals, dtype)
    return 0.5 * (rho[1:] + rho[:-1])


def table_error(exact, approx, table):
    """Twice the largest ``|exact - approx|`` over the midpoints (``[G, F]``), relative to each
    moment's largest value on the table (``[G + 1, F]``); a moment that vanishes on the whole
    table (by symmetry, up to rounding: below ``64 eps`` of the largest moment) is measured
    against the largest moment instead, so its rounding does not count as a relative error."""
    scale = jnp.max(jnp.abs(table), axis=0)
    top = jnp.max(scale)
    floor = 64 * jnp.finfo(table.dtype).eps * top
    scale = jnp.where(scale > floor, scale, jnp.maximum(top, jnp.finfo(table.dtype).tiny))
    return 2 * jnp.max(jnp.max(jnp.abs(exact - approx), axis=0) / scale)
