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
entries ``(aa), (ab), (bb)``, so all-pairs quantities cost ``O(N^2 L)``: the flow engine
(:mod:`rgnn.flow`) runs on every pair as a set of two inputs, carrying each statistic's
``[2, 2, 2, 2]`` tensor (its single-input entries included), vmapped over the
``N (N - 1) / 2`` pairs.

Gaussian expectations: every moment comes from the one moment engine of :mod:`rgnn.flow`
(:class:`rgnn.flow.moments.Moments`): the 2-D quadrature of :mod:`rgnn.gaussian` for smooth
activations, the exact polar integrals for the scale-invariant class (relu, leaky relu,
linear). On many pairs (``N (N - 1) / 2 >= 4096``) of a quadrature activation whose layers
all have one norm (normalized inputs), the engine evaluates each layer's two-input moments once
on a table in the correlation ``rho = K_ab / q`` (``1025`` nodes, degree-5 local
interpolation, its error measured at every midpoint on every layer, multiplied by the number
of layers and added to ``quadrature_error``; :mod:`rgnn.flow.table`), and the fixed point's
maps likewise; inputs of different norms use the direct pair quadrature.

The NTK side (PDLT ch. 8: mean shift, variance, ``A, B, D, F``)
----------------------------------------------------------------

Derivation (PDLT ch. 8 in the language of conditional averages; notation as above). With
``W ~ N(0, C_W / n_l)`` the NTK of unit ``i`` of layer ``l+1`` obeys (PDLT eq. 8.12)

.. math::

    \\hat H^{(l+1)}_{i_1 i_2; ab} = \\delta_{i_1 i_2} \\Big[\\lambda_b + \\frac{\\lambda_W}{n_l}
        \\sum_j \\sigma_{ja} \\sigma_{jb}\\Big]
        + \\sum_{j_1 j_2} W_{i_1 j_1} W_{i_2 j_2} \\sigma'_{j_1 a} \\sigma'_{j_2 b}
        \\hat H^{(l)}_{j_1 j_2; ab} .

Given layer ``l``, row ``i`` of ``W`` is Gaussian, so ``H_{ii} = \\tilde H^{(l+1)} + \\xi_i``
with the *NTK metric*

.. math::

    \\tilde H^{(l+1)}_{ab} = \\lambda_b + \\frac{1}{n_l} \\sum_j \\big[\\lambda_W
        \\sigma_{ja}\\sigma_{jb} + C_W \\sigma'_{ja}\\sigma'_{jb} \\hat H^{(l)}_{jj;ab}\\big]

(an average over neurons, like the stochastic metric ``G``) and ``xi_i = w^T M w - E[.]`` a
quadratic form in the row, ``M_{j_1 j_2} = \\sigma'_{j_1 a}\\sigma'_{j_2 b} H_{j_1 j_2; ab}``.
Four quantities close the recursion at O(1/n):

* the joint covariance of ``(G, H~)`` on the entries ``(aa, ab, bb)`` of a pair: the blocks
  ``V_GG = V`` (four-point vertex), ``V_GH`` (PDLT's ``D``) and ``V_HH`` (PDLT's ``A``), all
  ``n_{l-1}`` times a covariance. The neurons of layer ``l`` are independent given layer
  ``l-1``, so (delta method, as for ``V``) ``V' = Cov_1 + (n_l / n_{l-1}) J V J^T`` with the
  one-neuron covariance of ``y = (C_W s s, lambda_W s s + C_W s' s' Theta)`` and the Jacobian of
  the conditional means ``(C_b + C_W phi(G), lambda_b + lambda_W phi(G) + C_W psi(G) H~)``,
  ``phi_ab = <s_a s_b>``, ``psi_ab = <s'_a s'_b>``;
* ``B`` (PDLT eq. 8.89), the covariance of the off-diagonal NTK entries,
  ``E[H_{12;a_1 a_2} H_{12;a_3 a_4}] = B_{a_1 a_3 a_2 a_4} / n``:
  ``B' = C_W^2 <s'_{a1} s'_{a2} s'_{a3} s'_{a4}> Theta_{a1a2} Theta_{a3a4}
  + (n_l / n_{l-1}) C_W^2 <s'_{a1} s'_{a3}><s'_{a2} s'_{a4}> B``; the quadratic form has
  ``E Var(xi) = (B_{aabb} + B_{abba}) / n``;
