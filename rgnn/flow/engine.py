"""The flow engine: one ``lax.scan`` over layers carrying any set of statistics.

:func:`flow` takes the leading-order kernels of every layer on a batch of input sets (pairs
are sets of two, single inputs sets of one, ``full`` requests one set of all inputs), the
statistics asked for (names of :data:`rgnn.flow.rules.RULES`; what they need is added), and
returns each statistic on every layer. Per layer it builds one
:class:`~rgnn.flow.moments.Moments` (the Gaussian moments every rule asks for, each evaluated
once) and applies every update rule to the previous layer's statistics; the layers are one
``lax.scan`` (compiled once whatever the depth) and the sets one ``vmap``. One compilation per
(activation, statistics, set size, orders, kink treatment, dtype, shapes).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from rgnn.flow.moments import Moments
from rgnn.flow.rules import KMAX, RANK, RESIDUAL, RULES, Layer, closure


@partial(
    jax.jit,
    static_argnames=("act", "stats", "pointwise"),
)
def flow(act, cw, lam_w, ratios, inv_prev, ks, ts, rules, *, stats, pointwise=False, residual=None):
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

    def update(layer, n, res):
        new = RULES[n](layer)
        return new if res is None else RESIDUAL[n](layer, new, *res)

    def one(old, k, t, lw, r, inv, res):
        # a recording pass collects every moment the updates ask for (its arithmetic is dead
        # code, removed by the compiler); then all of them are evaluated at once
        rec = Moments(act, k, rules, pointwise=pointwise, kmax=kmax, record=True)
        for n in names:
            update(Layer(rec, old, t, cw=cw, lw=lw, r=r, inv=inv), n, res)
        mom = Moments(act, k, rules, pointwise=pointwise, kmax=kmax)
        mom.prepare(rec.recorded, rec.recorded_singles)
        layer = Layer(mom, old, t, cw=cw, lw=lw, r=r, inv=inv)
        new = {n: update(layer, n, res).x for n in names}
        return new, mom.multi_error()

    def step(carry, inp):
        k, t, lw, r, inv, res = inp
        new, err = jax.vmap(lambda c, kk, tt: one(c, kk, tt, lw, r, inv, res))(carry, k, t)
        return new, (new, jnp.max(err))

    init = jax.tree.map(lambda z: jnp.broadcast_to(z, (n_sets, *z.shape)), zeros())
    xs = (ks[:-1], ts[:-1], lam_w, ratios, inv_prev, residual)
    _, (outs, errs) = jax.lax.scan(step, init, xs)
    out = {n: jnp.concatenate([init[n][None], outs[n]]) for n in names}
    return out, jnp.max(errs, initial=0.0)
