"""Per-layer empirical NNGP and NTK of finite networks.

**Empirical NNGP.** Two estimators of layer ``l``'s kernel from one network:

* ``"metric"`` (default): the stochastic metric (PDLT eq. 4.50, THEORY.md)

  .. math::

      G^{(1)}_{ab} = C_b + \\frac{C_W}{n_0} \\sum_j x_{ja} x_{jb}, \\qquad
      G^{(l+1)}_{ab} = C_b + \\frac{C_W}{n_l} \\sum_{j=1}^{n_l}
          \\sigma(z^{(l)}_{ja}) \\sigma(z^{(l)}_{jb}),

  the covariance of ``z^{(l)}`` conditioned on the layers below. Its mean is
  ``K^{(l)} + O(1/n)`` and its fluctuations are ``O(1/sqrt(n))`` on every layer, the output
  included; its variance over initializations is ``V^{(l)}_{(ab)(ab)} / n_{l-1}``.
* ``"sample"``: ``(1/n_l) sum_i z^{(l)}_{ia} z^{(l)}_{ib}``, the unit average of the
  preactivations themselves (noisy on a narrow output layer).

**Empirical NTK.** The NTK of one unit ``i`` of layer ``l`` with respect to every parameter of
layers ``1..l``, from the layer structure (no Jacobian is formed):

.. math::

    \\hat\\Theta^{(l)}_{ab} = \\sum_{k=1}^{l}
        \\big(\\delta^{(k)}_a \\cdot \\delta^{(k)}_b\\big)
        \\big(a_{W,k}^2\\, h^{(k-1)}_a \\cdot h^{(k-1)}_b + a_{b}^2\\big),
    \\qquad \\delta^{(k)} = \\partial z^{(l)}_i / \\partial z^{(k)},

with ``h^{(0)} = x``, ``h^{(k)} = sigma(z^{(k)})``, and the backward signal
``delta^{(k-1)} = sigma'(z^{(k-1)}) * (a_{W,k} W^{(k)} delta^{(k)})``; ``a_W, a_b`` are the
parameterization's multipliers (:mod:`rgnn.architecture`). Each term is a forward-feature Gram
times a backward-signal Gram.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from rgnn._validate import check_pair
from rgnn.architecture import MLPNetwork
from rgnn.networks import Ensemble

__all__ = ["empirical_nngp", "empirical_ntk", "ESTIMATORS"]

ESTIMATORS = ("metric", "sample")


def _nngp_one(net: MLPNetwork, x1, x2, estimator: str):
    z1, z2 = net.preactivations(x1), net.preactivations(x2)
    if estimator == "sample":
        return jnp.stack([a @ b.T / a.shape[1] for a, b in zip(z1, z2, strict=True)])
    cw, cb = net.c_w, net.c_b
    h1 = [x1] + [net.activation(z) for z in z1[:-1]]
    h2 = [x2] + [net.activation(z) for z in z2[:-1]]
    return jnp.stack([cb + cw * (a @ b.T) / a.shape[1] for a, b in zip(h1, h2, strict=True)])


def _ntk_one(net: MLPNetwork, x1, x2, unit: int):
    z1, z2 = net.preactivations(x1), net.preactivations(x2)
    h1 = [x1] + [net.activation(z) for z in z1[:-1]]
    h2 = [x2] + [net.activation(z) for z in z2[:-1]]
    dact = jax.vmap(jax.vmap(jax.grad(net.activation)))
    out = []
    for top in range(len(net.layers)):
        width = z1[top].shape[1]
        e = jnp.zeros((width,), x1.dtype).at[unit % width].set(1.0)
        d1 = jnp.broadcast_to(e, z1[top].shape)
        d2 = jnp.broadcast_to(e, z2[top].shape)
        theta = jnp.zeros((x1.shape[0], x2.shape[0]), x1.dtype)
        for k in range(top, -1, -1):
            layer = net.layers[k]
            feat = layer.a_w**2 * (h1[k] @ h2[k].T)
            if layer.b is not None:
                feat = feat + layer.a_b**2
            theta = theta + (d1 @ d2.T) * feat
            if k > 0:
                w = layer.a_w * layer.w[...]
                d1 = dact(z1[k - 1]) * (d1 @ w.T)
                d2 = dact(z2[k - 1]) * (d2 @ w.T)
        out.append(theta)
    return jnp.stack(out)


@partial(jax.jit, static_argnames=("graphdef", "kind", "option", "batched"))
def _apply(graphdef, state, x1, x2, *, kind, option, batched):
    def one(s):
        net = nnx.merge(graphdef, s)
        if kind == "nngp":
            return _nngp_one(net, x1, x2, option)
        return _ntk_one(net, x1, x2, option)

    return jax.vmap(one)(state) if batched else one(state)


def _dispatch(model, x1, x2, kind, option):
    if isinstance(model, Ensemble):
        x1, x2 = check_pair(x1, x2)
        n0, graphdef, state, batched = model.in_dim, model.graphdef, model.state, True
    elif isinstance(model, MLPNetwork):
        x1, x2 = check_pair(x1, x2)
        graphdef, state = nnx.split(model)
        n0, batched = model.layers[0].w.shape[0], False
    else:
        raise ValueError(
            f"model: expected an rgnn.MLPNetwork or rgnn.Ensemble, got {type(model).__name__}"
        )
    if x1.shape[1] != n0:
        raise ValueError(
            f"x1: expected {n0} features (the network's input dimension), got {x1.shape[1]}"
        )
    x2 = x1 if x2 is None else x2
    return _apply(graphdef, state, x1, x2, kind=kind, option=option, batched=batched)


def empirical_nngp(model, x1, x2=None, *, estimator: str = "metric") -> jax.Array:
    """Per-layer empirical NNGP of a finite network or ensemble.

    Args:
      model: an :class:`~rgnn.MLPNetwork` or an :class:`~rgnn.Ensemble`.
      x1, x2: ``[N1, n_0]`` and optional ``[N2, n_0]`` inputs.
      estimator: ``"metric"`` (the stochastic metric ``G^{(l)}``) or ``"sample"``.

    Returns:
      ``[L+1, N1, N2]`` for a network, ``[M, L+1, N1, N2]`` for an ensemble.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator: expected one of {ESTIMATORS}, got {estimator!r}")
    return _dispatch(model, x1, x2, "nngp", estimator)


def empirical_ntk(model, x1, x2=None, *, unit: int = 0) -> jax.Array:
    """Per-layer empirical NTK of unit ``unit`` of each layer (exact, from the layer structure).

    Returns:
      ``[L+1, N1, N2]`` for a network, ``[M, L+1, N1, N2]`` for an ensemble.
    """
    if isinstance(unit, bool) or not isinstance(unit, int) or unit < 0:
        raise ValueError(f"unit: expected a non-negative integer, got {unit!r}")
    return _dispatch(model, x1, x2, "ntk", unit)
