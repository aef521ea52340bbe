"""The flow engine: one ``lax.scan`` over layers carrying any set of statistics.

:func:`flow` takes the leading-order kernels of every layer on a batch of input sets (pairs
are sets of two, single inputs sets of one, ``full`` requests one set of all inputs), the
statistics asked for (names of :data:`rgnn.flow.rules.RULES`; what they need is added), and
returns each statistic on every layer. Per layer it builds one
:class:`~rgnn.flow.moments.Moments` (the Gaussian moments every rule asks for, each evaluated
once) and applies every update rule to the previous layer's statistics; the layers are one
``lax.scan`` (compiled once whatever the depth) and the sets one ``vmap``. One compilation per
(activation, statistics, set size, orders, kink treatment, dtype, shapes).

Many pairs on one-norm layers (smooth activations): :func:`moment_table` evaluates every
two-input moment the statistics record once per layer on a table of correlations
(:mod:`rgnn.flow.table`), and :func:`flow` with ``table`` lets each pair's
:class:`~rgnn.flow.moments.Moments` interpolate those values instead of integrating them (its
``prepare`` takes them as given); the update rules read the same moments either way.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from rgnn.flow import table as _table
from rgnn.flow.moments import Moments
from rgnn.flow.rules import KMAX, RANK, RESIDUAL, RULES, Layer, closure


def _update(layer, name, res):
    """One statistic's update: the plain rule, then its residual form when ``res`` is given."""
    new = RULES[name](layer)
    return new if res is None else RESIDUAL[name](layer, new, *res)


def _record(act, names, k, t, rules, *, pointwise, kmax, cw=1.0, lw=1.0, r=1.0, inv=1.0, res=None):
    """The moments the updates of ``names`` ask for on a set with kernel ``k`` (a recording
    pass: its arithmetic is dead code, removed by the compiler)."""
    m = k.shape[0]
    old = {n: jnp.zeros((m,) * RANK.get(n, 4), k.dtype) for n in names}
    rec = Moments(act, k, rules, pointwise=pointwise, kmax=kmax, record=True)
    for n in names:
        _update(Layer(rec, old, t, cw=cw, lw=lw, r=r, inv=inv), n, res)
    return tuple(rec.recorded), tuple(rec.recorded_singles)