* ``F`` (PDLT's ``F``), the correlation of the off-diagonal NTK with the preactivations,
  ``E[H_{12;xy} z_{1c} z_{2d}] = F_{xy;cd} / n``, from Stein's lemma on the two rows:
  ``F' = C_W^2 <s'_x s_c s'_y s_d> Theta_xy + (n_l / n_{l-1}) P^x F P^{yT}`` with
  ``P^x_{ce} = C_W <d_e (s'_x s_c)>``;
* the mean shift ``Delta_H = E H~ - Theta``: the delta method's ``J Delta + (1/2n) Hess : V``
  (the cross term ``d^2 / dG dH~`` included) plus the correlation of ``xi`` with the neuron's
  own preactivations, ``C_W E[s'_a s'_b xi] = (C_W / n) sum_cd F_{ab;cd} <d_c d_d (s'_a s'_b)>``
  (Stein's lemma: ``Cov(w^T M w, f(z)) = s^2 sum M_{k_1 k_2} E d_{k_1} d_{k_2} f``).

Observables: ``E H_{ii;ab} = Theta_ab + Delta_H`` and
``Var H_{ii;ab} = (A_{(ab)(ab)} + B_{aabb} + B_{abba}) / n_{l-1}`` (PDLT eq. 8.? for the NTK
variance of one output; Guillen, Misof & Gerken for several inputs).

The update rules of every statistic, written once, are in :mod:`rgnn.flow.rules` (the dNTK
and ddNTK sides' derivations there too).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import warnings
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from rgnn._validate import check_inputs
from rgnn.architecture import MLP
from rgnn.fixed_point import _fixed_point_tabulated, fixed_point
from rgnn.flow import engine as flow_engine
from rgnn.flow import moments as flow_moments
from rgnn.flow import rules as flow_rules
from rgnn.flow import table as flow_table

__all__ = [
    "FourPoint",
    "Perturbative",
    "perturbative",
    "vertex",
    "TRUST_DEPTH_OVER_WIDTH",
    "TRUST_QUADRATURE_ERROR",
]

TRUST_DEPTH_OVER_WIDTH = 0.25
"""Above this ``sum_l 1/n_l`` (depth / width for equal widths) the O(1/n) truncation is not
trusted and :func:`perturbative` warns. ``L / n`` is the expansion parameter (PDLT sec. 5.4):
the O(1/n^2) terms neglected here are smaller than the O(1/n) ones by a further factor of about
``L / n`` times an O(1) constant (for relu at criticality the constant is 5, the growth rate of
``V / K^2`` per layer), so at ``L / n = 0.25`` they may already shift predictions by tens of
percent."""

TRUST_QUADRATURE_ERROR = 0.2
"""Above this ``quadrature_error`` :func:`perturbative` with ``full=True`` warns (unless
``warn=False``), naming the rule to refine. The three/four-input part of the estimate is the
largest change of any moment between two rules relative to that moment's largest value, so it
is calibrated differently by activation (measured on the end of training, 200 steps): for gelu
(Gauss-Hermite, compared with two thirds of the nodes) it is pessimistic, 0.10 at 12 nodes on
12 + 2 inputs, depth 3, with the outputs within 0.04% of 20 nodes (depth 1, 6 + 2 inputs: 0.094
with a correction 2.0% of the largest off); for tanh (trapezoid) it is 0.028 at 12 nodes on
12 + 2 inputs, depth 3, while a test output's O(1/n) correction, a difference of larger terms,
is 4.8% of the largest correction (7.7% of its own) off, the NTK change 0.3% (depth 1, 4 + 2
inputs: 0.026 with 14%). So it bounds the statistics, not always the relative error of
quantities built from them by cancellation; the threshold catches gross failures
(Gauss-Hermite for tanh at 12-16 nodes: 0.31-0.36). The pair layout (one- and two-input rules
only) reports its estimate without a warning."""

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
        (The NTK fields are ``None`` when ``perturbative(..., ntk=False)``. For a residual
        MLP, ``A`` and ``D`` are ``n`` times the covariances of two different units'
        ``H_ii`` with ``H_kk`` and ``z_k z_k``, and with a nonlinear activation
        ``ntk_variance`` is that of one unit's ``H_ii`` itself. Derivation and recursions: this
        module's docstring, :mod:`rgnn.flow.rules` and, for residual MLPs,
        :mod:`rgnn._residual_single` (one input) and :mod:`rgnn._residual_multi` (several).)
      dntk_p, dntk_q: ``[L+1, N, N, 2, 2, 2, 2]`` PDLT's dNTK-preactivation correlators ``P``
        and ``Q`` on the pair ``(a, b)`` (``None`` unless ``perturbative(..., dntk=True)``):
        with slot 0 the input ``a`` and slot 1 the input ``b``,
        ``E[dH_{i0 i1 i2; s0 s1 s2} z_{i3; s3}] = (d_{i0 i3} d_{i1 i2} P_{s0 s1 s2 s3}
        + d_{i0 i1} d_{i2 i3} Q_{s0 s1 s2 s3} + d_{i0 i2} d_{i1 i3} Q_{s0 s2 s1 s3}) / n_{l-1}``
        (not divided by the width). For ``a == b`` every component is the single-input value.
        Derivation, recursions and the treatment of kinks: :mod:`rgnn.flow.rules` (a
        nonlinear residual MLP: :mod:`rgnn._residual_single` on one input,
        :mod:`rgnn._residual_multi` on several).
      ddntk_r, ddntk_s, ddntk_t, ddntk_u: ``[L+1, N, N, 2, 2, 2, 2]`` the means of PDLT's two
        ddNTKs (``None`` unless ``perturbative(..., ddntk=True)``), in the layout of
        ``dntk_p``: with ``ddI_{i0 i1 i2 i3} = D^3 z_{i0}[g_{i1}, g_{i2}, g_{i3}]`` and
        ``ddII_{i1 i2 i3 i4} = g_{i3}^T Hess(z_{i1}) Lambda Hess(z_{i2}) g_{i4}`` (``g`` the
        learning-rate-weighted gradients),
        ``E[ddI_{i0 i1 i2 i3; s0 s1 s2 s3}] = (d_{i0 i1} d_{i2 i3} R_{s0 s1 s2 s3}
        + d_{i0 i2} d_{i3 i1} R_{s0 s2 s3 s1} + d_{i0 i3} d_{i1 i2} R_{s0 s3 s1 s2}) / n_{l-1}``
        and ``E[ddII_{i1 i2 i3 i4; s1 s2 s3 s4}] = (d_{i1 i2} d_{i3 i4} S_{s1 s2 s3 s4}
        + d_{i1 i3} d_{i2 i4} T_{s1 s3 s4 s2} + d_{i1 i4} d_{i2 i3} U_{s1 s4 s2 s3}) / n_{l-1}``
        (PDLT ch. infinity; recursions in :mod:`rgnn.flow.rules`; a nonlinear residual MLP,
        one input: :mod:`rgnn._residual_single`).
      quadrature_order: nodes per dimension used for quadrature (static).
      quadrature_error: estimated relative error of every field from quadrature (0 when
        everything is exact): the largest ``|q - q_shifted| / max |q|`` over the statistics
        on the first chunk of pairs (or the one full set), ``q_shifted`` the same computation
        with the half-spacing-shifted rules and no tables, plus the three/four-input rule's
        estimate, the leading-order kernels' own, and, where correlation tables were used
        (one-norm layers, many pairs: :mod:`rgnn.flow.table`), ``L + 1`` times their largest
        measured relative error (in float32 that measurement is dominated by roundoff, about
        ``1e-6``).
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


def _multi_order(m: int, order: int, multi: int | None = None) -> int:
    """Nodes per dimension of the three/four-input rule on a set of ``m`` inputs: ``multi``
    when given (the ``quadrature_order_multi`` of :func:`perturbative`; sets of one or two
    inputs need no such rule and keep the default, so that they share its compilation),
    otherwise as many as fit about ``2^24`` node evaluations per layer over the ``C(m, 4)``
    four-subsets, between 12 and ``order`` (4 inputs: 48 nodes; 8: 22; 16 and more: 12)."""
    n4 = max(1, math.comb(m, 4))
    if multi is not None and m >= 3:
        return int(multi)
    return int(min(order, max(12, (2**24 / n4) ** 0.25)))


_POLE_DISTANCE = {"tanh": math.pi / 2}
"""Built-in activations whose three/four-input rule is the trapezoid rule of
:func:`_multi_rules` instead of Gauss-Hermite, with the distance from the real axis of their
nearest singularity (tanh: poles at ``+-i pi / 2``). Measured, the largest relative error of
the four-input tables (``a..d <= 3``) of a depth-3 network's kernels against a converged rule,
``C_W = 1`` / ``2``: tanh at 12 nodes 2.1e-3 / 1.6e-2 (Gauss-Hermite 0.14 / 0.49), at 16
nodes 3.0e-4 / 3.1e-3 (5.2e-2 / 0.26). Sigmoid (poles at ``+-i pi``) was not clearly better
(12 nodes: 4.7e-5 / 2.7e-4 against Gauss-Hermite's 3.1e-5 / 7.3e-4) and keeps Gauss-Hermite,
as do gelu, erf and sin (entire: Gauss-Hermite converges fast, gelu at 12 nodes 3.8e-4 where
the trapezoid rule reaches 1e-4 at best) and the scale-invariant class."""


def _multi_rules(act, nodes: int, kmax: float, dtype):
    """``(rule, rule_lo)``: the one-dimensional rule of the three/four-input tensor product for
    an activation with singularities at distance ``d`` from the real axis
    (:data:`_POLE_DISTANCE`), and the rule its error estimate compares with; ``None`` for the
    others (which keep Gauss-Hermite).

    Gauss-Hermite converges only like ``exp(-c sqrt(n))`` for an integrand analytic in a strip
    but not entire, the trapezoid rule on ``[-L, L]`` with the Gaussian weight (nodes
    ``-L + j h``, ``h = 2 L / (n - 1)``) like ``exp(-c n^(2/3))`` with ``L`` balancing the
    aliasing error ``~ exp(-2 pi d' / h)`` against the truncation error ``~ phi(L) / L``
    (Trefethen & Weideman, SIAM Review 56, 385 (2014), sec. 5). In the Cholesky coordinates
    of the four inputs (standard normal) the singularities of ``sigma^(k)(z)`` lie at about
    ``d / sqrt(K)`` from the real axis, ``K`` the largest variance of a layer entering a step
    (``kmax``). ``L = 0.97 sqrt(n - 1) (K (pi / 2)^2 / d^2)^(-0.15)`` (at most 7) is the
    minimiser of the measured error, fitted on tanh (the tables of
    ``<sigma^(a) sigma^(b) sigma^(c) sigma^(d)>``, ``a..d <= 3``, for the kernels of a depth-3
    network, ``K`` from 0.38 to 1.1, 8 to 32 nodes, against a 64-node reference: this
    derivation of ``L`` is beyond the book and fitted, not derived). At 12 nodes the largest
    relative error of those tables fell from 0.14 (Gauss-Hermite) to 3e-3, at 16 from 5e-2
    to 3e-4.

    The comparison rule is the same spacing shifted by half of it, ``n - 1`` nodes on
    ``[-L + h / 2, L - h / 2]``: the shift reverses the sign of the leading aliasing error
    and the shorter range enlarges the truncation error, so the difference of the two is at
    least about the error of either (measured: 1 to 10 times the error at the chosen ``L``)."""
    d = _POLE_DISTANCE.get(act.name)
    if d is None or act.scale_invariant:
        return None
    keff = max(float(kmax), 1e-12) * (math.pi / 2 / d) ** 2
    half = min(7.0, 0.97 * math.sqrt(nodes - 1) * keff**-0.15)
    h = 2 * half / (nodes - 1)

    def rule(x):
        w = np.exp(-0.5 * x * x)
        return jnp.asarray(x, dtype), jnp.asarray(w / w.sum(), dtype)

    return rule(np.linspace(-half, half, nodes)), rule(
        np.linspace(-half + h / 2, half - h / 2, nodes - 1)
    )


def _rules(arch, fp, order: int, m: int, multi, dtype, *, shifted: bool = False):
    """The quadrature rules of the engine on sets of ``m`` inputs (:func:`rgnn.flow.moments.rules`),
    the three/four-input one replaced by :func:`_multi_rules` where it applies."""
    nodes = _multi_order(m, order, multi)
    rules = flow_moments.rules(order, 4 * order, nodes, dtype, shifted=shifted)
    if m >= 3:
        kmax = float(np.max(np.asarray(fp.nngp_diag1)[:-1]))
        trap = _multi_rules(arch.act, nodes, kmax, dtype)
        if trap is not None:
            rules = dict(rules, **{"4": trap[0], "4lo": trap[1]})
    return rules


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

_CHUNK_TABLE = 2048
"""Pairs per call when no pair needs a quadrature grid (the two-input moments from tables, or
the scale-invariant class's polar integrals on 10 angles): a pair's working set is small, so
larger calls fit and amortise the per-call cost (relu, N = 256: 3.0 s instead of 3.5 s)."""


def _tables_apply(arch, fp, n: int, full: bool) -> bool:
    """Whether the pair layout takes its two-input moments from correlation tables
    (:mod:`rgnn.flow.table`): a quadrature activation, enough pairs to pay for the tables
    (:func:`rgnn.flow.table.worth_it`) and every layer entering a step of one norm (decided
    here, outside jit, from the fixed point's diagonal: a static choice)."""
    return (
        not full
        and not arch.act.scale_invariant
        and not arch.is_residual
        and flow_table.worth_it(n * (n - 1) // 2)
        and flow_table.one_norm(np.asarray(fp.nngp_diag1)[:-1])
    )


def _engine_raw(
    arch,
    x,
    fp,
    order,
    stats,
    pointwise,
    *,
    full,
    shifted=False,
    first_only=False,
    tables=False,
    multi=None,
):
    """The engine's statistics ``{name: [L+1, S, m, ...]}`` on the input sets (every pair, in
    chunks of :data:`_CHUNK`, or one set of all inputs), the three/four-input rule's estimated
    error and the correlation tables' measured error (``0`` without them); ``first_only``: the
    first chunk only; ``tables``: the two-input moments from one table per layer
    (:func:`rgnn.flow.engine.moment_table`, built once for all chunks); ``multi``: the
    three/four-input rule's nodes per dimension (:func:`_multi_order`)."""
    n = x.shape[0]
    dtype = fp.nngp.dtype
    _, ratios, inv_prev, lam_w = _flow_constants(arch, x, dtype)
    residual = None
    if arch.is_residual:  # (gamma, xi) of layer l + 1 for the step l -> l + 1
        residual = tuple(jnp.asarray(v[1:], dtype) for v in arch.residual())
    sets = _sets(n, full)
    rules = _rules(arch, fp, order, sets.shape[1], multi, dtype, shifted=shifted)
    table, table_err = None, 0.0
    if tables:
        q = jnp.mean(fp.nngp_diag1[:-1], axis=1)
        table, errs = flow_engine.moment_table(
            arch.act, q, rules, stats=tuple(stats), pointwise=pointwise
        )
        table_err = float(jnp.max(errs))
    big = table is not None or arch.act.scale_invariant  # no quadrature grid per pair
    size = min(len(sets), _CHUNK_TABLE if big else _CHUNK)
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
            table,
            stats=tuple(stats),
            pointwise=pointwise,
            residual=residual,
        )
        outs.append({k: v[:, : size - pad] for k, v in out.items()})
        errs.append(err)
        if first_only:
            break
    out = outs[0] if len(outs) == 1 else jax.tree.map(lambda *v: jnp.concatenate(v, 1), *outs)
    return out, max(float(e) for e in errs), table_err


@partial(jax.jit, static_argnames=("act", "stats", "pointwise"))
def _engine_sets(
    act, cw, lam_w, ratios, inv_prev, k, t, rules, sets, table, *, stats, pointwise, residual=None
):
    """The flow on the input sets ``sets [S, m]`` (indices into the inputs of ``k, t``);
    ``table``: ``None`` or the layers' moment tables; ``residual``: ``None`` or the ``[L]``
    residual factors ``(gamma, xi)`` of each step."""
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
        table,
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
    value of ``a`` broadcast over the slots. Only the components a field keeps are taken from
    each pair (and its flip) before they are spread over the ``N x N`` entries."""
    n_sets = sets.shape[0]
    sel = np.zeros((n, n), np.int32)
    own = [[] for _ in range(n)]
    for i, (a, b) in enumerate(sets):
        sel[a, b], sel[b, a] = i, n_sets + i
        own[a].append((i, 0))
        own[b].append((i, 1))
    own = np.array(own, np.int32)  # [N, N - 1, 2]: every (pair, slot) holding input a
    eye = np.eye(n, dtype=bool)

    def layout(x, comps):
        """``[L+1, N, N, K]``: the slot tuples ``comps [K, r]`` of every pair's tensor
        ``x [L+1, P, 2, ..., 2]``."""
        r = x.ndim - 2
        comps = np.asarray(comps, np.int32).reshape(-1, r)
        pick = x[(slice(None), slice(None)) + tuple(jnp.asarray(comps[:, j]) for j in range(r))]
        flip = x[(slice(None), slice(None)) + tuple(jnp.asarray(1 - comps[:, j]) for j in range(r))]
        both = jnp.concatenate([pick, flip], axis=1)[:, jnp.asarray(sel)]  # [L+1, N, N, K]
        # an input's single values are the same in every pair that holds it; the mean over
        # its pairs ignoring NaN keeps them when one pair is exactly parallel (relu)
        cand = x[(slice(None), jnp.asarray(own[..., 0])) + (jnp.asarray(own[..., 1]),) * r]
        single = jnp.nanmean(cand, axis=2)  # [L+1, N]
        return jnp.where(jnp.asarray(eye)[None, :, :, None], single[:, :, None, None], both)

    c = _COMPS
    vertex_comps = np.concatenate(
        [np.repeat(c, 3, axis=0), np.tile(c, (3, 1))], axis=1
    )  # [9, 4]: (c_i, c_j) in row-major order
    fields = {}
    for name, s in _FOUR.items():
        if s in out:
            if name in ("vertex", "ntk_vertex", "mixed_vertex"):
                v = layout(out[s], vertex_comps)
                fields[name] = v.reshape(v.shape[:3] + (3, 3))
            else:
                v = layout(out[s], list(np.ndindex((2,) * 4)))
                fields[name] = v.reshape(v.shape[:3] + (2,) * 4)
    if "B" in out and "A" in out:
        fields["ntk_b"] = layout(out["B"], [(0, 0, 1, 1), (0, 1, 1, 0)])
        fields["_ntk_var"] = (
            layout(out["A"], [(0, 1, 0, 1)])[..., 0]
            + fields["ntk_b"][..., 0]
            + fields["ntk_b"][..., 1]
        )
    for name, s in (("nngp_correction", "DG"), ("ntk_correction", "DH")):
        if s in out:
            fields[name] = layout(out[s], [(0, 1)])[..., 0]
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


_ESTIMATE_INPUTS = 6
"""Inputs of the subset on which :func:`_rule_error` repeats the flow with the half-spacing-shifted
one- and two-input rules to estimate their error when the full layout has many inputs
(:data:`_DIRECT_WORK`)."""

_DIRECT_WORK = 20_000
"""Above this many four-input quadratures (``C(N, 4)`` times the layer steps) of the full
layout, :func:`_rule_error` estimates the one- and two-input rules' error on a subset of
:data:`_ESTIMATE_INPUTS` inputs instead of repeating the whole flow with the shifted rules; at or
below it the flow is repeated (the subset's own compilation would cost more than it saves)."""


def _run(
    arch: MLP,
    x,
    order: int,
    ntk: bool = True,
    dntk: str | None = None,
    ddntk: bool = False,
    full: bool = False,
    multi: int | None = None,
):
    """:class:`Perturbative` by the flow engine, with every error estimate: the rules' own
    (the half-spacing-shifted rule, on the first chunk of sets), the three/four-input rule's,
    the leading-order kernels' and, where correlation tables were used, ``L + 1`` times their
    largest measured error. Returns the result and the three/four-input rule's share of its
    ``quadrature_error`` (for the warning of :func:`perturbative`)."""
    n = x.shape[0]
    order_fp = 0 if arch.act.closed_form else order
    many = (
        not full
        and not arch.act.closed_form
        and not arch.is_residual
        and flow_table.worth_it(n * (n - 1) // 2)
    )
    with warnings.catch_warnings():
        # the leading-order kernels' quadrature is part of this result's own error estimate
        warnings.filterwarnings("ignore", message="fixed_point:", category=UserWarning)
        if many:
            # the kernel maps of one-norm layers from correlation tables too; their rule's
            # error estimated on a few inputs (it varies smoothly with the kernel)
            fp, fp_table_err = _fixed_point_tabulated(arch, x, quadrature_order=order)
            fp_err = fixed_point(arch, x[: min(n, 8)], quadrature_order=order).quadrature_error
            fp_err = float(fp_err or 0.0) + arch.n_layers * fp_table_err
        else:
            fp = fixed_point(arch, x, quadrature_order=order)
            fp_err = float(getattr(fp, "quadrature_error", 0.0) or 0.0) if order_fp else 0.0
    stats = _STATS_NNGP + (_STATS_NTK if ntk else ())
    if dntk is not None:
        stats = stats + _STATS_DNTK + (_STATS_DDNTK if ddntk else ())
    pointwise = dntk == "pointwise"
    tables = _tables_apply(arch, fp, n, full)
    out, err, table_err = _engine_raw(
        arch, x, fp, order, stats, pointwise, full=full, tables=tables, multi=multi
    )
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
        rule_err = _rule_error(arch, x, fp, order, stats, pointwise, out, full=full, multi=multi)
        total = err + rule_err + fp_err + arch.n_layers * table_err
        result = dataclasses.replace(result, quadrature_error=total)
    return result, err


def _rule_error(arch, x, fp, order, stats, pointwise, out, *, full, multi):
    """The one- and two-input rules' estimated error: the largest change of a statistic,
    relative to its largest entry, when the flow is repeated with the half-spacing-shifted
    rules directly (no tables), on the first chunk of sets (equal shapes: the direct engine's
    compilation is reused; the difference of the two estimates the error of either and, with
    tables, their error as well).

    In the full layout of many inputs (:data:`_DIRECT_WORK`) the repetition would recompute
    the three/four-input tables, which are the same in both rules and nearly all of the time
    (tanh, depth 3, 34 inputs: the whole flow again, minutes); there both rules run on a
    subset of :data:`_ESTIMATE_INPUTS` inputs instead (the most and the least correlated pair
    on the first layer, then the first inputs) with the full set's three/four-input rule."""
    n = x.shape[0]
    subset = full and not arch.is_residual and math.comb(n, 4) * (arch.n_layers - 1) > _DIRECT_WORK
    if not subset:
        lo, _, _ = _engine_raw(
            arch,
            x,
            fp,
            order,
            stats,
            pointwise,
            full=full,
            shifted=True,
            first_only=True,
            multi=multi,
        )
        pairs = [(np.asarray(out[k][:, : b.shape[1]]), np.asarray(b)) for k, b in lo.items()]
    else:
        k1 = np.asarray(fp.nngp[0], np.float64)
        corr = k1 / np.sqrt(np.outer(np.diag(k1), np.diag(k1)))
        corr[np.diag_indices(n)] = np.nan
        pick = [*np.unravel_index(np.nanargmax(corr), corr.shape)]
        pick += [*np.unravel_index(np.nanargmin(corr), corr.shape)]
        pick = list(dict.fromkeys(int(i) for i in pick + list(range(n))))[:_ESTIMATE_INPUTS]
        idx = np.sort(np.array(pick, np.int32))
        sub = np.ix_(np.arange(arch.n_layers), idx, idx)
        # the subset's kernels; nngp_diag1 stays the full set's (its largest variance sets the
        # three/four-input rule's range), and so does the node count
        fp_sub = dataclasses.replace(fp, nngp=fp.nngp[sub], ntk=fp.ntk[sub])
        nodes = _multi_order(n, order, multi)
        runs = [
            _engine_raw(
                arch, x[idx], fp_sub, order, stats, pointwise, full=True, shifted=s, multi=nodes
            )[0]
            for s in (False, True)
        ]
        pairs = [(np.asarray(a), np.asarray(runs[1][k])) for k, a in runs[0].items()]
    rule_err = 0.0
    for a, b in pairs:
        scale = np.nanmax(np.abs(a)) if a.size else 0.0
        if scale > 0:
            rule_err = max(rule_err, float(np.nanmax(np.abs(a - b)) / scale))
    return rule_err


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


def _check_memory(
    n: int,
    n_layers: int,
    itemsize: int,
    dntk: bool = False,
    ddntk: bool = False,
    *,
    full: bool = False,
    limit: float = _MEMORY_LIMIT_BYTES,
    nodes: int = 0,
    residual: bool = False,
    ntk: bool = True,
) -> None:
    if residual:
        # the full layout of a nonlinear residual MLP runs one set of (at most) four inputs at
        # a time: its peak is the scan's tables of one set (rgnn._residual_multi), carried and
        # updated (two copies): the NTK side's E, F on its members, the dNTK's F, Bo, Qh, Ph
        # and the ddNTK's R, S, T, U, J on the dNTK family; plus the outputs. Measured: tanh,
        # depth 3, four inputs, ddntk=True: 6.5 GB peak (this estimate: 6.8 GB); depth 4 and
        # more exceed the default 8 GiB
        m = min(n, 4)
        r = n_layers
        nu = m * (m + 1) // 2
        n_ntk = 1 + 5 * nu + 2 * nu * nu + m * m + nu * m
        per = (r * (2 * nu + nu * nu)) ** 2
        if ntk:
            per += 2 * (r * n_ntk) ** 2 * m * m
        if dntk:
            u = 1 + m + (6 if ddntk else 4) * m * m
            slots = m * m + m**4 + 2 * m**3 + ddntk * (4 * m**4 + m**5)
            per += (r * u) ** 2 * slots
        n_stats = 3 + 6 * ntk + 2 * dntk + 4 * ddntk
        need = itemsize * (2 * per + n_layers * n**4 * n_stats * 2)
        what = "the full four-index fields of a nonlinear residual MLP (one set of four inputs)"
        if need > limit:
            raise ValueError(
                f"x: {n} inputs over {n_layers} layers need about {need / 2**30:.3g} GiB for "
                f"{what} (memory_limit {limit / 2**30:.3g} GiB); the ddNTK tables of one set "
                "grow like (depth x 101)^2 x 4^5: pass fewer layers, ddntk=False, or raise "
                "memory_limit"
            )
        return
    if full:
        # every statistic [L+1, N^4] (up to 15 of them), about 40 moment tensors and the
        # einsum intermediates of one layer (N^4 each), the pair grids, and the
        # three/four-input grids of one batch of 16 subsets (on each node: 4 factors and the
        # contraction's intermediates; 15 products per variable on three inputs)
        n_stats = 7 + 2 * dntk + 6 * ddntk
        grids = min(16, math.comb(n, 4)) * nodes**4 * 12 + min(16, math.comb(n, 3)) * nodes**3 * 45
        need = itemsize * (n**4 * (n_layers * n_stats + 60) + n * n * 48 * 48 * 12 + grids)
        what = "the full four-index fields"
        if grids * itemsize > limit / 2:
            what += f" (most of it the {nodes}-node grids of quadrature_order_multi)"
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
    quadrature_order_multi: int | None = None,
) -> Perturbative:
    """Order-1/n statistics of ``arch``'s preactivations on inputs ``x``, all pairs, all layers.

    Args:
      arch: the :class:`~rgnn.MLP` (mixed hidden widths allowed). A residual MLP
        (``shortcut=...``): with ``activation="linear"`` the vertex, the kernel correction,
        the NTK mean shift, the NTK variance, ``A``, ``B``, ``D``, the dNTK ``P, Q``, the
        ddNTK ``R, S, T, U`` and their views are exact on any inputs (:mod:`rgnn.flow.rules`,
        "Residual layers"); with a nonlinear activation a residual layer breaks the rotation
        symmetry among units, so the vertex alone does not carry the two-unit correlations and
        the pair rules do not close: on one input (``x`` of shape ``[1, n_0]``) the single-input
        flow of :mod:`rgnn._residual_single` gives the vertex, the kernel correction, their
        views, the NTK side (``ntk``, ``ntk_correction``, ``ntk_variance``, ``ntk_vertex``
        (``A = n Cov(H_ii, H_kk)``), ``mixed_vertex`` (``D = n Cov(z_i^2, H_kk)``) and
        ``ntk_b`` (``B = n E[H_ik^2]``), ``i != k``), the dNTK ``dntk_p``, ``dntk_q`` and
        the ddNTK ``ddntk_r`` ... ``ddntk_u`` (``kinks`` as for a plain MLP); on several inputs
        the unrolled two-unit flow of :mod:`rgnn._residual_multi` gives the kernel side
        (``vertex``, ``nngp_correction``, ``nngp_variance``, ``kurtosis`` (the excess kurtosis
        of one unit, ``(d(z^4) - 6 K d(z^2)) / (n K^2)``), ``coupling``) and, with
        ``ntk=True``, the NTK side (``ntk``, ``ntk_correction``, ``ntk_variance``
        (``n Var(H_{ii;ab})`` of one unit, not ``A + 2 B``), ``ntk_vertex``, ``mixed_vertex``,
        ``ntk_b``, with the residual meanings above on every pair) and, with ``dntk=True``, the
        dNTK ``dntk_p``, ``dntk_q`` (the one-input recursion's two Hessian forms carried with
        input indices; ``kinks`` as for a plain MLP) and, with ``ddntk=True``, the ddNTK
        ``ddntk_r`` ... ``ddntk_u`` (the one-input recursion's five forms, ``J`` included,
        carried with input indices; kinked activations with ``kinks="pointwise"`` only, as for
        a plain MLP) in the pair layout, its cross-layer moments by a tensor rule of
        :data:`RESIDUAL_NODES` nodes (estimated error in ``quadrature_error``); with
        ``full=True`` and a smooth activation (tanh, gelu, ...: not the scale-invariant
        class) every one of these in the full layout ``[L+1, N, N, N, N]``, the same fields
        and index conventions as a plain MLP's, from the same flows on every four-subset of
        the inputs, one set at a time, their cross-layer moments from the 4-variable rules of
        the pairs (:mod:`rgnn._residual_multi`, "Sets of three and four inputs"; its ddNTK
        tables of one set of four take about 6.5 GB at depth 3, more than the default
        ``memory_limit`` from depth 4 on); kinked activations (relu, leaky relu) have the pair
        layout only (``full=True`` raises a ``ValueError``).
        There ``nngp_variance`` is
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
        inputs. On two inputs both layouts hold the same numbers. A nonlinear residual MLP
        (smooth activations; ``arch`` above) runs one set of four inputs at a time, ``C(N,
        4)`` of them (tanh, depth 3, ``ddntk=True``: about 10 to 20 s per set, one compilation
        for every ``N``).
      memory_limit: bytes the request may use (default 8 GiB); a larger request is refused
        with a ``ValueError`` before anything is allocated.
      warn: warn when depth / width is too large for O(1/n) to be trusted
        (:data:`TRUST_DEPTH_OVER_WIDTH`), and, with ``full=True``, when ``quadrature_error``
        is above :data:`TRUST_QUADRATURE_ERROR` (the warning names the rule to refine).
      quadrature_order_multi: nodes per dimension of the tensor-product rule of the
        expectations on three and four distinct inputs (``full=True`` only; the pair layout
        needs none). ``None`` (default): as many as fit a budget of about ``2^24`` evaluations
        per layer over the ``C(N, 4)`` four-subsets, between 12 and ``quadrature_order``
        (4 inputs: 48; 8: 22; 13 and more: 12). The time of the full layout is nearly all this
        rule and grows like its fourth power. The rule is Gauss-Hermite, except for tanh,
        whose poles near the real axis make it converge slowly: there a trapezoid rule
        (:func:`_multi_rules`). Measured, end of training
        (:func:`rgnn.end_of_training`, 200 steps) on 12 + 2 inputs, depth 3, against 24 nodes:
        tanh at 12 nodes, one test output's O(1/n) correction 7.7% and an NTK-change entry
        0.3% off (with Gauss-Hermite: 22% and 5%), at 16 nodes 1.3% and 0.04%; gelu
        (Gauss-Hermite) at 12 nodes 0.04% against 20 nodes (depth 1, 6 + 2 inputs: 3.1%
        against 32 nodes, the default 22 nodes 0.02%).

    Returns:
      A :class:`Perturbative`; see its fields. The dtype follows ``x``.
    """
    _check_arch_order(arch, quadrature_order, 2)
    _check_multi_order(quadrature_order_multi)
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
    residual_full = arch.is_residual and arch.act.name != "linear" and full
    if residual_full and arch.act.scale_invariant:
        raise ValueError(
            f"full: the full four-index layout of a residual MLP with a nonlinear activation is "
            f"implemented for smooth activations (tanh, gelu, ...); the kinked {arch.act.name!r} "
            "has the pair layout (full=False), whose every pair component is exact up to the "
            "cross-layer rule (rgnn._residual_multi); the end-of-training prediction does not "
            "apply to kinked activations"
        )
    x = check_inputs(x, "x")
    _check_memory(
        x.shape[0],
        arch.n_layers,
        x.dtype.itemsize,
        dntk,
        ddntk,
        full=full,
        limit=memory_limit,
        nodes=_multi_order(x.shape[0], quadrature_order, quadrature_order_multi) if full else 0,
        residual=residual_full,
        ntk=ntk,
    )
    mode = kinks if dntk else None
    if residual_full:
        return _run_residual_full(
            arch, x, quadrature_order, warn, ntk, mode, ddntk, quadrature_order_multi
        )
    if arch.is_residual and arch.act.name != "linear":
        if x.shape[0] == 1:
            return _run_residual_single(arch, x, quadrature_order, warn, ntk, mode, ddntk)
        return _run_residual_multi(arch, x, quadrature_order, warn, ntk, mode, ddntk)
    result, multi_err = _run(
        arch, x, quadrature_order, ntk, mode, ddntk, full, quadrature_order_multi
    )
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
        _warn_depth_over_width(arch, result, stacklevel=3)
        if full:  # the pair layout's one/two-input rules: quadrature_error, no warning
            nodes = _multi_order(x.shape[0], quadrature_order, quadrature_order_multi)
            _warn_quadrature(result, multi_err, nodes, stacklevel=3)
    return result


def _check_multi_order(multi) -> None:
    if multi is not None and (isinstance(multi, bool) or not isinstance(multi, int) or multi < 3):
        raise ValueError(
            f"quadrature_order_multi: expected None (a node budget) or an integer >= 3, got "
            f"{multi!r}"
        )


def _warn_quadrature(result, multi_err: float, nodes: int, *, stacklevel: int) -> None:
    """Warn when ``result.quadrature_error`` is above :data:`TRUST_QUADRATURE_ERROR`, naming
    the keyword of the rule that carries most of it (``nodes``: the three/four-input rule's
    nodes per dimension)."""
    err = float(result.quadrature_error)
    if not err > TRUST_QUADRATURE_ERROR:
        return
    if multi_err > err / 2:
        which = (
            f"the rule on three and four distinct inputs ({nodes} nodes per dimension) carries "
            "most of it: pass a larger quadrature_order_multi (the time grows like its fourth "
            "power)"
        )
    else:
        which = "the one- and two-input rules carry most of it: raise quadrature_order"
    warnings.warn(
        f"perturbative: estimated relative quadrature error {err:.2g} > "
        f"{TRUST_QUADRATURE_ERROR}; {which}",
        UserWarning,
        stacklevel=stacklevel,
    )


def _run_residual_single(
    arch: MLP,
    x,
    order: int,
    warn: bool,
    ntk: bool = False,
    dntk: str | None = None,
    ddntk: bool = False,
) -> Perturbative:
    """:class:`Perturbative` of a nonlinear residual MLP on one input, from the single-input
    flow of :mod:`rgnn._residual_single` (NumPy grid; its ``quadrature_error`` is the relative
    change of every field between 1201 and 801 grid nodes, the kernel and NTK corrections'
    relative to the kernels they correct). ``ntk``: also the NTK, its mean shift, its variance
    and ``A, B, D`` (one input: every pair component holds the single-input value). ``dntk``:
    ``None``, or the kink mode (``kinks``) of the dNTK correlators ``P, Q`` (their recursions
    need the NTK side, which is computed then in any case and returned only with ``ntk``).
    ``ddntk``: the ddNTK means ``R, S, T, U`` as well (needs ``dntk``)."""
    from rgnn._residual_single import single_input_flow

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="fixed_point:", category=UserWarning)
        fp = fixed_point(arch, x, quadrature_order=order)
    k1 = float(np.asarray(fp.nngp)[0, 0, 0])
    kw = {}
    if ntk or dntk is not None:
        rec = arch.recursion(x.shape[1])
        kw["ntk"] = (float(np.asarray(fp.ntk)[0, 0, 0]), rec.lambda_b, rec.lambda_w)
        kw["dntk"] = dntk
        kw["ddntk"] = ddntk
    fine = single_input_flow(arch, k1, **kw)
    coarse = single_input_flow(arch, k1, points=801, **kw)
    err = 0.0
    names = ("vertex", "nngp_correction", "kurtosis")
    if ntk:
        names += ("ntk_correction", "ntk_variance", "ntk_vertex", "mixed_vertex", "ntk_b")
    if dntk is not None:
        names += ("dntk_p", "dntk_q")
    if ddntk:
        names += ("ddntk_r", "ddntk_s", "ddntk_t", "ddntk_u")
    for name in names:
        a, b = getattr(fine, name), getattr(coarse, name)
        # the corrections relative to the kernels they correct (they vanish for relu)
        scale = np.max(np.abs(a))
        if name == "nngp_correction":
            scale = np.max(np.abs(fine.nngp))
        elif name == "ntk_correction":
            scale = np.max(np.abs(fine.ntk))
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
    if ntk:

        def pair(a):  # one input: every pair component is the single-input value
            return arr(np.broadcast_to(a[:, None, None], (a.size, 3, 3)), (-1, 1, 1, 3, 3))

        result = dataclasses.replace(
            result,
            ntk=jnp.asarray(fp.ntk, dtype),
            ntk_correction=arr(fine.ntk_correction / n, (-1, 1, 1)),
            ntk_variance=arr(fine.ntk_variance / n, (-1, 1, 1)),
            ntk_vertex=pair(fine.ntk_vertex),
            mixed_vertex=pair(fine.mixed_vertex),
            ntk_b=arr(np.stack([fine.ntk_b, fine.ntk_b], axis=-1), (-1, 1, 1, 2)),
        )
    if dntk is not None:

        def four(a):  # one input: every one of the 16 slot components is the single-input value
            return arr(np.broadcast_to(a[:, None], (a.size, 16)), (-1, 1, 1, 2, 2, 2, 2))

        result = dataclasses.replace(result, dntk_p=four(fine.dntk_p), dntk_q=four(fine.dntk_q))
        if ddntk:
            result = dataclasses.replace(
                result,
                ddntk_r=four(fine.ddntk_r),
                ddntk_s=four(fine.ddntk_s),
                ddntk_t=four(fine.ddntk_t),
                ddntk_u=four(fine.ddntk_u),
            )

    if warn:
        _warn_depth_over_width(arch, result, stacklevel=4)
    return result


def _warn_depth_over_width(arch, result, *, stacklevel: int) -> None:
    """Warn when depth/width = sum_l 1/n_l exceeds :data:`TRUST_DEPTH_OVER_WIDTH`, naming the
    largest quartic coupling of ``result`` (a :class:`Perturbative`)."""
    depth_over_width = float(np.sum(1 / np.asarray(arch.widths, float)))
    if depth_over_width > TRUST_DEPTH_OVER_WIDTH:
        worst = float(jnp.nanmax(result.coupling))
        warnings.warn(
            f"depth/width = sum_l 1/n_l = {depth_over_width:.3g} > "
            f"{TRUST_DEPTH_OVER_WIDTH}: the O(1/n) description is not trustworthy here "
            f"(largest quartic coupling V/(n K^2) = {worst:.3g}); O(1/n^2) terms are "
            "comparable",
            stacklevel=stacklevel,
        )


RESIDUAL_NODES = 20
"""Nodes per dimension of the tensor-product rule of the four-variable cross-layer moments of a
nonlinear residual MLP on several inputs (:mod:`rgnn._residual_multi`): Gauss-Hermite, tanh's
trapezoid rule of :func:`_multi_rules`. Measured (depth 4, ``gamma = 0.8, xi = 0.6``,
``C_b = 0.1``, random inputs), the largest change of the vertex / kernel correction (relative
to the largest vertex / kernel) against 40-48 nodes: relu 7e-5 / 4e-4 on two inputs (the kinks:
algebraic convergence), tanh 1.1e-5 / 3.4e-6 on three (Gauss-Hermite: 6e-5 / 4e-5), gelu
8e-13 / 4e-12 on two. The NTK side (depth 5, four inputs, tanh against 48 nodes): ``D`` 4e-4,
``A`` 1e-4, the NTK mean shift (relative to the largest NTK), variance and ``B`` 1e-5 (with
Gauss-Hermite at 20 nodes: 1e-2 on ``D``, so the estimate in ``quadrature_error``, the change
between the two rules, is pessimistic there by about 25); on one input against the grid flow
of :mod:`rgnn._residual_single`: relu 1e-4 (mean shift) to 3e-4 (``D``), tanh 1e-8, gelu
1e-10. The dNTK (depth 5, three inputs, against 64 Gauss-Hermite nodes, relative to the
largest entry): relu 1e-3 (``P``) / 2e-3 (``Q``; the kinks, with up to four derivatives of the
steps; 2e-4 / 5e-4 at 40 nodes), tanh 1e-5 (trapezoid; Gauss-Hermite 3e-3), gelu 2e-4 / 3e-4.
The work grows like its fourth power."""

_RESIDUAL_CHUNK = 16
"""Pairs per call of the compiled nonlinear residual flow (every input count shares one
compilation)."""


def _residual_cross_rules(arch: MLP, fp, dtype):
    """The rule of a nonlinear residual MLP's cross-layer moments and the one its error is
    estimated against, ``(cross, other)``: Gauss-Hermite of :data:`RESIDUAL_NODES` nodes, or
    tanh's trapezoid rule (:func:`_multi_rules`), and the other of the two with as many nodes
    (same shapes: one compilation)."""
    from rgnn import gaussian

    kmax = float(np.max(np.asarray(fp.nngp_diag1)))
    tuned = _multi_rules(arch.act, RESIDUAL_NODES, kmax, dtype)
    hermite = gaussian.hermite_rule(RESIDUAL_NODES, dtype, rule="hermite")
    if tuned is None:
        return hermite, gaussian.hermite_rule(RESIDUAL_NODES, dtype, rule="trapezoid")
    return tuned[0], hermite


def _run_residual_multi(
    arch: MLP,
    x,
    order: int,
    warn: bool,
    ntk: bool = False,
    dntk: str | None = None,
    ddntk: bool = False,
) -> Perturbative:
    """:class:`Perturbative` of a nonlinear residual MLP on ``N >= 2`` inputs from the unrolled
    two-unit flow of :mod:`rgnn._residual_multi` on every pair: the kernel side (vertex,
    kernel correction, their views, the excess kurtosis), with ``ntk`` the NTK side (the
    NTK mean shift, its variance, ``A``, ``B``, ``D``) and with ``dntk`` (the kink mode) the
    dNTK ``P, Q`` (with ``ddntk`` the ddNTK ``R, S, T, U`` as well, module docstring of
    :mod:`rgnn._residual_multi`, "The ddNTK"). ``quadrature_error``: the
    largest change of any statistic (the vertex, ``D``, ``A``, ``B``, ``P`` to ``U`` and ``n``
    times the NTK variance relative to their largest entries, the kernel and NTK corrections
    relative to the largest kernel and NTK) on the first chunk of pairs when the cross-layer rule
    (:data:`RESIDUAL_NODES` Gauss-Hermite nodes) is replaced by the trapezoid rule of as many
    nodes (about the error of the coarser of the two; same shapes, one compilation), plus the
    leading-order kernels' own."""
    from rgnn import _residual_multi as rm

    n = x.shape[0]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="fixed_point:", category=UserWarning)
        fp = fixed_point(arch, x, quadrature_order=order)
    fp_err = float(getattr(fp, "quadrature_error", 0.0) or 0.0)
    dtype = fp.nngp.dtype
    gamma, xi = (jnp.asarray(v, dtype) for v in arch.residual())
    rules = flow_moments.rules(order, 4 * order, 2, dtype)
    cross, other = _residual_cross_rules(arch, fp, dtype)
    if ntk or dntk is not None:
        rec = arch.recursion(x.shape[1])
        lam_w = jnp.asarray(rec.lambda_w, dtype)
    sets = _sets(n, False)
    outs, ntk_outs, dntk_outs = [], [], []
    err = 0.0

    def change(new, old, scale):
        return float(jnp.max(jnp.abs(new - old)) / scale) if float(scale) > 0 else 0.0

    for start in range(0, len(sets), _RESIDUAL_CHUNK):
        chunk = sets[start : start + _RESIDUAL_CHUNK]
        pad = _RESIDUAL_CHUNK - len(chunk)
        chunk = jnp.asarray(np.concatenate([chunk, np.repeat(chunk[:1], pad, axis=0)]))
        ks = rm.set_kernels(fp.nngp, chunk)
        out = rm.sets_flow(arch.act, arch.weight_var, gamma, xi, ks, rules, cross)
        outs.append([v[:, : _RESIDUAL_CHUNK - pad] for v in out])
        if ntk:
            ts = rm.set_kernels(fp.ntk, chunk)
            nout = rm.ntk_sets_flow(
                arch.act, arch.weight_var, gamma, xi, lam_w, ks, ts, rules, cross
            )
            ntk_outs.append([v[:, : _RESIDUAL_CHUNK - pad] for v in nout])
        if dntk is not None:
            ts = rm.set_kernels(fp.ntk, chunk)
            dargs = (arch.act, dntk == "pointwise", arch.weight_var, gamma, xi, lam_w, ks, ts)
            dout = rm.dntk_sets_flow(*dargs, rules, cross, ddntk=ddntk)
            dntk_outs.append([v[:, : _RESIDUAL_CHUNK - pad] for v in dout])
        if start == 0:
            lo = rm.sets_flow(arch.act, arch.weight_var, gamma, xi, ks, rules, other)
            err = max(
                change(out[0], lo[0], jnp.max(jnp.abs(out[0]))),
                change(out[1], lo[1], jnp.max(jnp.abs(fp.nngp))),
            )
            if ntk:
                nlo = rm.ntk_sets_flow(
                    arch.act, arch.weight_var, gamma, xi, lam_w, ks, ts, rules, other
                )
                err = max(err, change(nout[0], nlo[0], jnp.max(jnp.abs(fp.ntk))))
                for a, b in zip(nout[1:], nlo[1:], strict=True):
                    err = max(err, change(a, b, jnp.max(jnp.abs(a))))
            if dntk is not None:
                dlo = rm.dntk_sets_flow(*dargs, rules, other, ddntk=ddntk)
                for a, b in zip(dout, dlo, strict=True):
                    err = max(err, change(a, b, jnp.max(jnp.abs(a))))
    v, dg, d4 = (jnp.concatenate(p, axis=1) for p in zip(*outs, strict=True))
    prev = np.asarray(arch.layer_dims(x.shape[1]), float)[: arch.n_layers]
    inv_n = jnp.asarray(1 / prev, dtype)
    stats = {"V": v, "DG": dg * inv_n[:, None, None, None]}
    if ntk:
        dh, dd, nu, aa, bo = (jnp.concatenate(p, axis=1) for p in zip(*ntk_outs, strict=True))
        # PDLT's B_{a1 a3 a2 a4} = n E[H_12;a1a2 H_12;a3a4] = Bo_(a1 a2)(a3 a4)
        stats.update(
            DH=dh * inv_n[:, None, None, None],
            D=dd,
            A=aa,
            B=jnp.swapaxes(bo, 3, 4),
        )
    if dntk is not None:
        dstats = [jnp.concatenate(c, axis=1) for c in zip(*dntk_outs, strict=True)]
        stats.update(zip("PQRSTU", dstats, strict=False))
    fields = _pair_layout(stats, n, sets)
    if ntk:
        # a residual layer's NTK variance is nu_(ab)(ab)(1), not A + B + B (module docstring)
        nu_ab = jnp.einsum("lsabab->lsab", nu)
        fields["_ntk_var"] = _pair_layout({"DG": nu_ab}, n, sets)["nngp_correction"]
    result = _assemble(
        arch,
        x,
        fp,
        fields,
        full=False,
        quadrature_order=RESIDUAL_NODES,
        quadrature_error=err + fp_err,
    )
    # the excess kurtosis of one unit, (d(z^4) - 6 K d(z^2)) / (n K^2): the mean over the pairs
    # holding each input (the same in each up to the rule's error), ignoring NaN (a parallel
    # pair), as the pair layout's single-input entries
    own = np.array(
        [[(i, s) for i, p in enumerate(sets) for s in (0, 1) if p[s] == a] for a in range(n)]
    )
    kd = jnp.diagonal(fp.nngp, axis1=1, axis2=2)  # [L+1, N]
    d4_a = d4[:, own[..., 0], own[..., 1]]  # [L+1, N, N - 1]
    d2_a = dg[:, own[..., 0], own[..., 1], own[..., 1]]
    kurt = jnp.nanmean(d4_a - 6 * kd[..., None] * d2_a, axis=2) / kd**2 * inv_n[:, None]
    result = dataclasses.replace(result, kurtosis=kurt.astype(dtype))
    bad = np.isnan(np.asarray(result.vertex)).any(axis=(0, 3, 4))
    if bad.any():
        warnings.warn(
            f"{int(np.triu(bad, 1).sum())} pair(s) of inputs are exactly parallel on some layer "
            "(a singular pair kernel): their cross-layer moments and pair components are NaN; "
            "remove duplicate inputs",
            stacklevel=3,
        )
    if warn:
        _warn_depth_over_width(arch, result, stacklevel=4)
    return result


def _residual_full_sets(n: int) -> np.ndarray:
    """The input sets of the full layout of a nonlinear residual MLP: every four-subset of the
    ``N >= 4`` inputs (every index tuple of four inputs lies in one), or the one set of all
    ``N <= 4``."""
    if n <= 4:
        return np.arange(n, dtype=np.int32)[None, :]
    return np.array(list(itertools.combinations(range(n), 4)), np.int32)


def _full_gather(n: int, sets: np.ndarray, rank: int):
    """Static gather of ``[N] * rank`` index tuples from per-set tensors ``[S, m, ..., m]``: for
    each tuple, the first set holding its inputs and their positions in it: ``(set [T],
    positions [T, rank])``, ``T = N^rank``, row-major."""
    home = {}
    for i, st in enumerate(sets):
        for size in range(1, len(st) + 1):
            for sub in itertools.combinations(st.tolist(), size):
                home.setdefault(sub, (i, {a: j for j, a in enumerate(st.tolist())}))
    tuples = np.array(list(np.ndindex((n,) * rank)), np.int32).reshape(-1, rank)
    sel = np.zeros(len(tuples), np.int32)
    pos = np.zeros((len(tuples), rank), np.int32)
    for t, tup in enumerate(tuples):
        i, where = home[tuple(sorted(set(tup.tolist())))]
        sel[t] = i
        pos[t] = [where[a] for a in tup]
    return sel, pos


def _full_scatter(x, n: int, sets: np.ndarray):
    """``[L+1, N, ..., N]`` from the per-set tensors ``x [L+1, S, m, ..., m]`` (every index
    tuple from a set that holds its inputs; the sets agree on shared tuples up to the rule's
    error)."""
    rank = x.ndim - 2
    sel, pos = _full_gather(n, sets, rank)
    ix = (slice(None), jnp.asarray(sel)) + tuple(jnp.asarray(pos[:, j]) for j in range(rank))
    return x[ix].reshape((x.shape[0],) + (n,) * rank)


def _run_residual_full(
    arch: MLP,
    x,
    order: int,
    warn: bool,
    ntk: bool = False,
    dntk: str | None = None,
    ddntk: bool = False,
    multi: int | None = None,
) -> Perturbative:
    """The full four-index layout (``full=True``) of a nonlinear residual MLP with a smooth
    activation: the set flows of :mod:`rgnn._residual_multi` on every four-subset of the inputs
    (the one set of all ``N <= 4``), each set's ``[m, m, m, m]`` statistics scattered into
    ``[L+1, N, N, N, N]`` (module docstring of :mod:`rgnn._residual_multi`, "Sets of three and
    four inputs"). The same fields, names and index conventions as the plain engine's full
    layout, with the residual meanings of :func:`_run_residual_multi` (``ntk_variance`` is
    ``n Var(H_{ii;ab})``, the kurtosis ``(d(z^4) - 6 K d(z^2)) / (n K^2)``). The sets run one
    at a time through one compilation (the ddNTK tables of one set of four at depth 3 are a
    few GiB). The same-layer moments on three and four inputs use the plain engine's rule
    (:func:`_rules`, ``quadrature_order_multi`` as there: the budget counts the ``C(N, 4)``
    sets); the cross-layer ones the tensor rule of :data:`RESIDUAL_NODES` nodes on the pairs.
    ``quadrature_error``: the largest change of any statistic on the first set when both rules
    are replaced at once (the cross-layer rule by the other of Gauss-Hermite and the trapezoid
    rule, the three/four-input rule by its coarser ``"4lo"``), plus the leading-order
    kernels' own."""
    from rgnn import _residual_multi as rm

    n = x.shape[0]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="fixed_point:", category=UserWarning)
        fp = fixed_point(arch, x, quadrature_order=order)
    fp_err = float(getattr(fp, "quadrature_error", 0.0) or 0.0)
    dtype = fp.nngp.dtype
    gamma, xi = (jnp.asarray(v, dtype) for v in arch.residual())
    sets = _residual_full_sets(n)
    m = sets.shape[1]
    rules = _rules(arch, fp, order, max(n, m), multi, dtype)
    # the coarser three/four-input rule padded to the same shape (zero weights at 0): the
    # estimate reuses the compilation
    lo_x, lo_w = rules["4lo"]
    pad = rules["4"][0].shape[0] - lo_x.shape[0]
    rules_lo = dict(
        rules,
        **{"4": (jnp.pad(lo_x, (0, pad)), jnp.pad(lo_w, (0, pad)))},
    )
    cross, other = _residual_cross_rules(arch, fp, dtype)
    if ntk or dntk is not None:
        lam_w = jnp.asarray(arch.recursion(x.shape[1]).lambda_w, dtype)

    def run(one, rules_, cross_):
        ks = rm.set_kernels(fp.nngp, one)
        out = list(rm.sets_flow(arch.act, arch.weight_var, gamma, xi, ks, rules_, cross_))
        if ntk:
            ts = rm.set_kernels(fp.ntk, one)
            out += rm.ntk_sets_flow(
                arch.act, arch.weight_var, gamma, xi, lam_w, ks, ts, rules_, cross_
            )
        if dntk is not None:
            ts = rm.set_kernels(fp.ntk, one)
            out += rm.dntk_sets_flow(
                arch.act,
                dntk == "pointwise",
                arch.weight_var,
                gamma,
                xi,
                lam_w,
                ks,
                ts,
                rules_,
                cross_,
                ddntk=ddntk,
            )
        return out

    outs = [run(jnp.asarray(sets[s : s + 1]), rules, cross) for s in range(len(sets))]
    lo = run(jnp.asarray(sets[:1]), rules_lo, other)
    per = [jnp.concatenate(p, axis=1) for p in zip(*outs, strict=True)]  # [R, S, ...] each
    # the estimate: kernel and NTK corrections relative to the largest kernel / NTK, the rest to
    # their own largest entry
    scales = [None, jnp.max(jnp.abs(fp.nngp)), None]
    if ntk:
        scales += [jnp.max(jnp.abs(fp.ntk))] + [None] * 4
    if dntk is not None:
        scales += [None] * (6 if ddntk else 2)
    err = 0.0
    for a, b, sc in zip(outs[0], lo, scales, strict=True):
        sc = jnp.max(jnp.abs(a)) if sc is None else sc
        if float(sc) > 0:
            err = max(err, float(jnp.max(jnp.abs(a - b)) / sc))
    prev = np.asarray(arch.layer_dims(x.shape[1]), float)[: arch.n_layers]
    inv_n = jnp.asarray(1 / prev, dtype)
    v, dg, d4 = per[:3]
    fields = {
        "vertex": _full_scatter(v, n, sets),
        "nngp_correction": _full_scatter(dg, n, sets) * inv_n[:, None, None],
    }
    if ntk:
        dh, dd, nu, aa, bo = per[3:8]
        fields.update(
            ntk_correction=_full_scatter(dh, n, sets) * inv_n[:, None, None],
            mixed_vertex=_full_scatter(dd, n, sets),
            ntk_vertex=_full_scatter(aa, n, sets),
            # PDLT's B_{a1 a3 a2 a4} = n E[H_12;a1a2 H_12;a3a4] = Bo_(a1 a2)(a3 a4)
            ntk_b=_full_scatter(jnp.swapaxes(bo, 3, 4), n, sets),
        )
        nu_ab = jnp.einsum("lsabab->lsab", nu)
    if dntk is not None:
        names = ("dntk_p", "dntk_q") + (
            ("ddntk_r", "ddntk_s", "ddntk_t", "ddntk_u") if ddntk else ()
        )
        start = 8 if ntk else 3
        for name, val in zip(names, per[start:], strict=True):
            fields[name] = _full_scatter(val, n, sets)
    result = _assemble(
        arch,
        x,
        fp,
        fields,
        full=True,
        quadrature_order=RESIDUAL_NODES,
        quadrature_error=err + fp_err,
    )
    kd = jnp.diagonal(fp.nngp, axis1=1, axis2=2)  # [L+1, N]
    d4_a = _full_scatter(d4, n, sets)
    d2_a = jnp.diagonal(fields["nngp_correction"], axis1=1, axis2=2) / inv_n[:, None]
    kurt = (d4_a - 6 * kd * d2_a) / kd**2 * inv_n[:, None]
    replace = dict(kurtosis=kurt.astype(dtype))
    if ntk:
        # a residual layer's NTK variance is nu_(ab)(ab)(1), not A + B + B (module docstring)
        replace["ntk_variance"] = _full_scatter(nu_ab, n, sets) * inv_n[:, None, None]
    result = dataclasses.replace(result, **replace)
    if np.isnan(np.asarray(result.vertex)).any():
        warnings.warn(
            "some inputs are exactly parallel on some layer (a singular set kernel): their "
            "cross-layer moments and components are NaN; remove duplicate inputs",
            stacklevel=3,
        )
    if warn:
        _warn_depth_over_width(arch, result, stacklevel=4)
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


def vertex(
    arch: MLP, x, *, quadrature_order: int = 48, quadrature_order_multi: int | None = None
) -> FourPoint:
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
      quadrature_order_multi: nodes per dimension of the three/four-input rule (``None``: the
        budget's; :func:`perturbative`).
    """
    _check_arch_order(arch, quadrature_order, 4, "rgnn.vertex")
    p = perturbative(
        arch,
        x,
        quadrature_order=quadrature_order,
        ntk=False,
        full=True,
        warn=False,
        quadrature_order_multi=quadrature_order_multi,
    )
    return FourPoint(
        vertex=p.vertex,
        nngp=p.nngp,
        widths=p.widths,
        quadrature_error=p.quadrature_error,
    )
