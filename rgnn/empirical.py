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

  For a residual layer (:mod:`rgnn.architecture`) the metric is the conditional second
  moment averaged over units,
  ``G^{(l+1)}_{ab} = gamma^2 (1/n_l) sum_j z^{(l)}_{ja} z^{(l)}_{jb}
  + xi^2 [C_b + (C_W/n_l) sum_j sigma(z^{(l)}_{ja}) sigma(z^{(l)}_{jb})]``, of mean
  ``K^{(l+1)} + O(1/n)``; its unit-average form makes its covariance the vertex plus a
  same-unit term (:func:`measure` removes it).

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
times a backward-signal Gram. A residual layer ``k`` multiplies its term by ``xi_k^2`` and
passes the signal down as ``delta^{(k-1)} = sigma'(z^{(k-1)}) * (xi_k a_{W,k} W^{(k)}
delta^{(k)}) + gamma_k delta^{(k)}``.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rgnn._validate import check_pair
from rgnn.architecture import MLPNetwork
from rgnn.networks import Ensemble

__all__ = [
    "empirical_nngp",
    "empirical_ntk",
    "measure",
    "Measurement",
    "ESTIMATORS",
    "DNTK_UNITS",
    "NTK_UNITS",
]

ESTIMATORS = ("metric", "sample")

DNTK_UNITS = 3
"""Units per layer whose dNTK :func:`measure` estimates (every ordered pair of them is used)."""

NTK_UNITS = 4
"""Units per layer whose NTK block :func:`measure` uses for the four-index NTK fields
``ntk_vertex``, ``mixed_vertex`` and ``ntk_b`` (every ordered pair of different units)."""

_MEMORY_LIMIT_BYTES = 8 * 2**30
_CHUNK_ELEMENTS = 2**23  # per-network samples reduced at a time (64 MiB in float64)


def _nngp_one(net: MLPNetwork, x1, x2, estimator: str):
    z1, z2 = net.preactivations(x1), net.preactivations(x2)
    if estimator == "sample":
        return jnp.stack([a @ b.T / a.shape[1] for a, b in zip(z1, z2, strict=True)])
    cw, cb = net.c_w, net.c_b
    h1 = [x1] + [net.activation(z) for z in z1[:-1]]
    h2 = [x2] + [net.activation(z) for z in z2[:-1]]
    gs = [cb + cw * (a @ b.T) / a.shape[1] for a, b in zip(h1, h2, strict=True)]
    if net.residual is not None:  # residual layers: gamma^2 z.z / n + xi^2 G (module docstring)
        gamma, xi = net.residual
        for k in range(1, len(gs) - 1):
            zz = z1[k - 1] @ z2[k - 1].T / z1[k - 1].shape[1]
            gs[k] = xi[k] ** 2 * gs[k] + gamma[k] ** 2 * zz
    return jnp.stack(gs)


def _ntk_block(net: MLPNetwork, x1, x2, units):
    """The empirical NTK between several units of every layer.

    ``units[l]`` is a tuple of unit indices of layer ``l + 1`` (0-based list index ``l``; an
    empty tuple skips the layer, ``None`` in its place, and layers past ``len(units)`` are not
    computed); returns, per layer, ``[u_l, u_l, N1, N2]`` with entry ``[i, j, a, b]`` the NTK
    ``H_{k_i k_j; ab}`` of units ``k_i = units[l][i]`` and ``k_j`` (the formula of the module
    docstring with one backward signal per unit). ``x2=None`` means ``x2 = x1`` (one set of
    backward signals serves both sides).

    One backward sweep from the highest requested layer down to the input carries the signals
    of every requested unit together: the signals of layer ``l``'s units join the sweep at
    layer ``l``, so each weight matrix is read once per sweep (not once per requested layer
    above it), and the ``U`` signals of all layers cost ``U^2`` signal Grams per layer.
    """
    same = x2 is None
    z1 = net.preactivations(x1)
    z2 = z1 if same else net.preactivations(x2)
    h1 = [x1] + [net.activation(z) for z in z1[:-1]]
    h2 = h1 if same else [x2] + [net.activation(z) for z in z2[:-1]]
    dact = jax.vmap(jax.vmap(jax.grad(net.activation)))
    n1 = x1.shape[0]
    n2 = n1 if same else x2.shape[0]
    tops = [layer for layer, sel in enumerate(units) if sel]
    if not tops:
        return [None] * len(units)
    res = net.residual
    spans = {}  # top -> (first signal row, unit count)
    d1 = d2 = None  # [U, N, width of z^(k)]: the signals of every unit joined so far
    theta = {}
    for k in range(max(tops), -1, -1):
        sel = units[k] if k < len(units) else None
        if sel:
            width = z1[k].shape[1]
            e = np.zeros((len(sel), 1, width))
            e[np.arange(len(sel)), 0, np.asarray(sel)] = 1.0
            e = jnp.asarray(e, x1.dtype)
            new1 = jnp.broadcast_to(e, (len(sel), n1, width))
            new2 = jnp.broadcast_to(e, (len(sel), n2, width))
            start = 0 if d1 is None else d1.shape[0]
            spans[k] = (start, len(sel))
            d1 = new1 if d1 is None else jnp.concatenate([d1, new1])
            d2 = new2 if d2 is None else jnp.concatenate([d2, new2])
        layer = net.layers[k]
        feat = layer.a_w**2 * (h1[k] @ h2[k].T)
        if layer.b is not None:
            feat = feat + layer.a_b**2
        if res is not None:
            feat = res[1][k] ** 2 * feat
        # every (unit, input) row against every other: one matrix product, blocks sliced below
        rows = d1.shape[0]
        right = d1 if same else d2
        gram = d1.reshape(rows * n1, -1) @ right.reshape(rows * n2, -1).T
        gram = gram.reshape(rows, n1, rows, n2).transpose(0, 2, 1, 3) * feat[None, None]
        for top, (start, u) in spans.items():
            block = gram[start : start + u, start : start + u]
            theta[top] = block if top not in theta else theta[top] + block
        if k > 0:
            # a residual layer (not the plain output layer, whose width may differ):
            # dz^(k)/dz^(k-1) = xi W sigma' + gamma I
            residual = res is not None and k < len(net.layers) - 1
            w = layer.a_w * layer.w[...]
            if residual:
                w = res[1][k] * w
            d1_next = dact(z1[k - 1])[None] * (d1 @ w.T)
            if not same:
                d2_next = dact(z2[k - 1])[None] * (d2 @ w.T)
            if residual:
                d1_next = d1_next + res[0][k] * d1
                if not same:
                    d2_next = d2_next + res[0][k] * d2
            d1 = d1_next
            d2 = d1 if same else d2_next
    return [theta.get(layer) for layer in range(len(units))]