@partial(
    jax.jit,
    static_argnames=("act", "stats", "pointwise"),
)
def flow(
    act,
    cw,
    lam_w,
    ratios,
    inv_prev,
    ks,
    ts,
    rules,
    table=None,
    *,
    stats,
    pointwise=False,
    residual=None,
):
    """Every statistic in ``stats`` on every layer and set.

    Args:
      act: the activation.
      cw: ``C_W``.
      lam_w: ``[L]`` ``lambda_W`` of layer ``l + 1`` for the step ``l -> l + 1``.
      ratios, inv_prev: ``[L]`` ``n_l / n_{l-1}`` and ``1 / n_{l-1}``.
      ks, ts: ``[L+1, S, m, m]`` the leading-order NNGP and NTK kernels on ``S`` sets of ``m``.
      stats: names of the statistics wanted (:data:`rgnn.flow.rules.DEPENDS`).
      rules: the quadrature rules (:func:`rgnn.flow.moments.rules`); their sizes are part of
        the compiled shape, their nodes are not (an error estimate with a shifted rule reuses
        the compilation).
      table: ``None``, or ``[L, G + 1, F]`` the layers' moment tables of :func:`moment_table`
        (pair sets on one-norm layers): each pair's one- and two-input moments interpolated
        at its correlation instead of integrated.
      pointwise: drop the second derivative of kinked activations.
      residual: ``None`` (a plain MLP), or ``(gamma, xi)``, each ``[L]``, the residual factors
        of layer ``l + 1`` for the step ``l -> l + 1`` (``0, 1`` on plain layers): each
        statistic's plain update is followed by its residual form
        (:data:`rgnn.flow.rules.RESIDUAL`; a statistic without one raises a ``ValueError``).
    Returns:
      ``(out, err)``: ``out[name]`` ``[L+1, S, m, ..., m]`` for every name in the closure of
      ``stats``; ``err`` the largest estimated relative error of the three/four-input rule
      (``0`` when none was needed).
    """
    names = closure(stats)
    n_sets, m = ks.shape[1], ks.shape[2]
    dtype = ks.dtype

    def zeros():
        return {n: jnp.zeros((m,) * RANK.get(n, 4), dtype) for n in names}

    kmax = max(KMAX[n] for n in names)
    if residual is not None:
        missing = [n for n in names if n not in RESIDUAL]
        if missing:
            raise ValueError(
                f"stats: the residual-layer recursions of {missing} are not derived; "
                f"available on residual networks: {sorted(RESIDUAL)}"
            )

    def one(old, k, t, lw, r, inv, res, values):
        specs, singles = _record(act, names, k, t, rules, pointwise=pointwise, kmax=kmax, res=res)
        mom = Moments(act, k, rules, pointwise=pointwise, kmax=kmax, fence=lw)
        mom.prepare(specs, singles, values)
        layer = Layer(mom, old, t, cw=cw, lw=lw, r=r, inv=inv)
        new = {n: _update(layer, n, res).x for n in names}
        return new, mom.multi_error()

    def step(carry, inp):
        k, t, lw, r, inv, res, tab = inp
        values = None
        if tab is not None:  # every pair's moments from the layer's table, at its correlation
            rho = jnp.clip(k[:, 0, 1] / jnp.sqrt(k[:, 0, 0] * k[:, 1, 1]), -1.0, 1.0)
            values = _table.interpolate(tab, rho, tab.shape[0] - 1)
        new, err = jax.vmap(lambda c, kk, tt, vv: one(c, kk, tt, lw, r, inv, res, vv))(
            carry, k, t, values
        )
        return new, (new, jnp.max(err))

    init = jax.tree.map(lambda z: jnp.broadcast_to(z, (n_sets, *z.shape)), zeros())
    xs = (ks[:-1], ts[:-1], lam_w, ratios, inv_prev, residual, table)
    _, (outs, errs) = jax.lax.scan(step, init, xs)
    out = {n: jnp.concatenate([init[n][None], outs[n]]) for n in names}
    return out, jnp.max(errs, initial=0.0)


@partial(jax.jit, static_argnames=("act", "stats", "pointwise", "intervals"))
def moment_table(act, q, rules, *, stats, pointwise=False, intervals=_table.INTERVALS):
    """Every two-input moment of ``stats`` on the correlation nodes of each layer.

    For a smooth activation on layers whose inputs all have the variance ``q[l]``: the flat
    moment vector of :meth:`~rgnn.flow.moments.Moments.flat_values` (what a pair's
    ``prepare`` evaluates) at the kernels ``q [[1, rho_g], [rho_g, 1]]`` on the ``G + 1``
    nodes ``rho_g`` of :mod:`rgnn.flow.table`, and its measured error at the ``G`` midpoints.

    Args:
      q: ``[L]`` the variance of every input entering each step.
    Returns:
      ``(table [L, G + 1, F], err [L])``: ``err`` the table's relative error on each layer
      (:func:`rgnn.flow.table.table_error`).
    """
    names = closure(stats)
    kmax = max(KMAX[n] for n in names)
    dtype = q.dtype
    eye = jnp.eye(2, dtype=dtype)
    specs, singles = _record(act, names, eye, eye, rules, pointwise=pointwise, kmax=kmax)
    nodes = _table._nodes(intervals, dtype)
    mids = _table.midpoints(intervals, dtype)

    def values(qq, rho):
        k = qq * jnp.array([[1.0, 0.0], [0.0, 1.0]], dtype) + qq * rho * (1.0 - eye)
        return Moments(act, k, rules, pointwise=pointwise, kmax=kmax).flat_values(specs, singles)

    def layer(qq):
        tab = jax.vmap(lambda rho: values(qq, rho))(nodes)  # [G + 1, F]
        exact = jax.vmap(lambda rho: values(qq, rho))(mids)
        approx = _table.interpolate(tab, mids, intervals)
        return tab, _table.table_error(exact, approx, tab)

    return jax.lax.map(layer, q)
