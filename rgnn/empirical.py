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

__all__ = ["empirical_nngp", "empirical_ntk", "measure", "Measurement", "ESTIMATORS", "DNTK_UNITS"]

ESTIMATORS = ("metric", "sample")

DNTK_UNITS = 3
"""Units per layer whose dNTK :func:`measure` estimates (every ordered pair of them is used)."""


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
      dntk_p, dntk_q: ``[L+1, N, N, 2, 2, 2, 2]`` (``measure(..., dntk=True)``, else ``None``)
        PDLT's dNTK-preactivation correlators ``P`` and ``Q`` in the pair layout of
        :class:`~rgnn.Perturbative`: ``n_{l-1}`` times the mean of
        ``dH_{i j j; a0 a1 a2} z_{i; a3}`` (``P``) and ``dH_{i i j; a0 a1 a2} z_{j; a3}``
        (``Q``) over the ordered pairs ``i != j`` of the first :data:`DNTK_UNITS` units of each
        layer and over networks, the dNTK taken by automatic differentiation (a
        Jacobian-vector product of the empirical NTK along the gradient of ``z_{i; a0}``).
        NaN on a layer narrower than 2 units.
      ddntk_r, ddntk_s, ddntk_t, ddntk_u: ``[L+1, N, N, 2, 2, 2, 2]`` (``measure(...,
        ddntk=True)``, else ``None``) PDLT's ddNTK means (ch. infinity) in the same pair layout,
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

            def flat_z(theta, layer=layer):
                return layer_z(theta, layer).reshape(-1)

            def ntk(theta, flat_z=flat_z):
                jac = jax.jacrev(flat_z)(theta)
                return jac @ jac.T

            jac = jax.jacrev(flat_z)(flat)
            dh = jax.vmap(lambda v, ntk=ntk: jax.jvp(ntk, (flat,), (v,))[1])(jac)
            dh = dh.reshape(n, u, n, u, n, u)  # [a0, i0, a1, i1, a2, i2]
            z = layer_z(flat, layer)  # [a3, i3]
            off = 1.0 - jnp.eye(u, dtype=x.dtype)
            pairs = u * (u - 1)
            # P: i0 = i3 = i, i1 = i2 = j; Q: i0 = i1 = i, i2 = i3 = j (i != j)
            p = jnp.einsum("aibjcj,di,ij->abcd", dh, z, off) / pairs
            q = jnp.einsum("aibicj,dj,ij->abcd", dh, z, off) / pairs
            ps.append(widths[layer] * p)
            qs.append(widths[layer] * q)
        return jnp.stack(ps), jnp.stack(qs)

    # vmapped ``chunk`` networks at a time: the Jacobian-vector products of the Jacobian hold
    # (N * units)^2 parameter-sized vectors per network
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

            def flat_z(theta, layer=layer, u=u):
                net = nnx.merge(graphdef, unravel(theta))
                return net.preactivations(x)[layer][:, :u].reshape(-1)

            r, w = _ddntk_blocks(flat_z, flat, n, u)
            off = (1.0 - jnp.eye(u, dtype=x.dtype)) * (widths[layer] / (u * (u - 1)))
            # R_{a0 a1 a2 a3} <- ddI_{i i j j; a0 a1 a2 a3}
            r = r * (widths[layer] / (u * (u - 1)))
            # ddII_{i1 i2 i3 i4; a1 a2 a3 a4} = W[(i1,a1),(i3,a3)] . W[(i2,a2),(i4,a4)] with
            # W[(i,a),(j,b)] = Hess(z_{i;a}) g_{j;b} = w[b, j, a, i]: one Gram matrix of the
            # (N u)^2 Hessian-vector products, then the unit patterns
            flat_w = w.reshape((n * u) ** 2, -1)
            gram = (flat_w @ flat_w.T).reshape((n, u) * 4)
            s_ = jnp.einsum("cjaidjbi,ij->abcd", gram, off)  # S_{a1a2a3a4}: i i j j
            t_ = jnp.einsum("biaicjdj,ij->abcd", gram, off)  # T_{a1a3a4a2}: i j i j
            u_ = jnp.einsum("djaibicj,ij->abcd", gram, off)  # U_{a1a4a2a3}: i j j i
            out.append((r, s_, t_, u_))
        return tuple(jnp.stack(f) for f in zip(*out, strict=True))

    # ``chunk`` networks at a time: per network and layer the Hessian-vector products hold
    # (N * units)^2 parameter-sized vectors
    return jax.lax.map(one, state, batch_size=chunk)