def _ntk_one(net: MLPNetwork, x1, x2, unit: int):
    widths = [layer.w.shape[1] for layer in net.layers]
    blocks = _ntk_block(net, x1, x2, tuple((unit % w,) for w in widths))
    return jnp.stack([b[0, 0] for b in blocks])


@partial(jax.jit, static_argnames=("graphdef", "kind", "option", "batched"))
def _apply(graphdef, state, x1, x2, *, kind, option, batched):
    def one(s):
        net = nnx.merge(graphdef, s)
        if kind == "nngp":
            return _nngp_one(net, x1, x1 if x2 is None else x2, option)
        if kind == "ntk_block":
            return _ntk_block(net, x1, x2, option)
        return _ntk_one(net, x1, x2, option)

    return jax.vmap(one)(state) if batched else one(state)


@partial(jax.jit, static_argnames=("model", "kind", "option", "batched"))
def _model_apply(model, state, x1, x2, *, kind, option, batched):
    """Kernels of a :class:`rgnn.models.Model`: ``[1, N1, N2]`` per network (its output layer,
    or with ``kind="features"`` the named layer ``option``)."""

    def one(params):
        if kind == "nngp":
            return model.empirical_nngp(params, x1, x2)[None]
        if kind == "features":
            h1, h2 = model.features(params, x1, option), model.features(params, x2, option)
            return (h1 @ h2.T / h1.shape[1])[None]
        return model.empirical_ntk(params, x1, x2, unit=option)[None]

    return jax.vmap(one)(state) if batched else one(state)


def _dispatch(model, x1, x2, kind, option, layer=None):
    from rgnn.models import FlaxModel, Model, _is_nnx, _is_triple, as_model

    if isinstance(model, Ensemble) and model.graphdef is None:
        x1, x2 = check_pair(x1, x2)
        arch, state, batched = model.arch, model.state, True
        n0 = model.in_dim
    elif isinstance(model, Ensemble):
        x1, x2 = check_pair(x1, x2)
        n0, graphdef, state, batched = model.in_dim, model.graphdef, model.state, True
    elif isinstance(model, MLPNetwork):
        x1, x2 = check_pair(x1, x2)
        graphdef, state = nnx.split(model)
        n0, batched = model.layers[0].w.shape[0], False
    elif _is_nnx(model) or isinstance(model, FlaxModel):
        x1, x2 = check_pair(x1, x2)
        arch = as_model(model)
        state, batched, n0 = arch.init(jax.random.key(0), x1), False, x1.shape[1]
    elif _is_triple(model) or isinstance(model, Model):
        raise ValueError(
            "model: a stax triple (or model family) is a distribution of networks, not one "
            "network; draw networks with rgnn.ensemble(arch, in_dim, n_networks=..., key=...)"
        )
    else:
        raise ValueError(
            "model: expected an rgnn.MLPNetwork, rgnn.Ensemble or a flax nnx module, got "
            f"{type(model).__name__}"
        )
    if x1.shape[1] != n0:
        raise ValueError(
            f"x1: expected {n0} features (the network's input dimension), got {x1.shape[1]}"
        )
    is_mlp = isinstance(model, MLPNetwork) or (
        isinstance(model, Ensemble) and model.graphdef is not None
    )
    if not is_mlp:
        if layer is not None:
            if not isinstance(arch, FlaxModel):
                raise ValueError(
                    f"layer: feature layers are named in flax models only, not a {arch.kind} model"
                )
            kind, option = "features", layer
        elif kind == "nngp" and isinstance(arch, FlaxModel) and not batched:
            raise ValueError(
                "layer: expected the name of a feature layer (a submodule attribute, dots for "
                "nesting) for the empirical NNGP of a flax model"
            )
        state = jax.tree_util.tree_map(lambda a: jnp.asarray(a, x1.dtype), state)
        x2 = x1 if x2 is None else x2
        return _model_apply(arch, state, x1, x2, kind=kind, option=option, batched=batched)
    if layer is not None:
        raise ValueError("layer: feature layers are named in flax models only, not an rgnn.MLP")
    return _apply(graphdef, state, x1, x2, kind=kind, option=option, batched=batched)


