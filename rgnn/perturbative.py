"""The perturbative flow: order-1/n statistics of the preactivations, layer by layer.

Derivation (PDLT ch. 4, in the language of the stochastic metric). Conditioned on layer
``l``, the preactivations of layer ``l+1`` are exactly Gaussian with covariance the stochastic
metric

.. math::

    G^{(l+1)}_{ab} = C_b + \\frac{C_W}{n_l} \\sum_{j=1}^{n_l} \\sigma(z^{(l)}_{ja})
        \\sigma(z^{(l)}_{jb}),

an average of ``n_l`` neurons that are independent given ``G^{(l)}``. Write
``phi_{ab}(G) = <sigma(z_a) sigma(z_b)>_G`` for the Gaussian expectation of one neuron. Two
sources make ``G^{(l+1)}`` fluctuate: the finite average over neurons (variance
``C_W^2 Cov4 / n_l``, with ``Cov4_{(ab)(cd)} = <s_a s_b s_c s_d> - <s_a s_b><s_c s_d>``), and the
fluctuation of ``G^{(l)}`` itself, propagated through ``phi``. To first order in 1/n (the delta
method), with ``V^{(l)} / n_{l-1} = Cov(G^{(l)}, G^{(l)})`` and
``Delta^{(l)} = E G^{(l)} - K^{(l)}``:

.. math::

    V^{(l+1)} &= C_W^2\\, \\mathrm{Cov4}_{K^{(l)}}
        + \\frac{n_l}{n_{l-1}}\\, J^{(l)} V^{(l)} J^{(l)\\top},
        \\qquad J^{(l)}_{(ab),(cd)} = C_W \\frac{\\partial \\phi_{ab}}{\\partial K_{cd}}
        \\Big|_{K^{(l)}},\\\\
    \\Delta^{(l+1)} &= J^{(l)} \\Delta^{(l)} + \\frac{1}{2 n_{l-1}}\\, H^{(l)} : V^{(l)},
        \\qquad H^{(l)}_{(ab),(cd),(ef)} = C_W \\frac{\\partial^2 \\phi_{ab}}
        {\\partial K_{cd}\\, \\partial K_{ef}},

with ``V^{(1)} = 0`` and ``Delta^{(1)} = 0`` (the first layer's metric is deterministic). The
derivatives are over the distinct entries ``K_cd`` (``c <= d``) of the symmetric kernel. By the
Gaussian identity ``d<f>/dK_cd = (1 / (1 + delta_cd)) <d_c d_d f>`` this is PDLT's recursion for
the four-point vertex (eq. 4.90, written with derivatives instead of inverse kernels; THEORY.md)
and for the subleading metric ``K^{{1}}`` (PDLT sec. 4.3, ``Delta = K^{{1}} / n``); for a single
input it reduces to ``V' = C_W^2 (<s^4> - <s^2>^2) + chi_par^2 (n_l / n_{l-1}) V`` (PDLT eq. 5.109).

Observables (THEORY.md):

* ``nngp_correction = Delta^{(l)}``: ``K + nngp_correction`` predicts ``E[z_a z_b]``;
* ``nngp_variance = V^{(l)}_{(ab)(ab)} / n_{l-1}``: the variance of one entry of ``G^{(l)}``;
* ``kurtosis = 3 V^{(l)}_{(aa)(aa)} / (n_{l-1} K_aa^2)``: the excess kurtosis of ``z^{(l)}_a``;
* ``coupling``: ``V_{(aa)(aa)} / (n_{l-1} K_aa^2)`` averaged over inputs, the dimensionless
  quartic coupling, which grows roughly like depth / width.

Components on pairs. Every quantity on two inputs ``(a, b)`` needs ``V`` only on the three
entries ``(aa), (ab), (bb)``, so all-pairs quantities cost ``O(N^2 L)``: each pair carries a 3x3
``V``, a 3-vector ``Delta`` and the 3x3 (x3) Jacobian (Hessian) of its kernel map, vmapped over
the ``N (N - 1) / 2`` pairs; single inputs carry 1x1 versions.

Gaussian expectations: the two-point map ``phi`` uses the activation's closed form when it has
one (its derivatives by automatic differentiation), else the 2-D quadrature of
:mod:`rgnn.gaussian`; the four-point moments ``<s_a^i s_b^j>`` (``i + j = 4``) use the same
quadrature, except for the scale-invariant activations (relu, leaky relu, linear), whose moments
are integrated exactly in polar coordinates (the radial integral in closed form, the angular one
by Gauss-Legendre on the arcs between the kinks). On many pairs (``N (N - 1) / 2 >= 4096``) a
layer whose inputs all have one norm ``q`` (normalized inputs) takes every pair statistic of a
quadrature activation -- the fixed point's maps included -- from a table in the correlation
``rho = K_ab / q`` (``1025`` direct quadratures, degree-5 local interpolation, its error
measured at every midpoint and on the pairs whose norms deviate most, then multiplied by the
number of layers and folded into ``quadrature_error``; :mod:`rgnn._pair_table`); inputs of
different norms use the direct pair quadrature.

NTK side: :mod:`rgnn._ntk_flow` (mean shift, variance, PDLT's ``A, B, D, F``). dNTK side
(``perturbative(..., dntk=True)``): :mod:`rgnn.flow.rules` (PDLT's ``P, Q`` on pairs).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from rgnn import _ntk_flow, _pair_table, gaussian
from rgnn._validate import check_inputs
from rgnn.activations import Activation
from rgnn.architecture import MLP
from rgnn.fixed_point import _fixed_point_tabulated, fixed_point
from rgnn.flow import engine as flow_engine
from rgnn.flow import moments as flow_moments
from rgnn.flow import rules as flow_rules

__all__ = ["FourPoint", "Perturbative", "perturbative", "vertex", "TRUST_DEPTH_OVER_WIDTH"]

TRUST_DEPTH_OVER_WIDTH = 0.25
"""Above this ``sum_l 1/n_l`` (depth / width for equal widths) the O(1/n) truncation is not
trusted and :func:`perturbative` warns. ``L / n`` is the expansion parameter (PDLT sec. 5.4):
the O(1/n^2) terms neglected here are smaller than the O(1/n) ones by a further factor of about
``L / n`` times an O(1) constant (for relu at criticality the constant is 5, the growth rate of
``V / K^2`` per layer), so at ``L / n = 0.25`` they may already shift predictions by tens of
percent."""

_MEMORY_LIMIT_BYTES = 8 * 2**30


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Perturbative:
    """The O(1/n) statistics of an MLP's preactivations at initialization, layer axis first.

    ``N`` inputs; layer ``l`` (1-based) at index ``l - 1``; ``n_{l-1}`` is the width feeding
    layer ``l``. Pair components are ordered ``(aa, ab, bb)``.

    Attributes:
      nngp: ``[L+1, N, N]`` the leading-order kernel ``K^{(l)}``.
      nngp_correction: ``[L+1, N, N]`` ``E[z_a z_b] - K``, the O(1/n) shift of the mean kernel
        (already divided by the width).
      nngp_variance: ``[L+1, N, N]`` the variance of ``G^{(l)}_{ab}`` over initializations,
        ``V_{(ab)(ab)} / n_{l-1}``.
      kurtosis: ``[L+1, N]`` the excess kurtosis of ``z^{(l)}_a``, ``3 V_{(aa)(aa)} / (n K_aa^2)``.
      vertex: ``[L+1, N, N, 3, 3]`` the four-point vertex ``V^{(l)}`` on the pair ``(a, b)``:
        ``vertex[l, a, b, P, Q] = V_{P Q}`` with ``P, Q`` in ``(aa, ab, bb)`` (not divided by
        the width). For ``a == b`` every component is ``V_{(aa)(aa)}``.
      coupling: ``[L+1]`` the dimensionless quartic coupling ``V_{(aa)(aa)} / (n K_aa^2)``
        averaged over inputs.
      widths: ``[L+1]`` ``n_{l-1}``, the width that normalizes each layer's vertex.
      ntk: ``[L+1, N, N]`` the leading-order NTK ``Theta^{(l)}`` (the fixed point's).
      ntk_correction: ``[L+1, N, N]`` ``E[H_{ii;ab}] - Theta``, the O(1/n) shift of the mean
        NTK of one unit (already divided by the width).
      ntk_variance: ``[L+1, N, N]`` the variance over initializations of one entry of the
        empirical NTK of one unit, ``(A_{(ab)(ab)} + B_{aabb} + B_{abba}) / n_{l-1}``.
      ntk_vertex: ``[L+1, N, N, 3, 3]`` PDLT's ``A`` on the pair ``(a, b)``: ``n_{l-1}`` times
        the covariance of the NTK metric ``H~`` (the neuron average in the NTK recursion) on
        the components ``(aa, ab, bb)``, laid out like ``vertex``.
      mixed_vertex: ``[L+1, N, N, 3, 3]`` PDLT's ``D``: ``mixed_vertex[l, a, b, P, Q]`` is
        ``n_{l-1} Cov(G_P, H~_Q)``, the NNGP-NTK cross covariance.
      ntk_b: ``[L+1, N, N, 2]`` PDLT's ``B`` on the pair: ``(B_aabb, B_abba)``, with
        ``E[H_{12;a_1 a_2} H_{12;a_3 a_4}] = B_{a_1 a_3 a_2 a_4} / n`` for two different units.
        (The NTK fields are ``None`` when ``perturbative(..., ntk=False)``. Derivation and
        recursions: :mod:`rgnn._ntk_flow`.)
      dntk_p, dntk_q: ``[L+1, N, N, 2, 2, 2, 2]`` PDLT's dNTK-preactivation correlators ``P``
        and ``Q`` on the pair ``(a, b)`` (``None`` unless ``perturbative(..., dntk=True)``):
        with slot 0 the input ``a`` and slot 1 the input ``b``,
        ``E[dH_{i0 i1 i2; s0 s1 s2} z_{i3; s3}] = (d_{i0 i3} d_{i1 i2} P_{s0 s1 s2 s3}
        + d_{i0 i1} d_{i2 i3} Q_{s0 s1 s2 s3} + d_{i0 i2} d_{i1 i3} Q_{s0 s2 s1 s3}) / n_{l-1}``
        (not divided by the width). For ``a == b`` every component is the single-input value.
        Derivation, recursions and the treatment of kinks: :mod:`rgnn.flow.rules`.
      ddntk_r, ddntk_s, ddntk_t, ddntk_u: ``[L+1, N, N, 2, 2, 2, 2]`` the means of PDLT's two
        ddNTKs (``None`` unless ``perturbative(..., ddntk=True)``), in the layout of
        ``dntk_p``: with ``ddI_{i0 i1 i2 i3} = D^3 z_{i0}[g_{i1}, g_{i2}, g_{i3}]`` and
        ``ddII_{i1 i2 i3 i4} = g_{i3}^T Hess(z_{i1}) Lambda Hess(z_{i2}) g_{i4}`` (``g`` the
        learning-rate-weighted gradients),
        ``E[ddI_{i0 i1 i2 i3; s0 s1 s2 s3}] = (d_{i0 i1} d_{i2 i3} R_{s0 s1 s2 s3}
        + d_{i0 i2} d_{i3 i1} R_{s0 s2 s3 s1} + d_{i0 i3} d_{i1 i2} R_{s0 s3 s1 s2}) / n_{l-1}``
        and ``E[ddII_{i1 i2 i3 i4; s1 s2 s3 s4}] = (d_{i1 i2} d_{i3 i4} S_{s1 s2 s3 s4}
        + d_{i1 i3} d_{i2 i4} T_{s1 s3 s4 s2} + d_{i1 i4} d_{i2 i3} U_{s1 s4 s2 s3}) / n_{l-1}``
        (PDLT ch. infinity; recursions in :mod:`rgnn.flow.rules`).
      quadrature_order: nodes per dimension used for quadrature (static).
      quadrature_error: estimated relative error of every field from quadrature,
        ``max |q(order) - q(2 order)| / max |q(2 order)|`` over the fields on up to four inputs
        (0 when everything is exact), plus, where correlation tables were used (one-norm
        layers, many pairs: :mod:`rgnn._pair_table`), ``L + 1`` times their largest measured
        relative error (in float32 that measurement is dominated by roundoff, about ``1e-6``).
    """

    nngp: jax.Array
    nngp_correction: jax.Array
    nngp_variance: jax.Array
    kurtosis: jax.Array
    vertex: jax.Array
    coupling: jax.Array
    widths: jax.Array
    ntk: jax.Array | None = None
    ntk_correction: jax.Array | None = None
    ntk_variance: jax.Array | None = None
    ntk_vertex: jax.Array | None = None
    mixed_vertex: jax.Array | None = None
    ntk_b: jax.Array | None = None
    dntk_p: jax.Array | None = None
    dntk_q: jax.Array | None = None
    ddntk_r: jax.Array | None = None
    ddntk_s: jax.Array | None = None
    ddntk_t: jax.Array | None = None
    ddntk_u: jax.Array | None = None
    quadrature_order: int = dataclasses.field(default=0, metadata=dict(static=True))
    quadrature_error: float = dataclasses.field(default=0.0, metadata=dict(static=True))


# ----------------------------------------------------------------------------- expectations
def _homogeneous_moment(slope: float, s1, c, s2, i: int, j: int, nodes: int = _ntk_flow.ARC_NODES):
    """``E[sigma(u)^i sigma(v)^j]`` for ``sigma(x) = x (x > 0), slope x (x < 0)`` and
    ``u = s1 xi_1``, ``v = c xi_1 + s2 xi_2``, exactly: with ``xi = r (cos t, sin t)`` the
    integrand is ``r^(i+j)`` times a piecewise-trigonometric function of ``t``; the radial
    integral is ``E|xi|^p`` over ``2 pi``; the angular one is split at the kinks
    ``cos t = 0`` and ``c cos t + s2 sin t = 0`` and integrated by Gauss-Legendre on each arc."""
    p = i + j
    radial = 2 ** (p / 2) * math.gamma(p / 2 + 1)  # int_0^inf r^(p+1) exp(-r^2/2) dr
    u, v, w = _ntk_flow._angular_grid(s1, c, s2, nodes)

    def sig(x):
        return jnp.where(x > 0, x, slope * x)

    return radial * jnp.sum(w * sig(u) ** i * sig(v) ** j)


def _pair_moments(act: Activation, kaa, kab, kbb, order: int):
    """``(m40, m31, m22, m13, m04, m20, m11, m02)``, ``m_ij = <sigma(z_a)^i sigma(z_b)^j>``."""
    s1, c, s2 = _ntk_flow._cholesky2((kaa, kab, kbb))
    powers = [(4, 0), (3, 1), (2, 2), (1, 3), (0, 4), (2, 0), (1, 1), (0, 2)]
    if act.scale_invariant:
        slope = 1.0 if act.negative_slope is None else act.negative_slope
        return tuple(_homogeneous_moment(slope, s1, c, s2, i, j) for i, j in powers)
    x, w = gaussian.hermite_rule(order, jnp.result_type(kaa))
    u = s1 * x[:, None]
    v = c * x[:, None] + s2 * x[None, :]
    su, sv = act.fn(u), act.fn(v)
    ww = w[:, None] * w[None, :]
    return tuple(jnp.sum(ww * su**i * sv**j) for i, j in powers)


def _phi_pair(act: Activation):
    """``k = (kaa, kab, kbb) -> (<s_a^2>, <s_a s_b>, <s_b^2>)`` from the activation's closed form,
    differentiated by autodiff (the diagonal of a scale-invariant activation is ``A_2 k``)."""

    def phi(k):
        kaa, kab, kbb = k[0], k[1], k[2]
        f = act.maps(kaa, kbb, kab)[0]
        gaa = act.maps(kaa, kaa, kaa)[0] if not act.scale_invariant else _a2(act) * kaa
        gbb = act.maps(kbb, kbb, kbb)[0] if not act.scale_invariant else _a2(act) * kbb
        return jnp.stack([gaa, f, gbb])

    return phi


def _a2(act: Activation) -> float:
    a = 1.0 if act.negative_slope is None else act.negative_slope
    return (1 + a * a) / 2


def _single_stats(act: Activation, order: int):
    """``k -> (g, g', g'', <s^4> - g^2)`` with ``g(k) = <sigma(z)^2>_k``."""
    if act.scale_invariant:
        a = 1.0 if act.negative_slope is None else act.negative_slope
        a2, a4 = (1 + a**2) / 2, (1 + a**4) / 2

        def stats(k):
            return a2 * k, a2 * jnp.ones_like(k), jnp.zeros_like(k), (3 * a4 - a2**2) * k * k

        return stats

    def g(k):
        if act.closed_form:
            return act.maps(k, k, k)[0]
        return gaussian.expect(lambda z: act.fn(z) ** 2, k, order=order)

    def stats(k):
        g1 = jax.grad(g)
        m4 = gaussian.expect(lambda z: act.fn(z) ** 4, k, order=order)
        gk = g(k)
        return gk, g1(k), jax.grad(g1)(k), m4 - gk * gk

    return stats


def _pair_stats_quadrature(act: Activation, k, order: int):
    """``(phi, J, H, moments)`` of one pair from one quadrature grid, for activations without a
    closed form. Derivatives of Gaussian expectations come from the Gaussian identities
    ``d<f>/dK_cd = (1 / (1 + delta_cd)) <d_c d_d f>`` (Price's theorem), so only the first four
    derivatives of sigma are evaluated on the nodes, and nothing is differentiated through the
    quadrature (whose Cholesky factor is singular for parallel inputs):

    * ``J[ab] = (<s2_a s_b> / 2, <s1_a s1_b>, <s_a s2_b> / 2)``, ``J[aa, aa] = <s1^2 + s s2>_a``
      (``sk`` the k-th derivative);
    * ``H[ab]`` holds ``<sk_a sj_b>`` (``k + j = 4``) with weights 1/4, 1/2, 1 for two, one, zero
      diagonal derivatives; ``H[aa, aa, aa] = <s s4 + 4 s1 s3 + 3 s2^2>_a / 2``.
    """
    kaa, kab, kbb = k[0], k[1], k[2]
    s1, c, s2 = _ntk_flow._cholesky2((kaa, kab, kbb))
    x, w = gaussian.hermite_rule(order, jnp.result_type(kaa))
    ds = _ntk_flow._derivatives(act.fn, 4)
    u = s1 * x  # [Q]
    v = c * x[:, None] + s2 * x[None, :]  # [Q, Q]
    ub = jnp.sqrt(kbb) * x  # the marginal of z_b, for its own diagonal
    uu = jnp.stack([d(u) for d in ds])  # [5, Q]
    vv = jnp.stack([d(v) for d in ds])  # [5, Q, Q]
    bb = jnp.stack([d(ub) for d in ds])  # [5, Q]
    vbar = jnp.einsum("kxy,y->kx", vv, w)  # [5, Q]
    e = jnp.einsum("x,ix,jx->ij", w, uu, vbar)  # e[i, j] = <s^(i)_a s^(j)_b>

    def diag(t):
        f0, f1, f2, f3, f4 = t
        g = jnp.sum(w * f0 * f0)
        g1 = jnp.sum(w * (f1 * f1 + f0 * f2))
        g2 = 0.5 * jnp.sum(w * (f0 * f4 + 4 * f1 * f3 + 3 * f2 * f2))
        return g, g1, g2

    ga, ga1, ga2 = diag(uu)
    gb, gb1, gb2 = diag(bb)
    zero = jnp.zeros((), e.dtype)
    phi = jnp.stack([ga, e[0, 0], gb])
    jac = jnp.stack(
        [
            jnp.stack([ga1, zero, zero]),
            jnp.stack([e[2, 0] / 2, e[1, 1], e[0, 2] / 2]),
            jnp.stack([zero, zero, gb1]),
        ]
    )
    h_ab = jnp.stack(
        [
            jnp.stack([e[4, 0] / 4, e[3, 1] / 2, e[2, 2] / 4]),
            jnp.stack([e[3, 1] / 2, e[2, 2], e[1, 3] / 2]),
            jnp.stack([e[2, 2] / 4, e[1, 3] / 2, e[0, 4] / 4]),
        ]
    )
    h_aa = jnp.zeros((3, 3), e.dtype).at[0, 0].set(ga2)
    h_bb = jnp.zeros((3, 3), e.dtype).at[2, 2].set(gb2)
    hess = jnp.stack([h_aa, h_ab, h_bb])
    vpow = jnp.einsum("jxy,y->jx", jnp.stack([vv[0] ** j for j in range(5)]), w)
    upow = jnp.stack([uu[0] ** i for i in range(5)])
    m = jnp.einsum("x,ix,jx->ij", w, upow, vpow)  # m[i, j] = <s_a^i s_b^j>
    moments = (m[4, 0], m[3, 1], m[2, 2], m[1, 3], m[0, 4], m[2, 0], m[1, 1], m[0, 2])
    return phi, jac, hess, moments


# ----------------------------------------------------------------------------- recursions
@partial(jax.jit, static_argnames=("act", "order", "tabulate"))
def _flow(act, cw, ks, kd_a, kd_b, ratios, inv_prev, *, order, tabulate=False):
    """Pair recursion over layers for ``P`` pairs.

    With ``tabulate``, a layer whose inputs share one norm takes its pair statistics from a
    table in the correlation (:mod:`rgnn._pair_table`).

    Args:
      ks: ``[L+1, P]`` leading-order ``K_ab`` per layer.
      kd_a, kd_b: ``[L+1, P]`` ``K_aa`` and ``K_bb``.
      ratios: ``[L]`` ``n_l / n_{l-1}`` for the step l -> l+1 (l = 1..L).
      inv_prev: ``[L]`` ``1 / n_{l-1}`` for the step l -> l+1.
    Returns:
      ``V [L+1, P, 3, 3]``, ``Delta [L+1, P, 3]`` and the largest measured relative error of
      the tables (``0`` without them).
    """
    phi = _phi_pair(act)
    jac = jax.jacfwd(phi)
    hess = jax.jacfwd(jax.jacfwd(phi))

    def stats(k):
        if act.closed_form:
            j, h = jac(k), hess(k)
            m40, m31, m22, m13, m04, m20, m11, m02 = _pair_moments(act, k[0], k[1], k[2], order)
        else:
            _, j, h, moments = _pair_stats_quadrature(act, k, order)
            m40, m31, m22, m13, m04, m20, m11, m02 = moments
        cov4 = jnp.array(
            [
                [m40 - m20 * m20, m31 - m20 * m11, m22 - m20 * m02],
                [m31 - m20 * m11, m22 - m11 * m11, m13 - m11 * m02],
                [m22 - m20 * m02, m13 - m11 * m02, m04 - m02 * m02],
            ]
        )
        return cw * j, cw * h, cw * cw * cov4

    p = ks.shape[1]
    dtype = ks.dtype

    def step(carry, inp):
        v, delta = carry
        kvec, ratio, inv = inp
        (j, h, cov4), table_err = _pair_table.pair_stats(stats, kvec, tabulate=tabulate)
        v_new = cov4 + ratio * jnp.einsum("pik,pkl,pjl->pij", j, v, j)
        d_new = jnp.einsum("pik,pk->pi", j, delta) + 0.5 * inv * jnp.einsum("pikl,pkl->pi", h, v)
        return (v_new, d_new), (v_new, d_new, table_err)

    kvecs = jnp.stack([kd_a, ks, kd_b], axis=-1)[:-1]  # the kernel entering each step
    v0 = jnp.zeros((p, 3, 3), dtype)
    d0 = jnp.zeros((p, 3), dtype)
    _, (vs, ds, errs) = jax.lax.scan(step, (v0, d0), (kvecs, ratios, inv_prev))
    return jnp.concatenate([v0[None], vs]), jnp.concatenate([d0[None], ds]), jnp.max(errs)


@partial(jax.jit, static_argnames=("act", "order"))
def _flow_single(act, cw, kd, ratios, inv_prev, *, order):
    """Single-input recursion: ``V [L+1, N]`` and ``Delta [L+1, N]`` of ``(aa)``."""
    stats = jax.vmap(_single_stats(act, order))

    def step(carry, inp):
        v, delta = carry
        k, ratio, inv = inp
        _, g1, g2, cov4 = stats(k)
        v_new = cw * cw * cov4 + ratio * (cw * g1) ** 2 * v
        d_new = cw * g1 * delta + 0.5 * inv * cw * g2 * v
        return (v_new, d_new), (v_new, d_new)

    zero = jnp.zeros(kd.shape[1], kd.dtype)
    _, (vs, ds) = jax.lax.scan(step, (zero, zero), (kd[:-1], ratios, inv_prev))
    return jnp.concatenate([zero[None], vs]), jnp.concatenate([zero[None], ds])


_STATS_NNGP = ("V", "DG")
_STATS_NTK = ("D", "A", "DH", "F", "B")
_STATS_DNTK = ("P", "Q")
_STATS_DDNTK = ("R", "S", "T", "U")
_FOUR = {  # Perturbative field <- engine statistic (four indices)
    "vertex": "V",
    "ntk_vertex": "A",
    "mixed_vertex": "D",
    "dntk_p": "P",
    "dntk_q": "Q",
    "ddntk_r": "R",
    "ddntk_s": "S",
    "ddntk_t": "T",
    "ddntk_u": "U",
}
_COMPS = np.array([[0, 0], [0, 1], [1, 1]], np.int32)  # pair components (aa, ab, bb) as slot pairs


def _multi_order(m: int, order: int) -> int:
    """Nodes per dimension of the three/four-input rule on a set of ``m`` inputs: as many as
    fit about ``2^24`` node evaluations per layer over the ``C(m, 4)`` four-subsets, between 12
    and ``order`` (4 inputs: 48 nodes; 8: 22; 16 and more: 12)."""
    n4 = max(1, math.comb(m, 4))
    return int(min(order, max(12, (2**24 / n4) ** 0.25)))


def _flow_constants(arch: MLP, x, dtype):
    dims = np.asarray(arch.layer_dims(x.shape[1]), dtype=float)
    prev = dims[: arch.n_layers]  # n_{l-1} for l = 1..L+1
    ratios = jnp.asarray(prev[1:] / prev[:-1], dtype)
    inv_prev = jnp.asarray(1 / prev[:-1], dtype)
    lam_w = jnp.asarray(arch.recursion(x.shape[1]).lambda_w[1:], dtype)
    return prev, ratios, inv_prev, lam_w


def _sets(n: int, full: bool) -> np.ndarray:
    """The input sets the engine runs on: all inputs at once (``full``), every pair, or the
    one input."""
    if full or n == 1:
        return np.arange(n, dtype=np.int32)[None, :]
    rows, cols = np.triu_indices(n, k=1)
    return np.stack([rows, cols], axis=1).astype(np.int32)


_CHUNK = 256
"""Pairs per call of the compiled engine in the pair layout: every input count shares one
compilation (fewer pairs than this: one call on exactly those), memory stays bounded, and
the quadrature's error estimate runs on one chunk."""


def _engine_raw(arch, x, fp, order, stats, pointwise, *, full, shifted=False, first_only=False):
    """The engine's statistics ``{name: [L+1, S, m, ...]}`` on the input sets (every pair, in
    chunks of :data:`_CHUNK`, or one set of all inputs), and the three/four-input rule's
    estimated error; ``first_only``: the first chunk only."""
    n = x.shape[0]
    _, ratios, inv_prev, lam_w = _flow_constants(arch, x, fp.nngp.dtype)
    residual = None
    if arch.is_residual:  # (gamma, xi) of layer l + 1 for the step l -> l + 1
        residual = tuple(jnp.asarray(v[1:], fp.nngp.dtype) for v in arch.residual())
    sets = _sets(n, full)
    rules = flow_moments.rules(
        order, 4 * order, _multi_order(sets.shape[1], order), fp.nngp.dtype, shifted=shifted
    )
    size = min(len(sets), _CHUNK)
    outs, errs = [], []
    for start in range(0, len(sets), size):
        chunk = sets[start : start + size]
        pad = size - len(chunk)
        chunk = np.concatenate([chunk, np.repeat(chunk[:1], pad, axis=0)])
        out, err = _engine_sets(
            arch.act,
            arch.weight_var,
            lam_w,
            ratios,
            inv_prev,
            fp.nngp,
            fp.ntk,
            rules,
            jnp.asarray(chunk),
            stats=tuple(stats),
            pointwise=pointwise,
            residual=residual,
        )
        outs.append({k: v[:, : size - pad] for k, v in out.items()})
        errs.append(err)
        if first_only:
            break
    out = outs[0] if len(outs) == 1 else jax.tree.map(lambda *v: jnp.concatenate(v, 1), *outs)
    return out, max(float(e) for e in errs)


@partial(jax.jit, static_argnames=("act", "stats", "pointwise"))
def _engine_sets(
    act, cw, lam_w, ratios, inv_prev, k, t, rules, sets, *, stats, pointwise, residual=None
):
    """The flow on the input sets ``sets [S, m]`` (indices into the inputs of ``k, t``);
    ``residual``: ``None`` or the ``[L]`` residual factors ``(gamma, xi)`` of each step."""
    ks = jnp.moveaxis(jnp.moveaxis(k, 0, -1)[sets[:, :, None], sets[:, None, :]], -1, 0)
    ts = jnp.moveaxis(jnp.moveaxis(t, 0, -1)[sets[:, :, None], sets[:, None, :]], -1, 0)
    return flow_engine.flow(
        act,
        cw,
        lam_w,
        ratios,
        inv_prev,
        ks,
        ts,
        rules,
        stats=stats,
        pointwise=pointwise,
        residual=residual,
    )


@partial(jax.jit, static_argnames=("n", "full"))
def _engine_layout(out, *, n, full):
    """The fields of :class:`Perturbative` from the engine's statistics on the sets of
    :func:`_sets`."""
    if n == 1 and not full:  # the pair layout of one input: its single values everywhere
        spread = {
            s: jnp.broadcast_to(v, v.shape[:2] + (2,) * flow_rules.RANK.get(s, 4))
            for s, v in out.items()
        }
        return _pair_layout(spread, 1, np.zeros((1, 2), np.int32))
    if full or n == 1:
        fields = {name: out[s][:, 0] for name, s in _FOUR.items() if s in out}
        if "B" in out and "A" in out:  # B alone is internal to the dNTK (ntk=False)
            fields["ntk_b"] = out["B"][:, 0]
        for name, s in (("nngp_correction", "DG"), ("ntk_correction", "DH")):
            if s in out:
                fields[name] = out[s][:, 0]
        return fields
    return _pair_layout(out, n, _sets(n, full))


def _pair_layout(out, n, sets):
    """``[L+1, N, N, ...]`` pair-layout fields from the engine's per-pair tensors: entry
    ``(a, b)`` is the pair's tensor (slots flipped when ``a > b``), entry ``(a, a)`` the single
    value of ``a`` broadcast over the slots."""
    n_sets = sets.shape[0]
    sel = np.zeros((n, n), np.int32)
    own = [[] for _ in range(n)]
    for i, (a, b) in enumerate(sets):
        sel[a, b], sel[b, a] = i, n_sets + i
        own[a].append((i, 0))
        own[b].append((i, 1))
    own = np.array(own, np.int32)  # [N, N - 1, 2]: every (pair, slot) holding input a
    eye = np.eye(n, dtype=bool)

    def layout(x):  # x [L+1, P, 2, ..., 2]
        r = x.ndim - 2
        flipped = jnp.flip(x, axis=tuple(range(2, x.ndim)))
        both = jnp.concatenate([x, flipped], axis=1)[:, jnp.asarray(sel)]  # [L+1, N, N, 2..]
        # an input's single values are the same in every pair that holds it; the mean over
        # its pairs ignoring NaN keeps them when one pair is exactly parallel (relu)
        cand = x[(slice(None), jnp.asarray(own[..., 0])) + (jnp.asarray(own[..., 1]),) * r]
        single = jnp.nanmean(cand, axis=2)  # [L+1, N]
        single = jnp.broadcast_to(single[(Ellipsis,) + (None,) * (r + 1)], both.shape)
        mask = jnp.asarray(eye)[(None, Ellipsis) + (None,) * r]
        return jnp.where(mask, single, both)

    fields = {}
    for name, s in _FOUR.items():
        if s in out:
            full4 = layout(out[s])
            if name in ("vertex", "ntk_vertex", "mixed_vertex"):
                c = jnp.asarray(_COMPS)
                full4 = full4[
                    :, :, :, c[:, 0][:, None], c[:, 1][:, None], c[:, 0][None, :], c[:, 1][None, :]
                ]
            fields[name] = full4
    if "B" in out and "A" in out:
        b = layout(out["B"])
        fields["ntk_b"] = jnp.stack([b[..., 0, 0, 1, 1], b[..., 0, 1, 1, 0]], axis=-1)
        fields["_ntk_var"] = (
            layout(out["A"])[..., 0, 1, 0, 1] + fields["ntk_b"][..., 0] + fields["ntk_b"][..., 1]
        )
    for name, s in (("nngp_correction", "DG"), ("ntk_correction", "DH")):
        if s in out:
            fields[name] = layout(out[s])[..., 0, 1]
    return fields


def _assemble(arch, x, fp, fields, *, full, quadrature_order, quadrature_error):
    """A :class:`Perturbative` from engine fields (pair layout or ``full``)."""
    prev = np.asarray(arch.layer_dims(x.shape[1]), float)[: arch.n_layers]
    arrays = _observables(
        fp.nngp, fp.ntk, fp.nngp_diag1, jnp.asarray(prev, fp.nngp.dtype), fields, full=full
    )
    return Perturbative(
        **arrays,
        quadrature_order=quadrature_order,
        quadrature_error=quadrature_error,
    )


@partial(jax.jit, static_argnames=("full",))
def _observables(k, ntk, kd, prev, fields, *, full):
    """Every array field of :class:`Perturbative` from the engine's fields (one jit: the
    variances, kurtosis and coupling are views of the vertex)."""
    inv_n = 1 / prev
    v = fields["vertex"]
    if full:
        v_aaaa = jnp.einsum("laaaa->la", v)
        variance = jnp.einsum("labab->lab", v)
    else:
        v_aaaa = jnp.diagonal(v[..., 0, 0], axis1=1, axis2=2)
        variance = v[..., 1, 1]
    variance = variance * inv_n[:, None, None]
    kurt = 3 * v_aaaa * inv_n[:, None] / kd**2
    coupling = jnp.mean(v_aaaa * inv_n[:, None] / kd**2, axis=1)
    extra = {}
    if "ntk_b" in fields:
        extra["ntk"] = ntk
        if full:
            a, b = fields["ntk_vertex"], fields["ntk_b"]
            var = (
                jnp.einsum("labab->lab", a)
                + jnp.einsum("laabb->lab", b)
                + jnp.einsum("labba->lab", b)
            )
        else:
            var = fields.pop("_ntk_var")
        extra["ntk_variance"] = var * inv_n[:, None, None]
    fields = {name: val for name, val in fields.items() if not name.startswith("_")}
    return dict(
        nngp=k,
        nngp_variance=variance,
        kurtosis=kurt,
        coupling=coupling,
        widths=prev,
        **fields,
        **extra,
    )


def _run(
    arch: MLP,
    x,
    order: int,
    ntk: bool = True,
    dntk: str | None = None,
    ddntk: bool = False,
    full: bool = False,
):
    """:class:`Perturbative`: the correlation tables' path for many pairs of a quadrature
    activation (its ``quadrature_error`` without the rule's own estimate, which
    :func:`perturbative` adds), the flow engine otherwise (with every estimate)."""
    n = x.shape[0]
    if not full and _pair_table.worth_it(n * (n - 1) // 2) and not arch.is_residual:
        # thousands of pairs: the specialised pair recursions (3x3 pair components, and the
        # correlation tables for quadrature activations) still run 1.8x faster than the
        # engine's 16-component pair sets (relu, N = 256, depth 10), so they keep this case
        return _run_tabulated(arch, x, order, ntk, dntk, ddntk)
    with warnings.catch_warnings():
        # the leading-order kernels' quadrature is part of this result's own error estimate
        warnings.filterwarnings("ignore", message="fixed_point:", category=UserWarning)
        fp = fixed_point(arch, x, quadrature_order=order)
    stats = _STATS_NNGP + (_STATS_NTK if ntk else ())
    if dntk is not None:
        stats = stats + _STATS_DNTK + (_STATS_DDNTK if ddntk else ())
    out, err = _engine_raw(arch, x, fp, order, stats, dntk == "pointwise", full=full)
    result = _assemble(
        arch,
        x,
        fp,
        _engine_layout(out, n=n, full=full),
        full=full,
        quadrature_order=0 if arch.act.scale_invariant else order,
        quadrature_error=err,
    )
    if result.quadrature_order:
        # the same computation with the half-spacing-shifted rules (on the first chunk of
        # pairs): equal shapes, so the compilation is reused; the difference of the two rules
        # estimates the error of either
        lo, _ = _engine_raw(
            arch,
            x,
            fp,
            order,
            stats,
            dntk == "pointwise",
            full=full,
            shifted=True,
            first_only=True,
        )
        rule_err = 0.0
        for name, b in lo.items():
            a = np.asarray(out[name][:, : b.shape[1]])
            b = np.asarray(b)
            scale = np.nanmax(np.abs(a)) if a.size else 0.0
            if scale > 0:
                rule_err = max(rule_err, float(np.nanmax(np.abs(a - b)) / scale))
        # plus the leading-order kernels' own estimate, where the fixed point reports one
        fp_err = float(getattr(fp, "quadrature_error", 0.0) or 0.0)
        result = dataclasses.replace(result, quadrature_error=err + rule_err + fp_err)
    return result


def _run_tabulated(
    arch: MLP, x, order: int, ntk: bool = True, dntk: str | None = None, ddntk: bool = False
):
    """Many pairs: the NNGP and NTK fields by the specialised pair recursions (with the
    correlation tables of :mod:`rgnn._pair_table` for a quadrature activation), the dNTK ones
    by the engine."""
    fp, table_err = _fixed_point_tabulated(arch, x, quadrature_order=order)
    k = fp.nngp
    kd = fp.nngp_diag1
    n = x.shape[0]
    dims = np.asarray(arch.layer_dims(x.shape[1]), dtype=float)  # n_0 .. n_{L+1}
    prev = dims[: arch.n_layers]  # n_{l-1} for l = 1..L+1
    ratios = jnp.asarray(prev[1:] / prev[:-1], k.dtype)  # n_l / n_{l-1}, steps l = 1..L
    inv_prev = jnp.asarray(1 / prev[:-1], k.dtype)  # 1 / n_{l-1}
    act = arch.act
    cw = arch.weight_var
    # single inputs cost O(N): integrate them with 4x the nodes
    v1, d1 = _flow_single(act, cw, kd, ratios, inv_prev, order=4 * order)
    rows, cols = np.triu_indices(n, k=1)
    # quadrature activations on many pairs: one-norm layers use the correlation tables
    tab = not act.scale_invariant and _pair_table.worth_it(rows.size)
    if rows.size:
        vp, dp, err = _flow(
            act,
            cw,
            k[:, rows, cols],
            kd[:, rows],
            kd[:, cols],
            ratios,
            inv_prev,
            order=order,
            tabulate=tab,
        )
        table_err = max(table_err, float(err))
    else:
        vp = jnp.zeros((arch.n_layers, 0, 3, 3), k.dtype)
        dp = jnp.zeros((arch.n_layers, 0, 3), k.dtype)
    inv_n = jnp.asarray(1 / prev, k.dtype)[:, None, None]
    # assemble [L+1, N, N, ...]
    vertex = jnp.zeros((arch.n_layers, n, n, 3, 3), k.dtype)
    diag = jnp.arange(n)
    vertex = vertex.at[:, diag, diag].set(
        jnp.broadcast_to(v1[:, :, None, None], (arch.n_layers, n, 3, 3))
    )
    swap = jnp.array([2, 1, 0])
    vertex = vertex.at[:, rows, cols].set(vp)
    vertex = vertex.at[:, cols, rows].set(vp[:, :, swap][:, :, :, swap])
    corr = jnp.zeros((arch.n_layers, n, n), k.dtype)
    corr = corr.at[:, diag, diag].set(d1)
    corr = corr.at[:, rows, cols].set(dp[:, :, 1]).at[:, cols, rows].set(dp[:, :, 1])
    variance = vertex[:, :, :, 1, 1] * inv_n
    variance = variance.at[:, diag, diag].set(v1 * inv_n[:, :, 0])
    kurt = 3 * v1 * inv_n[:, :, 0] / kd**2
    coupling = jnp.mean(v1 * inv_n[:, :, 0] / kd**2, axis=1)
    ntk_fields = {}
    if ntk:
        ntk_fields, err = _run_ntk(
            arch, x, fp, order, ratios, inv_prev, v1, d1, vp, dp, rows, cols, tab
        )
        table_err = max(table_err, err)
    if dntk is not None:
        stats = _STATS_DNTK + (_STATS_DDNTK if ddntk else ())
        out, _ = _engine_raw(arch, x, fp, order, stats, dntk == "pointwise", full=False)
        fields = _engine_layout(out, n=x.shape[0], full=False)
        ntk_fields.update({k: v for k, v in fields.items() if k.startswith(("dntk", "ddntk"))})
    return Perturbative(
        nngp=k,
        nngp_correction=corr,
        nngp_variance=variance,
        kurtosis=kurt,
        vertex=vertex,
        coupling=coupling,
        widths=jnp.asarray(prev, k.dtype),
        **ntk_fields,
        # everything but the scale-invariant class integrates its 4-point moments numerically
        quadrature_order=0 if act.scale_invariant else order,
        # the tables' measured error, accumulated over the layers (perturbative adds the
        # quadrature's own estimate)
        quadrature_error=arch.n_layers * table_err,
    )


def _pair_stacks(fp, rows, cols):
    """``(kd, td, ks, ts)``: the diagonal kernel and NTK ``[L+1, N]`` and both on the pairs
    ``(rows, cols)`` as ``[L+1, P, 3]`` on ``(aa, ab, bb)``."""
    k, t = fp.nngp, fp.ntk
    kd = fp.nngp_diag1
    td = jnp.diagonal(t, axis1=1, axis2=2)
    ks = jnp.stack([kd[:, rows], k[:, rows, cols], kd[:, cols]], axis=-1)
    ts = jnp.stack([td[:, rows], t[:, rows, cols], td[:, cols]], axis=-1)
    return kd, td, ks, ts


def _check_arch_order(arch, quadrature_order, minimum: int, what: str = "rgnn.perturbative"):
    if not isinstance(arch, MLP):
        from rgnn.models import require_mlp

        require_mlp(arch, what)
    if (
        isinstance(quadrature_order, bool)
        or not isinstance(quadrature_order, int)
        or quadrature_order < minimum
    ):
        raise ValueError(
            f"quadrature_order: expected an integer >= {minimum}, got {quadrature_order!r}"
        )


def _run_ntk(arch, x, fp, order, ratios, inv_prev, v1, d1, vp, dp, rows, cols, tabulate=False):
    """The NTK fields of :class:`Perturbative` (recursions in :mod:`rgnn._ntk_flow`) and the
    largest measured error of the correlation tables (``0.0`` without them)."""
    k, t = fp.nngp, fp.ntk
    kd, td, ks, ts = _pair_stacks(fp, rows, cols)
    n = x.shape[0]
    n_layers = arch.n_layers
    rec = arch.recursion(x.shape[1])
    lam_w = jnp.asarray(rec.lambda_w[1:], k.dtype)
    act, cw = arch.act, arch.weight_var
    dims = np.asarray(arch.layer_dims(x.shape[1]), dtype=float)
    inv_n = jnp.asarray(1 / dims[:n_layers], k.dtype)
    vgh1, vhh1, dh1, b1, _ = _ntk_flow.ntk_single_flow(
        act, cw, lam_w, kd, td, v1, d1, ratios, inv_prev, order=4 * order
    )
    diag = jnp.arange(n)
    swap = jnp.array([2, 1, 0])
    a_full = jnp.zeros((n_layers, n, n, 3, 3), k.dtype)
    a_full = a_full.at[:, diag, diag].set(
        jnp.broadcast_to(vhh1[:, :, None, None], (n_layers, n, 3, 3))
    )
    d_full = (
        jnp.zeros_like(a_full)
        .at[:, diag, diag]
        .set(jnp.broadcast_to(vgh1[:, :, None, None], (n_layers, n, 3, 3)))
    )
    b_full = jnp.zeros((n_layers, n, n, 2), k.dtype)
    b_full = b_full.at[:, diag, diag].set(jnp.broadcast_to(b1[:, :, None], (n_layers, n, 2)))
    corr = jnp.zeros((n_layers, n, n), k.dtype).at[:, diag, diag].set(dh1)
    var = jnp.zeros((n_layers, n, n), k.dtype)
    var = var.at[:, diag, diag].set((vhh1 + 2 * b1) * inv_n[:, None])
    table_err = 0.0
    if rows.size:
        out = _ntk_flow.ntk_pair_flow(
            act, cw, lam_w, ks, ts, vp, dp, ratios, inv_prev, order=order, tabulate=tabulate
        )
        vgh, vhh, dh, b = out[:4]
        if tabulate:
            table_err = float(out[5])
        a_full = a_full.at[:, rows, cols].set(vhh)
        a_full = a_full.at[:, cols, rows].set(vhh[:, :, swap][:, :, :, swap])
        d_full = d_full.at[:, rows, cols].set(vgh)
        d_full = d_full.at[:, cols, rows].set(vgh[:, :, swap][:, :, :, swap])
        b_full = b_full.at[:, rows, cols].set(b).at[:, cols, rows].set(b)
        corr = corr.at[:, rows, cols].set(dh[:, :, 1]).at[:, cols, rows].set(dh[:, :, 1])
        off = (vhh[:, :, 1, 1] + b[:, :, 0] + b[:, :, 1]) * inv_n[:, None]
        var = var.at[:, rows, cols].set(off).at[:, cols, rows].set(off)
    fields = dict(
        ntk=t,
        ntk_correction=corr,
        ntk_variance=var,
        ntk_vertex=a_full,
        mixed_vertex=d_full,
        ntk_b=b_full,
    )
    return fields, table_err


def _check_memory(
    n: int,
    n_layers: int,
    itemsize: int,
    dntk: bool = False,
    ddntk: bool = False,
    *,
    full: bool = False,
    limit: float = _MEMORY_LIMIT_BYTES,
) -> None:
    if full:
        # every statistic [L+1, N^4] (up to 15 of them), about 40 moment tensors and the
        # einsum intermediates of one layer (N^4 each), and the pair grids
        n_stats = 7 + 2 * dntk + 6 * ddntk
        need = itemsize * (n**4 * (n_layers * n_stats + 60) + n * n * 48 * 48 * 12)
        what = "the full four-index fields"
    else:
        pairs = n * (n - 1) // 2
        # per pair: 16 components of each carried dNTK tensor (P, Q, F, B; + P^, Q^, R, S, T, U)
        carried = 4 * dntk + 6 * ddntk
        need = (
            itemsize
            * n_layers
            * (n * n * (9 + 16 * (2 * dntk + 4 * ddntk)) + pairs * (40 + 16 * carried))
        )
        what = "the all-pairs vertex"
    if need > limit:
        raise ValueError(
            f"x: {n} inputs over {n_layers} layers need about {need / 2**30:.3g} GiB for {what} "
            f"(memory_limit {limit / 2**30:.3g} GiB); pass fewer inputs, compute on subsets, or "
            "raise memory_limit"
        )


def perturbative(
    arch: MLP,
    x,
    *,
    quadrature_order: int = 48,
    ntk: bool = True,
    dntk: bool = False,
    ddntk: bool = False,
    kinks: str = "distributional",
    full: bool = False,
    memory_limit: float = _MEMORY_LIMIT_BYTES,
    warn: bool = True,
) -> Perturbative:
    """Order-1/n statistics of ``arch``'s preactivations on inputs ``x``, all pairs, all layers.

    Args:
      arch: the :class:`~rgnn.MLP` (mixed hidden widths allowed). A residual MLP
        (``shortcut=...``) needs ``ntk=False`` (its NTK-side statistics are not derived; a
        ``ValueError`` names them). With ``activation="linear"`` the vertex, the kernel
        correction and their views are exact on any inputs (:mod:`rgnn.flow.rules`, "Residual
        layers"); with a nonlinear activation they are given on one input only
        (``x`` of shape ``[1, n_0]``, :mod:`rgnn._residual_single`: a residual layer breaks
        the rotation symmetry among units, so the vertex alone does not carry the two-unit
        correlations and the pair recursion does not close; more inputs raise a
        ``ValueError``). There ``nngp_variance`` is
        ``V_{(ab)(ab)} / n``, the covariance of the conditional second moments
        ``E[z_{ia} z_{ib} | layer below]`` of two different units (what
        :func:`rgnn.measure` estimates for a residual layer).
      x: ``[N, n_0]`` inputs.
      quadrature_order: nodes per dimension for expectations without a closed form.
      ntk: also compute the NTK fields (about twice the work); ``False`` leaves them ``None``.
      dntk: also compute the dNTK correlators ``dntk_p`` and ``dntk_q`` (PDLT's ``P`` and
        ``Q``, all 16 components on every pair: several times the work of everything else, and
        ``[L+1, N, N, 16]`` each).
      ddntk: also compute the means of the two ddNTKs, ``ddntk_r, ddntk_s, ddntk_t, ddntk_u``
        (PDLT's ``R, S, T, U``; implies ``dntk``: their recursions run on top of it, about
        three times its work). Their terms with two second derivatives or a third are
        products of delta functions for relu and leaky relu, so there they need
        ``kinks="pointwise"``.
      kinks: for a scale-invariant activation with a kink (relu, leaky relu), which derivative
        the dNTK uses: ``"distributional"`` (``sigma'' = (1 - a) delta``: the limit of smooth
        activations and the expected NTK change of a small gradient step, whose units may cross
        the kink) or ``"pointwise"`` (``sigma'' = 0``: what automatic differentiation of the
        network gives). No effect for smooth activations.
      full: return every four-index field in full, ``[L+1, N, N, N, N]`` on all index tuples
        of the inputs (``vertex``, ``ntk_vertex``, ``mixed_vertex``, ``ntk_b`` and the dNTK and
        ddNTK fields), instead of the pair layout. Expectations on three and four distinct
        inputs use a tensor-product Gauss-Hermite rule (its estimated error is part of
        ``quadrature_error``); the work grows like ``N^5`` per layer, so this is for tens of
        inputs. On two inputs both layouts hold the same numbers.
      memory_limit: bytes the request may use (default 8 GiB); a larger request is refused
        with a ``ValueError`` before anything is allocated.
      warn: warn when depth / width is too large for O(1/n) to be trusted
        (:data:`TRUST_DEPTH_OVER_WIDTH`).

    Returns:
      A :class:`Perturbative`; see its fields. The dtype follows ``x``.
    """
    _check_arch_order(arch, quadrature_order, 2)
    if not isinstance(dntk, bool):
        raise ValueError(f"dntk: expected True or False, got {dntk!r}")
    if kinks not in flow_moments.KINKS:
        raise ValueError(f"kinks: expected one of {flow_moments.KINKS}, got {kinks!r}")
    if not isinstance(ddntk, bool):
        raise ValueError(f"ddntk: expected True or False, got {ddntk!r}")
    kinked = arch.act.scale_invariant and arch.act.negative_slope not in (None, 1.0)
    if ddntk and kinked and kinks == "distributional":
        raise ValueError(
            f"kinks: the ddNTK means of {arch.act.name} hold products of delta functions at its "
            "kink in the distributional sense (squared second and third derivatives of the "
            "activation), which do not exist; "
            'pass kinks="pointwise" (what automatic differentiation of the network gives)'
        )
    if not isinstance(full, bool):
        raise ValueError(f"full: expected True or False, got {full!r}")
    if isinstance(memory_limit, bool) or not (
        isinstance(memory_limit, int | float) and memory_limit > 0
    ):
        raise ValueError(f"memory_limit: expected a positive number of bytes, got {memory_limit!r}")
    dntk = dntk or ddntk
    if (
        arch.is_residual
        and arch.act.name != "linear"
        and (full or check_inputs(x, "x").shape[0] != 1)
    ):
        raise ValueError(
            f"x: the O(1/n) flow of a residual MLP with the nonlinear activation "
            f"{arch.act.name!r} is implemented on one input only (x of shape [1, n_0], "
            "full=False): a residual layer breaks the rotation symmetry among units that lets "
            "the vertex V carry every cross-unit correlation, so the vertex recursion does not "
            "close on V on pairs (it is exact for activation='linear'); the single-input flow "
            "carries the whole two-unit correlation (rgnn._residual_single)"
        )
    if arch.is_residual and (ntk or dntk):
        names = "ntk_correction, ntk_variance, ntk_vertex (A), mixed_vertex (D), ntk_b (B), F"
        if dntk:
            names += ", dntk_p/dntk_q (P, Q)" + (", ddntk_r/s/t/u (R, S, T, U)" if ddntk else "")
        raise ValueError(
            f"arch: the residual-layer recursions of the NTK statistics ({names}) are not "
            "derived in rgnn yet (the vertex V, the kernel correction, kurtosis and "
            "nngp_variance are); pass ntk=False (and dntk=ddntk=False) for a residual MLP"
        )
    x = check_inputs(x, "x")
    _check_memory(
        x.shape[0], arch.n_layers, x.dtype.itemsize, dntk, ddntk, full=full, limit=memory_limit
    )
    mode = kinks if dntk else None
    if arch.is_residual and arch.act.name != "linear":
        return _run_residual_single(arch, x, quadrature_order, warn)
    result = _run(arch, x, quadrature_order, ntk, mode, ddntk, full)
    n = x.shape[0]
    tabulated = not full and _pair_table.worth_it(n * (n - 1) // 2)
    if result.quadrature_order and tabulated:
        table = result.quadrature_error  # the tables' share
        # the first m inputs' entries of the full result are exactly what a run on those
        # m inputs gives, so only the 2x-order run is new work
        m = min(4, n)
        hi = _run(arch, x[:m], 2 * quadrature_order, ntk, mode, ddntk)
        err = 0.0
        names = ["vertex", "nngp_variance", "nngp_correction", "kurtosis"]
        if ntk:
            names += ["ntk_vertex", "ntk_variance", "ntk_correction"]
        if dntk:
            names += ["dntk_p", "dntk_q"]
        if ddntk:
            names += ["ddntk_r", "ddntk_s", "ddntk_t", "ddntk_u"]
        for name in names:
            a = np.asarray(getattr(result, name))[:, :m]
            if a.ndim >= 3:
                a = a[:, :, :m]
            b = np.asarray(getattr(hi, name))
            scale = np.max(np.abs(b))
            if scale > 0:
                err = max(err, float(np.max(np.abs(a - b)) / scale))
        result = dataclasses.replace(result, quadrature_error=err + table)
    bad = np.isnan(np.asarray(result.vertex)).any(axis=(0, 3, 4))
    if bad.any():
        n_bad = int(np.triu(bad, 1).sum())
        warnings.warn(
            f"{n_bad} pair(s) of inputs are exactly parallel on some layer (correlation 1): for "
            f"{arch.act.name} the second derivative of the kernel map is singular there and their "
            "pair components are NaN; remove duplicate inputs (single-input fields are unaffected)",
            stacklevel=2,
        )
    if warn:
        depth_over_width = float(np.sum(1 / np.asarray(arch.widths, float)))
        if depth_over_width > TRUST_DEPTH_OVER_WIDTH:
            worst = float(jnp.max(result.coupling))
            warnings.warn(
                f"depth/width = sum_l 1/n_l = {depth_over_width:.3g} > "
                f"{TRUST_DEPTH_OVER_WIDTH}: the O(1/n) description is not trustworthy here "
                f"(largest quartic coupling V/(n K^2) = {worst:.3g}); O(1/n^2) terms are "
                "comparable",
                stacklevel=2,
            )
    return result


def _run_residual_single(arch: MLP, x, order: int, warn: bool) -> Perturbative:
    """:class:`Perturbative` of a nonlinear residual MLP on one input, from the single-input
    flow of :mod:`rgnn._residual_single` (NumPy grid; its ``quadrature_error`` is the relative
    change of every field between 1201 and 801 grid nodes, the kernel correction's relative to
    the kernel)."""
    from rgnn._residual_single import single_input_flow

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="fixed_point:", category=UserWarning)
        fp = fixed_point(arch, x, quadrature_order=order)
    k1 = float(np.asarray(fp.nngp)[0, 0, 0])
    fine, coarse = single_input_flow(arch, k1), single_input_flow(arch, k1, points=801)
    err = 0.0
    for name in ("vertex", "nngp_correction", "kurtosis"):
        a, b = getattr(fine, name), getattr(coarse, name)
        # the kernel correction relative to the kernel it corrects (it vanishes for relu)
        scale = np.max(np.abs(fine.nngp if name == "nngp_correction" else a))
        if scale > 0:
            err = max(err, float(np.max(np.abs(a - b)) / scale))
    dtype = x.dtype
    n = np.asarray(arch.layer_dims(x.shape[1]), float)[: arch.n_layers]
    k = np.asarray(fp.nngp, np.float64)[:, 0, 0]
    v = fine.vertex

    def arr(a, shape):
        return jnp.asarray(np.reshape(a, shape), dtype)

    result = Perturbative(
        nngp=jnp.asarray(fp.nngp, dtype),
        nngp_correction=arr(fine.nngp_correction / n, (-1, 1, 1)),
        nngp_variance=arr(v / n, (-1, 1, 1)),
        kurtosis=arr(fine.kurtosis / n, (-1, 1)),
        vertex=arr(
            np.broadcast_to(v[:, None, None, None, None], (v.size, 1, 1, 3, 3)), (-1, 1, 1, 3, 3)
        ),
        coupling=arr(v / (n * k**2), (-1,)),
        widths=arr(n, (-1,)),
        quadrature_order=0,
        quadrature_error=err,
    )
    if warn:
        depth_over_width = float(np.sum(1 / np.asarray(arch.widths, float)))
        if depth_over_width > TRUST_DEPTH_OVER_WIDTH:
            warnings.warn(
                f"depth/width = sum_l 1/n_l = {depth_over_width:.3g} > "
                f"{TRUST_DEPTH_OVER_WIDTH}: the O(1/n) description is not trustworthy here",
                stacklevel=3,
            )
    return result


# ----------------------------------------------------------------------------- full vertex
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FourPoint:
    """The four-point vertex in full on a set of ``m`` inputs (:func:`vertex`).

    Attributes:
      vertex: ``[L+1, m, m, m, m]`` ``V^{(l)}_{(a_1 a_2)(a_3 a_4)}`` (not divided by the width):
        the connected four-point function of layer ``l`` is
        ``(1 / n_{l-1}) [delta_{i1 i2} delta_{i3 i4} V_{(a1 a2)(a3 a4)} + 2 perms]``.
      nngp: ``[L+1, m, m]`` the leading-order kernel.
      widths: ``[L+1]`` ``n_{l-1}``.
      quadrature_error: estimated relative error (:attr:`Perturbative.quadrature_error`: the
        two-input rule against its half-spacing shift, plus the three/four-input rule against
        one with two thirds of the nodes; 0 when everything is exact).
    """

    vertex: jax.Array
    nngp: jax.Array
    widths: jax.Array
    quadrature_error: float = dataclasses.field(default=0.0, metadata=dict(static=True))


def vertex(arch: MLP, x, *, quadrature_order: int = 48) -> FourPoint:
    """The four-point vertex ``V_{(a1 a2)(a3 a4)}`` in full on any set of inputs.

    A view of :func:`perturbative` with ``full=True, ntk=False``: the recursion of PDLT
    eq. 4.90, ``V' = C_W^2 Cov4 + (n_l / n_{l-1}) J V J^T`` with
    ``Cov4_{(ab)(cd)} = <s_a s_b s_c s_d> - <s_a s_b><s_c s_d>``, on every index tuple
    (:mod:`rgnn.flow.rules`). Expectations on one or two inputs are those of the pair layout
    (exact for the scale-invariant class); those on three or four different inputs use a
    tensor-product Gauss-Hermite rule whose estimated error is in ``quadrature_error``.

    Args:
      arch: the :class:`~rgnn.MLP`.
      x: ``[m, n_0]`` inputs (the work grows like ``m^5`` per layer).
      quadrature_order: nodes per dimension of the two-input rule (the three/four-input rule
        uses as many as fit its budget, :func:`_multi_order`).
    """
    _check_arch_order(arch, quadrature_order, 4, "rgnn.vertex")
    p = perturbative(arch, x, quadrature_order=quadrature_order, ntk=False, full=True, warn=False)
    return FourPoint(
        vertex=p.vertex,
        nngp=p.nngp,
        widths=p.widths,
        quadrature_error=p.quadrature_error,
    )