def _divisor_chunk(size: int, cap: int) -> int:
    """A ``lax.map`` batch size at most ``cap`` that divides ``size`` when one of at least
    ``cap / 2`` does (no remainder batch, so one compiled body), else ``cap``."""
    cap = int(max(1, min(size, cap)))
    for c in range(cap, max(1, cap // 2) - 1, -1):
        if size % c == 0:
            return c
    return cap


def _pair_layout(full):
    """``[..., N, N, N, N]`` (four input indices) -> ``[..., N, N, 2, 2, 2, 2]``: slot 0 is
    input ``a``, slot 1 input ``b`` of the pair ``(a, b)``."""
    n = full.shape[-1]
    sel = (np.arange(n)[:, None], np.arange(n)[None, :])
    out = np.empty(full.shape[:-4] + (n, n, 2, 2, 2, 2), full.dtype)
    for i, j, k, m in np.ndindex(2, 2, 2, 2):
        out[..., i, j, k, m] = full[..., sel[i], sel[j], sel[k], sel[m]]
    return out


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
) -> Measurement:
    """Monte Carlo estimates of the fields of :func:`rgnn.perturbative` from finite networks.

    ``n_networks`` networks of ``arch`` are drawn (``batch_size`` at a time, each batch one
    vmapped, jitted computation) and the per-layer stochastic metric, empirical NTK and
    preactivation moments are reduced to means, variances and kurtoses with standard errors.
    The dtype follows ``x``. ``ntk=False`` skips the NTK (its fields are then NaN);
    ``dntk=True`` also estimates the dNTK correlators ``P`` and ``Q`` (a Jacobian-vector product
    of the empirical NTK per network; the cost grows like the parameter count times
    ``(N * DNTK_UNITS)^2`` per layer, so keep ``N`` small). ``ddntk=True`` also estimates the
    ddNTK means ``R, S, T, U`` (:class:`Measurement`): per network and layer,
    ``D^3 z[g_{i;a1}, g_{j;a2}, g_{j;a3}]`` by three nested JVPs (``R``) and the
    Hessian-vector products ``Hess(z_{i;a}) g_{j;b}`` by a JVP of the Jacobian (forward over
    reverse), whose Gram matrix gives ``S, T, U``; the cost grows like the parameter count
    times ``(N * DNTK_UNITS)^2 N`` per layer, and the first call compiles for tens of seconds
    (batches of one size share one compilation).
    """
    from rgnn.architecture import MLP
    from rgnn.fixed_point import fixed_point
    from rgnn.networks import ensemble

    if not isinstance(arch, MLP):
        raise ValueError(f"arch: expected an rgnn.MLP, got {type(arch).__name__}")
    if isinstance(n_networks, bool) or not isinstance(n_networks, int) or n_networks < 4:
        raise ValueError(f"n_networks: expected an integer >= 4, got {n_networks!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
    x, _ = check_pair(x, None, ("x", "x2"))
    gs, ts, dps, dqs = [], [], [], []
    dds = ([], [], [], [])
    dims = arch.layer_dims(x.shape[1])
    units = tuple(min(DNTK_UNITS, d) for d in dims[1:])
    widths = tuple(float(d) for d in dims[:-1])
    done = 0
    while done < n_networks:
        size = min(batch_size, n_networks - done)
        ens = ensemble(
            arch, x.shape[1], n_networks=size, key=jax.random.fold_in(key, done), dtype=x.dtype
        )
        gs.append(np.asarray(empirical_nngp(ens, x)))
        if ntk:
            ts.append(np.asarray(empirical_ntk(ens, x)))
        if dntk:
            n_params = sum(int(np.prod(a.shape[1:])) for a in jax.tree_util.tree_leaves(ens.state))
            rows = x.shape[0] * max(units)
            chunk = int(max(1, min(size, 2**26 // (rows * rows * n_params))))
            p_s, q_s = _dntk_correlators(
                ens.graphdef, ens.state, x, widths, units=units, chunk=chunk
            )
            dps.append(np.asarray(p_s))
            dqs.append(np.asarray(q_s))
        if ddntk:
            n_params = sum(int(np.prod(a.shape[1:])) for a in jax.tree_util.tree_leaves(ens.state))
            rows = x.shape[0] * max(units)
            per_net = max(rows * rows * n_params, rows * rows * x.shape[0] ** 2 * sum(dims[1:]))
            chunk = _divisor_chunk(size, 2**26 // per_net)
            parts = _ddntk_means(ens.graphdef, ens.state, x, widths, units=units, chunk=chunk)
            for acc, part in zip(dds, parts, strict=True):
                acc.append(np.asarray(part))
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
    dntk_fields = {}
    if dntk:
        for name, parts in (("dntk_p", dps), ("dntk_q", dqs)):
            samples = _pair_layout(np.concatenate(parts))
            dntk_fields[name] = samples.mean(0)
            dntk_fields[name + "_se"] = samples.std(0, ddof=1) / np.sqrt(samples.shape[0])
    if ddntk:
        for name, parts in zip(("ddntk_r", "ddntk_s", "ddntk_t", "ddntk_u"), dds, strict=True):
            samples = _pair_layout(np.concatenate(parts))
            dntk_fields[name] = samples.mean(0)
            dntk_fields[name + "_se"] = samples.std(0, ddof=1) / np.sqrt(samples.shape[0])
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
        **dntk_fields,
        n_networks=int(g.shape[0]),
    )