def empirical_nngp(
    model, x1, x2=None, *, estimator: str = "metric", layer: str | None = None
) -> jax.Array:
    """Per-layer empirical NNGP of a finite network or ensemble.

    Args:
      model: an :class:`~rgnn.MLPNetwork`, an :class:`~rgnn.Ensemble` (of an MLP or of any
        :class:`rgnn.models.Model`), or a flax nnx module (with ``layer``).
      x1, x2: ``[N1, n_0]`` and optional ``[N2, n_0]`` inputs.
      estimator: ``"metric"`` (the stochastic metric ``G^{(l)}``) or ``"sample"`` (MLP only).
      layer: for a flax module, the attribute path of a submodule (``"hidden"``,
        ``"block.dense"``): the kernel ``h(x1) h(x2)^T / n`` of its output ``h`` (flattened to
        ``n`` features), ``[1, N1, N2]``.

    Returns:
      ``[L+1, N1, N2]`` for a network, ``[M, L+1, N1, N2]`` for an ensemble. For an ensemble of
      a model, ``[M, 1, N1, N2]``: the output layer's metric only (:mod:`rgnn.models`; NaN
      where it is not defined, e.g. always for a flax model without ``layer``).
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator: expected one of {ESTIMATORS}, got {estimator!r}")
    if layer is not None and not isinstance(layer, str):
        raise ValueError(f"layer: expected a submodule name, got {layer!r}")
    return _dispatch(model, x1, x2, "nngp", estimator, layer=layer)


def empirical_ntk(model, x1, x2=None, *, unit: int = 0) -> jax.Array:
    """Per-layer empirical NTK of unit ``unit`` of each layer (exact, from the layer structure).

    For an ensemble of a :class:`rgnn.models.Model` or a flax nnx module: the NTK of output
    unit ``unit`` with respect to every parameter, ``[M, 1, N1, N2]`` (``[1, N1, N2]`` for one
    module), exact by VJPs and JVPs without a Jacobian (:func:`rgnn.models.ntk_jvp`).

    Returns:
      ``[L+1, N1, N2]`` for a network, ``[M, L+1, N1, N2]`` for an ensemble.
    """
    if isinstance(unit, bool) or not isinstance(unit, int) or unit < 0:
        raise ValueError(f"unit: expected a non-negative integer, got {unit!r}")
    return _dispatch(model, x1, x2, "ntk", unit)


# ----------------------------------------------------------------------------- Monte Carlo
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Measurement:
    """Monte Carlo estimates over an ensemble of finite networks, each with its standard error.

    Fields mirror :class:`~rgnn.Perturbative` (``<field>_se`` is the standard error of
    ``<field>``), layer axis first, ``N`` inputs:

    Attributes:
      nngp: ``[L+1, N, N]`` mean of the stochastic metric ``G^{(l)}`` over networks.
      nngp_correction: ``[L+1, N, N]`` ``mean(G) - K`` (``K`` the infinite-width kernel).
      nngp_variance: ``[L+1, N, N]`` variance of ``G^{(l)}_{ab}`` over networks (unbiased).
      kurtosis: ``[L+1, N]`` excess kurtosis ``E z^4 / (E z^2)^2 - 3`` of ``z^{(l)}_a``. Given
        the layer below, ``z^{(l)}_a`` is exactly Gaussian with variance ``G^{(l)}_{aa}``, so
        ``E z^4 = 3 E[G_aa^2]`` and the estimate ``3 mean(G_aa^2) / mean(G_aa)^2 - 3`` is the
        conditional-expectation (Rao-Blackwell) form of the direct ``z^4`` estimate: the same
        expectation with a much smaller variance. Standard error by the delta method over
        networks.
      ntk: ``[L+1, N, N]`` mean empirical NTK of one unit per layer.
      ntk_correction: ``[L+1, N, N]`` ``mean(NTK) - Theta`` (``Theta`` the infinite-width NTK).
      ntk_variance: ``[L+1, N, N]`` its variance over networks.
      vertex: ``[L+1, N, N, 3, 3]``, or ``[L+1, N, N, N, N]`` with ``full=True``
        (``measure(..., vertex=True)`` or ``full=True``, else ``None``): the four-point vertex
        ``V_{(a1 a2)(a3 a4)} = n_{l-1} Cov(G_{a1 a2}, G_{a3 a4})``, ``n_{l-1}`` times the
        unbiased covariance over networks of two entries of the stochastic metric. Pair layout
        as :attr:`rgnn.Perturbative.vertex` (components ``(aa, ab, bb)`` of the pair
        ``(a, b)``); full layout ``vertex[l, a1, a2, a3, a4]``. Zero on layer 1.
      ntk_vertex: the same layouts, PDLT's ``A``: ``n_{l-1} Cov(H_{ii; a1 a2}, H_{jj; a3 a4})``
        for two *different* units ``i != j`` of layer ``l``, averaged over the ordered pairs of
        the first :data:`NTK_UNITS` units (each pair's covariance unbiased, with its own unit
        means). Given the layer below, two units' NTKs are independent with the same mean, the
        NTK metric ``H~`` (the neuron average of the NTK recursion), so this is exactly
        ``n_{l-1} Cov(H~, H~)``. NaN on a layer narrower than 2 units; ``None`` with
        ``ntk=False``.
      mixed_vertex: the same layouts, PDLT's ``D``: ``n_{l-1} Cov(G_{a1 a2}, h_{a3 a4})`` with
        ``h`` the mean of ``H_{ii}`` over the first :data:`NTK_UNITS` units; ``G`` is fixed by
        the layer below and ``E[H_{ii} | below] = H~``, so this is ``n_{l-1} Cov(G, H~)``.
      ntk_b: ``[L+1, N, N, 2]`` (``(B_aabb, B_abba)`` of the pair, as
        :attr:`rgnn.Perturbative.ntk_b`), or ``[L+1, N, N, N, N]`` with ``full=True``
        (``ntk_b[l, a1, a2, a3, a4] = B_{a1 a2 a3 a4}``): PDLT's ``B``, ``n_{l-1}`` times the
        mean over networks and over the ordered pairs ``i != j`` of the first
        :data:`NTK_UNITS` units of ``H_{ij; a1 a3} H_{ij; a2 a4}`` (``E[H_{ij}] = 0`` for
        ``i != j``: the sign of the top layer's row ``i`` is symmetric). NaN on a layer
        narrower than 2 units. The four-index fields are estimated on every index tuple the
        layout holds by one code: the pair layout is the restriction of the full one to the
        tuples of two inputs.
      dntk_p, dntk_q: ``[L+1, N, N, 2, 2, 2, 2]``, or ``[L+1, N, N, N, N]`` with ``full=True``
        (``measure(..., dntk=True)``, else ``None``)
        PDLT's dNTK-preactivation correlators ``P`` and ``Q`` in the pair layout of
        :class:`~rgnn.Perturbative` (full: ``dntk_p[l, a0, a1, a2, a3] = P_{a0 a1 a2 a3}``):
        ``n_{l-1}`` times the mean of
        ``dH_{i j j; a0 a1 a2} z_{i; a3}`` (``P``) and ``dH_{i i j; a0 a1 a2} z_{j; a3}``
        (``Q``) over the ordered pairs ``i != j`` of the first :data:`DNTK_UNITS` units of each
        layer and over networks, the dNTK taken by automatic differentiation (a
        Jacobian-vector product of the empirical NTK along the gradient of ``z_{i; a0}``).
        NaN on a layer narrower than 2 units.
      ddntk_r, ddntk_s, ddntk_t, ddntk_u: ``[L+1, N, N, 2, 2, 2, 2]``, or
        ``[L+1, N, N, N, N]`` with ``full=True`` (``measure(..., ddntk=True)``, else ``None``)
        PDLT's ddNTK means (ch. infinity) in the same layouts,
        with ``z_{i;a}`` the preactivations of layer ``l``, ``g_{i;a} = dz_{i;a}/dtheta`` their
        gradients over all parameters of layers ``1..l`` (plain Euclidean metric over the
        flattened parameters, as the NTK) and

        .. math::

            ddI_{i_0 i_1 i_2 i_3; a_0 a_1 a_2 a_3}
                = D^3 z_{i_0; a_0}[g_{i_1; a_1}, g_{i_2; a_2}, g_{i_3; a_3}], \\qquad
            ddII_{i_1 i_2 i_3 i_4; a_1 a_2 a_3 a_4}
                = g_{i_3; a_3}^T \\nabla^2 z_{i_1; a_1} \\nabla^2 z_{i_2; a_2} g_{i_4; a_4},

        whose means are ``E[ddI] = (d_{i0i1} d_{i2i3} R_{a0a1a2a3} + d_{i0i2} d_{i3i1}
        R_{a0a2a3a1} + d_{i0i3} d_{i1i2} R_{a0a3a1a2}) / n`` and ``E[ddII] = (d_{i1i2} d_{i3i4}
        S_{a1a2a3a4} + d_{i1i3} d_{i2i4} T_{a1a3a4a2} + d_{i1i4} d_{i2i3} U_{a1a4a2a3}) / n``
        at ``O(1/n)``, ``n = n_{l-1}``, ``d`` the Kronecker delta. Estimated as ``n_{l-1}``
        times the mean over the ordered pairs ``i != j`` of the first :data:`DNTK_UNITS` units
        and over networks of
        ``R_{a0a1a2a3} <- ddI_{iijj; a0a1a2a3}``, ``S_{a1a2a3a4} <- ddII_{iijj; a1a2a3a4}``,
        ``T_{a1a3a4a2} <- ddII_{ijij; a1a2a3a4}``, ``U_{a1a4a2a3} <- ddII_{ijji; a1a2a3a4}``.
        Exactly, per network: ``R_{a0a1a2a3} = R_{a0a1a3a2}``, ``S_{a1a2a3a4} =
        S_{a2a1a4a3}``, ``T_{a0a1a2a3} = T_{a3a2a1a0}``, ``U_{a0a1a2a3} = U_{a2a3a0a1}``; all
        four vanish on layer 1 (``z^{(1)}`` is linear in its parameters). NaN on a layer
        narrower than 2 units.
      n_networks: ensemble size.
      full: whether the four-index fields are in the full layout (static).
    """

    nngp: jax.Array
    nngp_se: jax.Array
    nngp_correction: jax.Array
    nngp_correction_se: jax.Array
    nngp_variance: jax.Array
    nngp_variance_se: jax.Array
    kurtosis: jax.Array
    kurtosis_se: jax.Array
    ntk: jax.Array
    ntk_se: jax.Array
    ntk_correction: jax.Array
    ntk_correction_se: jax.Array
    ntk_variance: jax.Array
    ntk_variance_se: jax.Array
    vertex: jax.Array | None = None
    vertex_se: jax.Array | None = None
    ntk_vertex: jax.Array | None = None
    ntk_vertex_se: jax.Array | None = None
    mixed_vertex: jax.Array | None = None
    mixed_vertex_se: jax.Array | None = None
    ntk_b: jax.Array | None = None
    ntk_b_se: jax.Array | None = None
    dntk_p: jax.Array | None = None
    dntk_p_se: jax.Array | None = None
    dntk_q: jax.Array | None = None
    dntk_q_se: jax.Array | None = None
    ddntk_r: jax.Array | None = None
    ddntk_r_se: jax.Array | None = None
    ddntk_s: jax.Array | None = None
    ddntk_s_se: jax.Array | None = None
    ddntk_t: jax.Array | None = None
    ddntk_t_se: jax.Array | None = None
    ddntk_u: jax.Array | None = None
    ddntk_u_se: jax.Array | None = None
    n_networks: int = dataclasses.field(default=0, metadata=dict(static=True))
    full: bool = dataclasses.field(default=False, metadata=dict(static=True))


@partial(jax.jit, static_argnames=("graphdef", "units", "chunk"))
def _dntk_correlators(graphdef, state, x, widths, *, units, chunk):
    """Per network and layer, ``n_{l-1}`` times the unit-pair averages that estimate ``P`` and
    ``Q``: two lists of ``[M, N, N, N, N]`` (NaN for a layer with fewer than 2 units)."""

    def one(s):
        flat, unravel = jax.flatten_util.ravel_pytree(s)

        def layer_z(theta, layer):
            net = nnx.merge(graphdef, unravel(theta))
            return net.preactivations(x)[layer][:, : units[layer]]

        ps, qs = [], []
        for layer, u in enumerate(units):
            n = x.shape[0]
            if u < 2:
                nan = jnp.full((n,) * 4, jnp.nan, x.dtype)
                ps.append(nan)
                qs.append(nan)
                continue
            if layer == 0:  # z^(1) is linear in its parameters: its NTK is constant, dH = 0
                ps.append(jnp.zeros((n,) * 4, x.dtype))
                qs.append(jnp.zeros((n,) * 4, x.dtype))
                continue

            def flat_z(theta, layer=layer):
                return layer_z(theta, layer).reshape(-1)

            def ntk(theta, layer=layer, u=u):
                # the NTK of the layer's first u units, [i1, i2, a1, a2]: jac @ jac.T over the
                # flattened parameters, from the layer structure (no Jacobian is formed)
                net = nnx.merge(graphdef, unravel(theta))
                sel = ((),) * layer + (tuple(range(u)),)
                return _ntk_block(net, x, None, sel)[layer]

            jac = jax.jacrev(flat_z)(flat)  # rows (a0, i0): the gradients of z_{i0; a0}
            dh = jax.vmap(lambda v, ntk=ntk: jax.jvp(ntk, (flat,), (v,))[1])(jac)
            dh = dh.reshape(n, u, u, u, n, n)  # [a0, i0, i1, i2, a1, a2]
            z = layer_z(flat, layer)  # [a3, i3]
            off = 1.0 - jnp.eye(u, dtype=x.dtype)
            pairs = u * (u - 1)
            # P: i0 = i3 = i, i1 = i2 = j; Q: i0 = i1 = i, i2 = i3 = j (i != j)
            p = jnp.einsum("aijjbc,di,ij->abcd", dh, z, off) / pairs
            q = jnp.einsum("aiijbc,dj,ij->abcd", dh, z, off) / pairs
            ps.append(widths[layer] * p)
            qs.append(widths[layer] * q)
        return jnp.stack(ps), jnp.stack(qs)

    # vmapped ``chunk`` networks at a time: the Jacobian-vector products hold N * units
    # parameter-sized tangents per network (measure picks tens of networks: larger batches
    # run slower on CPU)
    return jax.lax.map(one, state, batch_size=chunk)


def _ddntk_blocks(flat_z, theta, n, u):
    """The building blocks of the ddNTK estimators of one layer of one network.

    ``flat_z(theta)`` is the layer's preactivations ``[N, u]`` flattened (row ``(a, i)``), with
    gradients ``g_{i; a}``. Returns ``(r, w)``:

    * ``r[a0, a1, a2, a3] = sum_{i != j} D^3 z_{i; a0}[g_{i; a1}, g_{j; a2}, g_{j; a3}]``, by
      three nested JVPs (every output at once), each unordered pair ``{a2, a3}`` once (the
      third derivative is symmetric);
    * ``w[b, j, a, i] = Hess(z_{i; a}) g_{j; b}``, a ``[N, u, N, u, P]`` array (a JVP of the
      Jacobian).
    """
    jac = jax.jacrev(flat_z)(theta)  # [(a, i), P]
    g = jac.reshape(n, u, -1)

    def d1(t, v1):
        return jax.jvp(flat_z, (t,), (v1,))[1]

    def d2(t, v1, v2):
        return jax.jvp(lambda s: d1(s, v1), (t,), (v2,))[1]

    def d3(v1, v2, v3):
        return jax.jvp(lambda s: d2(s, v1, v2), (theta,), (v3,))[1]

    combos = [
        (i, j, b, c)
        for i in range(u)
        for j in range(u)
        if i != j
        for b in range(n)
        for c in range(b, n)
    ]
    ii, jj, bb, cc = (np.array(col) for col in zip(*combos, strict=True))

    def along(i, j, b, c):  # [a1, a0]: D^3 z_{i; a0}[g_{i; a1}, g_{j; b}, g_{j; c}]
        v2, v3 = g[b, j], g[c, j]
        return jax.vmap(lambda v1: d3(v1, v2, v3).reshape(n, u)[:, i])(g[:, i])

    third = jax.vmap(along)(ii, jj, bb, cc)  # [K, a1, a0]
    place = np.zeros((len(combos), n, n))
    place[np.arange(len(combos)), bb, cc] = 1.0
    place[np.arange(len(combos)), cc, bb] = 1.0
    r = jnp.einsum("kxa,kbc->axbc", third, jnp.asarray(place, third.dtype))
    w = jax.vmap(lambda v: jax.jvp(jax.jacrev(flat_z), (theta,), (v,))[1])(jac)
    return r, w.reshape(n, u, n, u, -1)


@partial(jax.jit, static_argnames=("graphdef", "units", "chunk"))
def _ddntk_means(graphdef, state, x, widths, *, units, chunk):
    """Per network and layer, ``n_{l-1}`` times the unit-pair averages that estimate ``R``,
    ``S``, ``T`` and ``U``: four ``[M, L+1, N, N, N, N]`` (NaN for a layer with fewer than 2
    units)."""

    def one(s):
        flat, unravel = jax.flatten_util.ravel_pytree(s)
        n = x.shape[0]
        out = []
        for layer, u in enumerate(units):
            if u < 2:
                out.append((jnp.full((n,) * 4, jnp.nan, x.dtype),) * 4)
                continue
            if layer == 0:  # z^(1) is linear in its parameters: every ddNTK vanishes
                out.append((jnp.zeros((n,) * 4, x.dtype),) * 4)
                continue

            def flat_z(theta, layer=layer, u=u):
                net = nnx.merge(graphdef, unravel(theta))
                return net.preactivations(x)[layer][:, :u].reshape(-1)

            r, w = _ddntk_blocks(flat_z, flat, n, u)
            off = (1.0 - jnp.eye(u, dtype=x.dtype)) * (widths[layer] / (u * (u - 1)))
            # R_{a0 a1 a2 a3} <- ddI_{i i j j; a0 a1 a2 a3}
            r = r * (widths[layer] / (u * (u - 1)))
            # ddII_{i1 i2 i3 i4; a1 a2 a3 a4} = W[(i1,a1),(i3,a3)] . W[(i2,a2),(i4,a4)] with
            # W[(i,a),(j,b)] = Hess(z_{i;a}) g_{j;b} = w[b, j, a, i] = hv[i, j, a, b]: only the
            # dot products the three unit patterns need (not the whole Gram matrix)
            hv = jnp.transpose(w, (3, 1, 2, 0, 4))  # [i, j, a, b, P]
            hd = hv[jnp.arange(u), jnp.arange(u)]  # W[(i,a),(i,b)]: [i, a, b, P]
            # S_{a1a2a3a4} <- ddII_{i i j j}: W[(i,a1),(j,a3)] . W[(i,a2),(j,a4)]
            s_ = jnp.einsum("ijacp,ijbdp,ij->abcd", hv, hv, off)
            # T_{a1a3a4a2} <- ddII_{i j i j}: W[(i,a1),(i,a3)] . W[(j,a2),(j,a4)]
            t_ = jnp.einsum("iabp,jdcp,ij->abcd", hd, hd, off)
            # U_{a1a4a2a3} <- ddII_{i j j i}: W[(i,a1),(j,a3)] . W[(j,a2),(i,a4)]
            u_ = jnp.einsum("ijadp,jicbp,ij->abcd", hv, hv, off)
            out.append((r, s_, t_, u_))
        return tuple(jnp.stack(f) for f in zip(*out, strict=True))

    # ``chunk`` networks at a time: per network and layer the Hessian-vector products hold
    # (N * units)^2 parameter-sized vectors
    return jax.lax.map(one, state, batch_size=chunk)


@partial(jax.jit, static_argnames=("graphdef",))
def _residual_parts(graphdef, state, x):
    """Per network and residual layer ``l + 1`` (``l = 1..L-1``): the preactivations of the
    layer below, ``z^{(l)}`` ``[M, N, n]``, and the diagonal of the plain metric of the branch,
    ``C_b + (C_W / n) sum_j sigma(z_ja)^2`` ``[M, N]``."""

    def one(s):
        net = nnx.merge(graphdef, s)
        zs = net.preactivations(x)
        out = []
        for k in range(1, len(zs) - 1):
            z = zs[k - 1]
            h = net.activation(z)
            out.append((z, net.c_b + net.c_w * jnp.mean(h * h, axis=1)))
        return out

    return jax.vmap(one)(state)


def _residual_samples(parts, gamma, xi, idx):
    """Per network, for each residual layer: the unit (population) covariance
    ``gamma^4 Cov_i(z_{ia1} z_{ia2}, z_{ia3} z_{ia4})`` on the tuples ``idx`` (``[M, R, ...]``)
    and the unit average of the conditional fourth moment ``E[z'^4_{ia} | below] = gamma^4 z^4
    + 6 gamma^2 xi^2 z^2 G + 3 xi^4 G^2`` (``[M, R, N]``)."""
    a1, a2, a3, a4 = idx
    within, fourth = [], []
    for k, (z, gh) in enumerate(parts, start=1):
        z, gh = np.asarray(z), np.asarray(gh)
        g2, x2 = gamma[k] ** 2, xi[k] ** 2
        p2 = np.einsum("mai,mbi->mab", z, z) / z.shape[2]
        p4 = np.concatenate(
            [
                np.mean(z[sl, a1] * z[sl, a2] * z[sl, a3] * z[sl, a4], axis=-1)
                for sl in _chunks(z.shape[0], a1.size * z.shape[2])
            ]
        )
        within.append(g2 * g2 * (p4 - p2[:, a1, a2] * p2[:, a3, a4]))
        zsq = z * z
        q = (
            g2 * g2 * zsq * zsq
            + 6 * g2 * x2 * zsq * gh[:, :, None]
            + 3 * x2 * x2 * gh[:, :, None] ** 2
        )
        fourth.append(q.mean(-1))
    return np.stack(within, axis=1), np.stack(fourth, axis=1)


def _divisor_chunk(size: int, cap: int) -> int:
    """A ``lax.map`` batch size at most ``cap`` that divides ``size`` when one of at least
    ``cap / 2`` does (no remainder batch, so one compiled body), else ``cap``."""
    cap = int(max(1, min(size, cap)))
    for c in range(cap, max(1, cap // 2) - 1, -1):
        if size % c == 0:
            return c
    return cap


# index tuples (a1, a2, a3, a4) of the pair layouts, as slots of the pair (a, b): 0 is a, 1 is b
_PAIR = ((0, 0), (0, 1), (1, 1))  # the pair components (aa, ab, bb)
_VERTEX_SLOTS = np.array([[p + q for q in _PAIR] for p in _PAIR])  # [3, 3, 4]
_B_SLOTS = np.array([[0, 0, 1, 1], [0, 1, 1, 0]])  # (B_aabb, B_abba): [2, 4]
_DNTK_SLOTS = np.array(list(np.ndindex(2, 2, 2, 2))).reshape(2, 2, 2, 2, 4)


def _tuples(n: int, slots) -> tuple[np.ndarray, ...]:
    """The input-index tuples ``(a1, a2, a3, a4)`` a layout holds, as four integer arrays of the
    layout's shape: every tuple (``slots=None``, ``[N, N, N, N]``), or on every pair ``(a, b)``
    the tuples of ``slots`` (``[..., 4]`` of slot numbers, 0 for ``a`` and 1 for ``b``):
    ``[N, N, ...]``."""
    if slots is None:
        return tuple(np.indices((n,) * 4))
    pad = (1,) * (slots.ndim - 1)
    a = np.arange(n).reshape((n, 1) + pad)
    b = np.arange(n).reshape((1, n) + pad)
    return tuple(np.where(slots[..., k] == 0, a, b) for k in range(4))


def _select(full, idx):
    """``[m, L+1, N, N, N, N]`` per-network four-index samples -> their entries on the tuples
    ``idx`` (``None``: all of them, the array itself)."""
    if idx is None:
        return full
    return full[:, :, idx[0], idx[1], idx[2], idx[3]]


class _Running:
    """Mean and standard error over networks of samples that arrive in chunks (the pairwise
    update of Chan, Golub and LeVeque: the same numbers as one pass over all of them, up to
    rounding, in the memory of one chunk)."""

    def __init__(self):
        self.count, self.mean, self.m2 = 0, None, None

    def add(self, samples):
        m = samples.shape[0]
        mean = samples.mean(0)
        m2 = ((samples - mean) ** 2).sum(0)
        if self.count == 0:
            self.count, self.mean, self.m2 = m, mean, m2
            return
        total = self.count + m
        delta = mean - self.mean
        self.mean = self.mean + delta * (m / total)
        self.m2 = self.m2 + m2 + delta**2 * (self.count * m / total)
        self.count = total

    def result(self):
        """``(mean, standard error of the mean)``."""
        return self.mean, np.sqrt(self.m2 / (self.count - 1) / self.count)


def _chunks(total: int, per_item: int) -> list[slice]:
    """Slices of ``range(total)`` holding at most about :data:`_CHUNK_ELEMENTS` elements of
    ``per_item`` each."""
    step = max(1, _CHUNK_ELEMENTS // max(1, per_item))
    return [slice(i, min(i + step, total)) for i in range(0, total, step)]


def _products(x, y, idx, scale):
    """Per network, ``scale * x[a1, a2] * y[a3, a4]`` on the tuples ``idx``: ``x, y``
    ``[m, L+1, N, N]``, ``scale`` ``[L+1]`` -> ``[m, L+1, ...]``."""
    a1, a2, a3, a4 = idx
    s = scale.reshape((1, -1) + (1,) * a1.ndim)
    return s * x[:, :, a1, a2] * y[:, :, a3, a4]


def _unit_pair_samples(parts, idx, scale, kind):
    """Per network, the unit-pair averages of the four-index NTK fields on the tuples ``idx``
    (``[m, L+1, ...]``; NaN on a layer with fewer than 2 units), ``scale`` ``[L+1]``:

    * ``"A"``: ``parts[l]`` the centered diagonal NTKs ``c_i = H_ii - mean`` ``[m, u, N, N]``;
      ``sum_{i != j} c_i[a1, a2] c_j[a3, a4] / (u (u - 1))``, as
      ``(sum_i c_i)(sum_j c_j) - sum_i c_i c_i``;
    * ``"B"``: ``parts[l]`` the unit blocks ``H_ij`` ``[m, u, u, N, N]``;
      ``sum_{i != j} H_ij[a1, a3] H_ij[a2, a4] / (u (u - 1))``.
    """
    a1, a2, a3, a4 = idx
    out = []
    for layer, h in enumerate(parts):
        u = h.shape[1]
        if u < 2:
            out.append(np.full((h.shape[0],) + a1.shape, np.nan, h.dtype))
            continue
        if kind == "A":
            tot = h.sum(1)
            same = (h[:, :, a1, a2] * h[:, :, a3, a4]).sum(1)
            val = tot[:, a1, a2] * tot[:, a3, a4] - same
        else:
            ii, jj = np.nonzero(1 - np.eye(u, dtype=int))
            off = h[:, ii, jj]  # [m, u (u - 1), N, N]
            val = (off[:, :, a1, a3] * off[:, :, a2, a4]).sum(1)
        out.append(val * (scale[layer] / (u * (u - 1))))
    return np.stack(out, axis=1)


def _mean_var_se(samples):
    """Mean, its standard error, unbiased variance and the variance's standard error
    (``sqrt((mu4 - var^2 (M - 3) / (M - 1)) / M)``), along axis 0."""
    m = samples.shape[0]
    mean = samples.mean(0)
    c = samples - mean
    var = (c**2).sum(0) / (m - 1)
    mu4 = (c**4).mean(0)
    var_se = np.sqrt(np.maximum(mu4 - var**2 * (m - 3) / (m - 1), 0.0) / m)
    return mean, np.sqrt(var / m), var, var_se


def measure(
    arch,
    x,
    *,
    n_networks: int,
    key: jax.Array,
    batch_size: int = 512,
    ntk: bool = True,
    dntk: bool = False,
    ddntk: bool = False,
    vertex: bool = False,
    full: bool = False,
) -> Measurement:
    """Monte Carlo estimates of the fields of :func:`rgnn.perturbative` from finite networks.

    ``n_networks`` networks of ``arch`` are drawn in equal batches of at most ``batch_size``
    (each batch one vmapped, jitted computation of one shape: the last batch is padded with up
    to ``n_batches - 1`` networks that are drawn and discarded, so nothing compiles twice;
    network ``j`` is drawn from ``jax.random.split(jax.random.fold_in(key, 0), total)[j]``,
    ``total`` the padded count: with JAX's default keys the same network whatever the batch
    size), and the per-layer stochastic metric, empirical NTK and preactivation moments are
    reduced to means, variances and kurtoses with standard errors.
    The dtype follows ``x``. ``ntk=False`` skips the NTK (its fields are then NaN, and the
    four-index NTK fields ``None``).

    ``vertex=True`` also estimates the four-index fields ``vertex``, ``ntk_vertex``,
    ``mixed_vertex`` and ``ntk_b`` (PDLT's ``V, A, D, B``; :class:`Measurement`): covariances
    of the stochastic metric and of the NTKs of the first :data:`NTK_UNITS` units of each layer
    over networks, and products of the NTK between different units. Their NTK side costs about
    :data:`NTK_UNITS` times the NTK of one unit (one backward pass per unit), and the per-unit
    diagonal NTKs of every network are kept for the covariances (``NTK_UNITS`` times the memory
    of the one-unit NTK).

    ``dntk=True`` also estimates the dNTK correlators ``P`` and ``Q``: per network and layer,
    the NTK of the first :data:`DNTK_UNITS` units (from the layer structure, as
    :func:`empirical_ntk`) differentiated along the gradient of every ``z_{i;a0}`` (``N *
    DNTK_UNITS`` Jacobian-vector products); the cost grows like the parameter count times
    ``(N * DNTK_UNITS)^2`` per layer, so keep ``N`` small. ``ddntk=True`` also estimates the
    ddNTK means ``R, S, T, U`` (:class:`Measurement`): per network and layer,
    ``D^3 z[g_{i;a1}, g_{j;a2}, g_{j;a3}]`` by three nested JVPs (``R``) and the
    Hessian-vector products ``Hess(z_{i;a}) g_{j;b}`` by a JVP of the Jacobian (forward over
    reverse), whose dot products give ``S, T, U``; the cost grows like the parameter count
    times ``(N * DNTK_UNITS)^2 N`` per layer, and the first call compiles for tens of seconds
    (batches of one size share one compilation). Layer 1 is not differentiated: ``z^{(1)}`` is
    linear in its parameters, so its dNTK and ddNTKs are exactly zero.

    A residual MLP (:mod:`rgnn.architecture`): on its residual layers ``2..L`` the unit is not a
    zero-mean Gaussian of covariance ``G`` given the layer below, so ``kurtosis`` uses the unit
    average of the conditional fourth moment ``gamma^4 z^4 + 6 gamma^2 xi^2 z^2 G_h
    + 3 xi^4 G_h^2`` (``G_h`` the branch's plain metric), and ``vertex`` (``n Cov`` of two
    *different* units' conditional second moments, the connected four-point function) and
    ``nngp_variance`` (``vertex / n``) subtract from the metric's covariance its same-unit
    part, estimated per network from the unit spread of ``gamma^2 z_a z_b``:
    ``V = n Cov(G, G) - n/(n-1) E[gamma^4 Cov_units(z_a z_b, z_c z_d)]``. The NTK fields
    keep their estimators, which measure the definitions of :class:`rgnn.Perturbative` on a
    residual layer too: ``ntk_vertex`` is ``n Cov(H_ii, H_jj)`` and ``ntk_b`` ``n E[H_ij H_ij]``
    for different units ``i != j``; ``mixed_vertex`` is ``n Cov(G, H_ii)`` (``G`` the metric
    above), which is ``n Cov(z_ka z_kb, H_ii;cd)``, ``k != i``, up to ``O(1/n)`` (the unit
    ``i`` itself in ``G``: ``Cov(E[z_i z_i | below], H_ii)`` is ``O(1/n)``; a weighted fit
    across widths absorbs it); the dNTK and ddNTK fields keep theirs (automatic
    differentiation of the residual network).

    ``full=True`` (implies ``vertex=True``) returns every four-index field -- ``vertex``,
    ``ntk_vertex``, ``mixed_vertex``, ``ntk_b`` and, when asked for, the dNTK and ddNTK fields --
    on all index tuples of the inputs, ``[L+1, N, N, N, N]`` each with its ``<field>_se``,
    instead of the pair layout; the estimators are the same, evaluated on every tuple (the pair
    layout is their restriction to tuples of two inputs). Their reduction costs
    ``O(M (L+1) N^4 NTK_UNITS^2)`` operations and ``O((L+1) N^4)`` memory per field (the
    per-network samples are reduced in chunks), so this is for a few inputs: a request whose
    fields would exceed 8 GiB is refused with a ``ValueError``. The dNTK and ddNTK
    computations are the same as in the pair layout (they produce every tuple anyway).
    """
    from rgnn.fixed_point import fixed_point
    from rgnn.models import require_mlp
    from rgnn.networks import _ensemble_of_keys

    require_mlp(arch, "rgnn.measure")
    if isinstance(n_networks, bool) or not isinstance(n_networks, int) or n_networks < 4:
        raise ValueError(f"n_networks: expected an integer >= 4, got {n_networks!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
    flags = dict(ntk=ntk, dntk=dntk, ddntk=ddntk, vertex=vertex, full=full)
    for name, flag in flags.items():
        if not isinstance(flag, bool | np.bool_):
            raise ValueError(f"{name}: expected True or False, got {flag!r}")
    ntk, dntk, ddntk, full = bool(ntk), bool(dntk), bool(ddntk), bool(full)
    four = bool(vertex) or full
    x, _ = check_pair(x, None, ("x", "x2"))
    n = x.shape[0]
    dims = arch.layer_dims(x.shape[1])
    n_layers = len(dims) - 1
    if full:
        n_fields = (1 + 3 * ntk) + 2 * dntk + 4 * ddntk
        # mean and standard error of every field, and the running mean and sum of squares
        need = x.dtype.itemsize * n_layers * n**4 * n_fields * 4
        if need > _MEMORY_LIMIT_BYTES:
            raise ValueError(
                f"x: {n} inputs need about {need / 2**30:.3g} GiB for the full four-index "
                f"fields (they grow like N^4; limit {_MEMORY_LIMIT_BYTES / 2**30:.3g} GiB); pass "
                "fewer inputs, or full=False for the pair layout"
            )
    gs, ts, hds = [], [], []
    res_w, res_q = [], []  # residual layers: within-network unit covariances, fourth moments
    acc = {}

    def add(name, samples):
        acc.setdefault(name, _Running()).add(samples)

    units = tuple(min(DNTK_UNITS, d) for d in dims[1:])
    ntk_units = tuple(tuple(range(min(NTK_UNITS, d))) for d in dims[1:])
    widths = tuple(float(d) for d in dims[:-1])
    scale = np.asarray(widths, x.dtype)
    v_idx = _tuples(n, None if full else _VERTEX_SLOTS)
    b_idx = _tuples(n, None if full else _B_SLOTS)
    d_idx = None if full else _tuples(n, _DNTK_SLOTS)
    n_v, n_b = v_idx[0].size, b_idx[0].size
    ab_idx = _tuples(n, np.array([[0, 1, 0, 1]]))  # the (ab)(ab) tuple of every pair
    n_d = n**4 if full else d_idx[0].size
    # equal batches, the last one padded with networks that are drawn and discarded, so every
    # batch has one shape and shares one compilation (a smaller last batch compiled everything
    # again: most of a Monte Carlo run's time at small widths). Member j is drawn from
    # split(fold_in(key, 0), total)[j] whatever the batch size (split's keys are prefixes of
    # one another), and a single batch is exactly ensemble(..., key=fold_in(key, 0)).
    n_batches = -(-n_networks // batch_size)
    per = -(-n_networks // n_batches)
    keys = jax.random.split(jax.random.fold_in(key, 0), per * n_batches)
    done = 0
    while done < n_networks:
        size = min(per, n_networks - done)
        ens = _ensemble_of_keys(arch, x.shape[1], keys[done : done + per], dtype=x.dtype)
        gs.append(np.asarray(empirical_nngp(ens, x))[:size])
        if arch.is_residual:
            parts = _residual_parts(ens.graphdef, ens.state, x)
            w, q = _residual_samples(parts, *arch.residual(), v_idx if four else ab_idx)
            res_w.append(np.asarray(w)[:size])
            res_q.append(np.asarray(q)[:size])
        if ntk and four:
            blocks = _apply(
                ens.graphdef, ens.state, x, None, kind="ntk_block", option=ntk_units, batched=True
            )
            blocks = [np.asarray(b)[:size] for b in blocks]  # per layer [m, u, u, N, N]
            ts.append(np.stack([b[:, 0, 0] for b in blocks], axis=1))
            hds.append([np.moveaxis(np.diagonal(b, axis1=1, axis2=2), -1, 1) for b in blocks])
            for sl in _chunks(size, n_layers * n_b * NTK_UNITS**2):
                add("ntk_b", _unit_pair_samples([b[sl] for b in blocks], b_idx, scale, "B"))
        elif ntk:
            ts.append(np.asarray(empirical_ntk(ens, x))[:size])
        if dntk:
            n_params = sum(int(np.prod(a.shape[1:])) for a in jax.tree_util.tree_leaves(ens.state))
            rows = n * max(units)
            chunk = int(max(1, min(per, 2**26 // (rows * rows * n_params))))
            parts = _dntk_correlators(ens.graphdef, ens.state, x, widths, units=units, chunk=chunk)
            for name, part in zip(("dntk_p", "dntk_q"), parts, strict=True):
                part = np.asarray(part)[:size]
                for sl in _chunks(size, n_layers * n_d):
                    add(name, _select(part[sl], d_idx))
        if ddntk:
            n_params = sum(int(np.prod(a.shape[1:])) for a in jax.tree_util.tree_leaves(ens.state))
            rows = n * max(units)
            per_net = max(rows * rows * n_params, rows * rows * n**2 * sum(dims[1:]))
            chunk = _divisor_chunk(per, 2**26 // per_net)
            parts = _ddntk_means(ens.graphdef, ens.state, x, widths, units=units, chunk=chunk)
            names = ("ddntk_r", "ddntk_s", "ddntk_t", "ddntk_u")
            for name, part in zip(names, parts, strict=True):
                part = np.asarray(part)[:size]
                for sl in _chunks(size, n_layers * n_d):
                    add(name, _select(part[sl], d_idx))
        done += size
    g = np.concatenate(gs)
    t = np.concatenate(ts) if ntk else np.full_like(g, np.nan)
    m2 = np.diagonal(g, axis1=2, axis2=3)  # G_aa per network [M, L+1, N]
    m4 = m2**2
    fp = fixed_point(arch, x)
    k = np.asarray(fp.nngp)
    g_mean, g_se, g_var, g_var_se = _mean_var_se(g)
    t_mean, t_se, t_var, t_var_se = _mean_var_se(t)
    a, b = m4.mean(0), m2.mean(0)
    kurt = 3 * a / b**2 - 3
    infl = 3 * (m4 / b**2 - 2 * a * m2 / b**3)  # influence of one network on 3 a / b^2
    kurt_se = infl.std(0, ddof=1) / np.sqrt(m2.shape[0])
    if arch.is_residual:
        # residual layers 2..L: z is not zero-mean given the layer below; E z^4 is the unit
        # average of its conditional fourth moment, and the metric's covariance holds, besides
        # the vertex, the same-unit covariance (1/n) Cov_i, removed below (module docstring)
        rs = slice(1, n_layers - 1)
        w_res, q = np.concatenate(res_w), np.concatenate(res_q)
        qa = q.mean(0)
        kurt[rs] = qa / b[rs] ** 2 - 3
        infl = q / b[rs] ** 2 - 2 * qa * m2[:, rs] / b[rs] ** 3
        kurt_se[rs] = infl.std(0, ddof=1) / np.sqrt(q.shape[0])
        width = np.asarray(widths[1:-1], x.dtype)  # n_l of the layer below
        if not four:
            w_abab = w_res[..., 0]
        elif not full:  # the (ab)(ab) tuple of each pair: component (1, 1) of the pair layout
            w_abab = w_res[..., 1, 1]
        else:
            w_abab = np.einsum("mlabab->mlab", w_res)
        g_var[rs] = g_var[rs] - w_abab.mean(0) / (width[:, None, None] - 1)
    if four:
        # covariances over networks: centered samples, times M / (M - 1) (unbiased)
        n_net = g.shape[0]
        cov_scale = scale * (n_net / (n_net - 1))
        cg = g - g_mean
        if ntk:
            hd = [np.concatenate(per_layer) for per_layer in zip(*hds, strict=True)]
            hbar = np.stack([h.mean(1) for h in hd], axis=1)  # unit-averaged H_ii [M, L+1, N, N]
            ch = hbar - hbar.mean(0)
            hd = [h - h.mean(0) for h in hd]  # each unit centered on its own mean
        if arch.is_residual:  # per network, n/(n-1) times the same-unit covariance
            pad = [(0, 0), (1, 1)] + [(0, 0)] * (w_res.ndim - 2)
            corr = np.pad(
                w_res * (width / (width - 1)).reshape((1, -1) + (1,) * (w_res.ndim - 2)), pad
            )
        for sl in _chunks(n_net, n_layers * n_v * (2 + NTK_UNITS)):
            vs = _products(cg[sl], cg[sl], v_idx, cov_scale)
            add("vertex", vs - corr[sl] if arch.is_residual else vs)
            if ntk:
                add("mixed_vertex", _products(cg[sl], ch[sl], v_idx, cov_scale))
                parts = [h[sl] for h in hd]
                add("ntk_vertex", _unit_pair_samples(parts, v_idx, cov_scale, "A"))
    fields = {}
    for name, running in acc.items():
        fields[name], fields[name + "_se"] = running.result()
    return Measurement(
        nngp=g_mean,
        nngp_se=g_se,
        nngp_correction=g_mean - k,
        nngp_correction_se=g_se,
        nngp_variance=g_var,
        nngp_variance_se=g_var_se,
        kurtosis=kurt,
        kurtosis_se=kurt_se,
        ntk=t_mean,
        ntk_se=t_se,
        ntk_correction=t_mean - np.asarray(fp.ntk),
        ntk_correction_se=t_se,
        ntk_variance=t_var,
        ntk_variance_se=t_var_se,
        **fields,
        n_networks=int(g.shape[0]),
        full=full,
    )
