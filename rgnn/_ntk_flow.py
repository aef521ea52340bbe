"""The NTK side of the perturbative flow: O(1/n) mean shift and fluctuations of the NTK.

Derivation (PDLT ch. 8 in the language of conditional averages; notation of
:mod:`rgnn.perturbative`). With ``W ~ N(0, C_W / n_l)`` the NTK of unit ``i`` of layer ``l+1``
obeys (PDLT eq. 8.12)

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

Gaussian expectations: moments of products of ``sigma`` and ``sigma'`` are integrated exactly
in polar coordinates for the scale-invariant class and by the quadrature grid otherwise;
derivatives of ``phi`` and ``psi`` with respect to the kernel come from the activation's closed
forms (scale-invariant class) or from Price's identity
``d<f>/dK_cd = (1 / (1 + delta_cd)) <d_c d_d f>`` on the grid (derivatives of sigma up to 5th
order by autodiff), never by differentiating through the quadrature.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from rgnn import _pair_table, gaussian
from rgnn.activations import Activation

# monomials (i_a, k_a, i_b, k_b): sigma_a^i_a sigma'_a^k_a sigma_b^i_b sigma'_b^k_b
_S = ((2, 0, 0, 0), (1, 0, 1, 0), (0, 0, 2, 0))  # s_a s_a, s_a s_b, s_b s_b
_D = ((0, 2, 0, 0), (0, 1, 0, 1), (0, 0, 0, 2))  # s'_a s'_a, s'_a s'_b, s'_b s'_b
_XY = ((0, 0), (0, 1), (1, 1))  # the two inputs of each pair component (0 = a, 1 = b)


def _add(*ms):
    return tuple(int(sum(t)) for t in zip(*ms, strict=True))


def _unit(which: int, deriv: bool):
    m = [0, 0, 0, 0]
    m[2 * which + (1 if deriv else 0)] = 1
    return tuple(m)


def _monomials():
    out = set(_S) | set(_D)
    for p in _S + _D:
        for q in _S + _D:
            out.add(_add(p, q))
    for x, y in _XY:
        for c in (0, 1):
            for d in (0, 1):
                out.add(_add(_unit(x, True), _unit(c, False), _unit(y, True), _unit(d, False)))
    return tuple(sorted(out))


_MONOS = _monomials()
_INDEX = {m: i for i, m in enumerate(_MONOS)}


ARC_NODES = 12
"""Gauss-Legendre nodes per arc of the exact polar integrals (:func:`_angular_grid`). On each
arc between kinks the angular integrand is a trigonometric polynomial of degree <= 8; 12 nodes
reproduce 64-node results to 1.1e-13 (relative, float64) over 200 random pairs with
correlations up to 1 - 1e-8, relu and leaky relu; 8 nodes only to 5e-7."""


def _slope(act: Activation) -> float:
    return 1.0 if act.negative_slope is None else float(act.negative_slope)


def _angular_grid(s1, c, s2, nodes: int = ARC_NODES):
    """``(u, v, w)`` on the unit circle for the exact polar integrals of the scale-invariant
    class: with ``xi = r (cos t, sin t)``, ``u = s1 cos t`` and ``v = c cos t + s2 sin t`` are
    ``z_a / r`` and ``z_b / r``; the angle is split at the kinks ``cos t = 0`` and
    ``c cos t + s2 sin t = 0`` and integrated by Gauss-Legendre on each arc (weights ``w``
    include the ``1 / 2 pi``). A product of homogeneous pieces of total degree ``p`` then has
    ``E = 2^(p/2) Gamma(p/2 + 1) sum(w * angular part)`` (the radial integral in closed form)."""
    t0 = jnp.arctan2(-c, s2)  # where c cos t + s2 sin t = 0 (mod pi)
    cuts = jnp.sort(
        jnp.stack(
            [jnp.pi / 2, 3 * jnp.pi / 2, jnp.mod(t0, 2 * jnp.pi), jnp.mod(t0 + jnp.pi, 2 * jnp.pi)]
        )
    )
    edges = jnp.concatenate([jnp.zeros((1,), cuts.dtype), cuts, jnp.full((1,), 2 * jnp.pi)])
    gx, gw = np.polynomial.legendre.leggauss(nodes)
    gx, gw = jnp.asarray(gx, cuts.dtype), jnp.asarray(gw, cuts.dtype)
    lo, hi = edges[:-1, None], edges[1:, None]
    t = 0.5 * (hi - lo) * gx[None, :] + 0.5 * (hi + lo)
    w = 0.5 * (hi - lo) * gw[None, :] / (2 * jnp.pi)
    return s1 * jnp.cos(t), c * jnp.cos(t) + s2 * jnp.sin(t), w


def _polar_moments(slope: float, s1, c, s2, nodes: int = ARC_NODES):
    """All :data:`_MONOS` for ``sigma(x) = x (x > 0), slope x (x < 0)``, exactly
    (:func:`_angular_grid`)."""
    u, v, w = _angular_grid(s1, c, s2, nodes)
    su, sv = jnp.where(u > 0, u, slope * u), jnp.where(v > 0, v, slope * v)
    du, dv = jnp.where(u > 0, 1.0, slope), jnp.where(v > 0, 1.0, slope)
    out = []
    for ia, ka, ib, kb in _MONOS:
        p = ia + ib
        radial = 2 ** (p / 2) * math.gamma(p / 2 + 1)
        out.append(radial * jnp.sum(w * su**ia * du**ka * sv**ib * dv**kb))
    return jnp.stack(out)


def _derivatives(fn, order: int):
    """``[sigma, sigma', ..., sigma^(order)]`` as elementwise functions (autodiff)."""
    out = [fn]
    for _ in range(order):
        f = out[-1]
        out.append(jnp.vectorize(jax.grad(lambda x, f=f: f(x))))
    return out


def _cholesky2(k):
    """``(s1, c, s2)``: ``z_a = s1 xi_1``, ``z_b = c xi_1 + s2 xi_2`` for
    ``k = (K_aa, K_ab, K_bb)`` (``s2 = 0`` for parallel inputs)."""
    s1 = jnp.sqrt(k[0])
    c = k[1] / s1
    s2 = jnp.sqrt(jnp.maximum(k[2] - c * c, 0.0))
    return s1, c, s2


def _pair_stats(act: Activation, k, order: int):
    """Everything the NTK recursion needs of one pair at kernel ``k = (K_aa, K_ab, K_bb)``.

    Returns ``(jphi [3,3], hphi [3,3,3], psi [3], jpsi [3,3], hpsi [3,3,3], mom [M])`` with
    ``jphi[P, Q] = d phi_P / d K_Q`` (no ``C_W``) and ``mom`` the expectations of
    :data:`_MONOS`.
    """
    s1, c, s2 = _cholesky2(k)
    if act.scale_invariant:
        slope = _slope(act)
        a2 = (1 + slope * slope) / 2

        def phi(kk):
            f, df = act.maps(kk[0], kk[2], kk[1])
            return jnp.stack([a2 * kk[0], f, a2 * kk[2]]), jnp.stack(
                [a2 + 0 * kk[0], df, a2 + 0 * kk[2]]
            )

        def phi_only(kk):
            return phi(kk)[0]

        def psi_only(kk):
            return phi(kk)[1]

        jphi = jax.jacfwd(phi_only)(k)
        hphi = jax.jacfwd(jax.jacfwd(phi_only))(k)
        psi = psi_only(k)
        jpsi = jax.jacfwd(psi_only)(k)
        hpsi = jax.jacfwd(jax.jacfwd(psi_only))(k)
        return jphi, hphi, psi, jpsi, hpsi, _polar_moments(slope, s1, c, s2)

    x, w = gaussian.hermite_rule(order, jnp.result_type(k))
    ds = _derivatives(act.fn, 5)
    u = s1 * x
    v = c * x[:, None] + s2 * x[None, :]
    ub = jnp.sqrt(k[2]) * x
    uu = jnp.stack([d(u) for d in ds])  # [6, Q]
    vv = jnp.stack([d(v) for d in ds])  # [6, Q, Q]
    bb = jnp.stack([d(ub) for d in ds])  # [6, Q]
    vbar = jnp.einsum("kxy,y->kx", vv, w)
    e = jnp.einsum("x,ix,jx->ij", w, uu, vbar)  # e[i, j] = <s^(i)_a s^(j)_b>

    def single(t):
        f0, f1, f2, f3, f4, f5 = t
        g = jnp.sum(w * f0 * f0)
        g1 = jnp.sum(w * (f1 * f1 + f0 * f2))
        g2 = 0.5 * jnp.sum(w * (f0 * f4 + 4 * f1 * f3 + 3 * f2 * f2))
        p = jnp.sum(w * f1 * f1)
        p1 = jnp.sum(w * (f2 * f2 + f1 * f3))
        p2 = 0.5 * jnp.sum(w * (f1 * f5 + 4 * f2 * f4 + 3 * f3 * f3))
        return g, g1, g2, p, p1, p2

    ga, ga1, ga2, pa, pa1, pa2 = single(uu)
    gb, gb1, gb2, pb, pb1, pb2 = single(bb)
    z = jnp.zeros((), e.dtype)

    def jac(e, d_a, d_b):
        return jnp.stack(
            [
                jnp.stack([d_a, z, z]),
                jnp.stack([e[2, 0] / 2, e[1, 1], e[0, 2] / 2]),
                jnp.stack([z, z, d_b]),
            ]
        )

    def hess(e, h_a, h_b):
        h_ab = jnp.stack(
            [
                jnp.stack([e[4, 0] / 4, e[3, 1] / 2, e[2, 2] / 4]),
                jnp.stack([e[3, 1] / 2, e[2, 2], e[1, 3] / 2]),
                jnp.stack([e[2, 2] / 4, e[1, 3] / 2, e[0, 4] / 4]),
            ]
        )
        h_aa = jnp.zeros((3, 3), e.dtype).at[0, 0].set(h_a)
        h_bb = jnp.zeros((3, 3), e.dtype).at[2, 2].set(h_b)
        return jnp.stack([h_aa, h_ab, h_bb])

    jphi = jac(e, ga1, gb1)
    hphi = hess(e, ga2, gb2)
    e1 = e[1:, 1:]  # <s^(i+1)_a s^(j+1)_b>: the same identities for psi = <s'_a s'_b>
    psi = jnp.stack([pa, e[1, 1], pb])
    jpsi = jac(e1, pa1, pb1)
    hpsi = hess(e1, pa2, pb2)
    # monomials on the grid
    su, du = uu[0], uu[1]
    sv, dv = vv[0], vv[1]
    mom = []
    for ia, ka, ib, kb in _MONOS:
        inner = jnp.sum(w[None, :] * sv**ib * dv**kb, axis=1)
        mom.append(jnp.sum(w * su**ia * du**ka * inner))
    return jphi, hphi, psi, jpsi, hpsi, jnp.stack(mom)


def _m(mom, *parts):
    return mom[_INDEX[_add(*parts)]]


def _moment_blocks(mom):
    """``css, csd, cdd [3, 3]`` (one-neuron covariances of ``S = s s`` and ``D = s' s'``),
    ``fsrc [3, 2, 2]`` (``<s'_x s_c s'_y s_d>``) and ``bsrc`` (``<s'_a^2 s'_b^2>``)."""
    es = jnp.stack([_m(mom, p) for p in _S])
    ed = jnp.stack([_m(mom, p) for p in _D])

    def cov(ps, qs, mp, mq):
        return jnp.stack(
            [
                jnp.stack([_m(mom, p, q) - mp[i] * mq[j] for j, q in enumerate(qs)])
                for i, p in enumerate(ps)
            ]
        )

    css = cov(_S, _S, es, es)
    csd = cov(_S, _D, es, ed)
    cdd = cov(_D, _D, ed, ed)
    fsrc = jnp.stack(
        [
            jnp.stack(
                [
                    jnp.stack(
                        [
                            _m(
                                mom,
                                _unit(x, True),
                                _unit(cc, False),
                                _unit(y, True),
                                _unit(dd, False),
                            )
                            for dd in (0, 1)
                        ]
                    )
                    for cc in (0, 1)
                ]
            )
            for x, y in _XY
        ]
    )
    bsrc = _m(mom, (0, 2, 0, 2))
    return css, csd, cdd, fsrc, bsrc


_COMP = np.array([[0, 1], [1, 2]], np.int32)  # pair component of the kernel entry (c, d)
_DUP = np.array([[2.0, 1.0], [1.0, 2.0]])  # 1 + delta_cd


@partial(jax.jit, static_argnames=("act", "order", "tabulate"))
def ntk_pair_flow(act, cw, lam_w, ks, ts, vgg, dg, ratios, inv_prev, *, order, tabulate=False):
    """The NTK recursion over layers for ``P`` pairs.

    With ``tabulate``, a layer whose inputs share one norm takes the pair statistics
    (:func:`_pair_stats`) from a table in the correlation (:mod:`rgnn._pair_table`).

    Args:
      ks, ts: ``[L+1, P, 3]`` leading-order ``K`` and ``Theta`` on ``(aa, ab, bb)``.
      lam_w: ``[L]`` ``lambda_W`` of layer ``l+1`` for the step ``l -> l+1``.
      vgg, dg: ``[L+1, P, 3, 3]``, ``[L+1, P, 3]`` the NNGP-side ``V`` and ``Delta``.
      ratios, inv_prev: ``[L]`` ``n_l / n_{l-1}`` and ``1 / n_{l-1}``.
    Returns:
      ``(vgh, vhh, dh, b, f)``: ``[L+1, P, 3, 3]``, ``[L+1, P, 3, 3]``, ``[L+1, P, 3]``,
      ``[L+1, P, 2]`` (``B_aabb, B_abba``), ``[L+1, P, 3, 2, 2]``; with ``tabulate`` a sixth
      element, the tables' largest measured relative error.
    """
    comp = jnp.asarray(_COMP)
    dup = jnp.asarray(_DUP, ks.dtype)

    def one(carry, stats, t, lw, ratio, inv, vgg, dg):
        vgh, vhh, dh, b, f = carry
        jphi, hphi, psi, jpsi, hpsi, mom = stats
        css, csd, cdd, fsrc, bsrc = _moment_blocks(mom)
        jg = cw * jphi
        jhk = lw * jphi + cw * t[:, None] * jpsi
        jht = cw * psi
        sd = csd * t[None, :]
        c_gh = cw * (lw * css + cw * sd)
        c_hh = lw * lw * css + lw * cw * (sd + sd.T) + cw * cw * cdd * t[:, None] * t[None, :]
        a_gh = jhk @ vgh * jht[None, :]  # Jhk V_GH diag(jht)
        vgh_new = c_gh + ratio * (jg @ vgg @ jhk.T + (jg @ vgh) * jht[None, :])
        vhh_new = c_hh + ratio * (
            jhk @ vgg @ jhk.T + a_gh + a_gh.T + vhh * jht[:, None] * jht[None, :]
        )
        hm = lw * hphi + cw * t[:, None, None] * hpsi
        xi = cw * jnp.einsum("icd,icd->i", f, dup[None] * jpsi[:, comp])
        dh_new = (
            jhk @ dg
            + jht * dh
            + inv
            * (0.5 * jnp.einsum("icd,cd->i", hm, vgg) + cw * jnp.einsum("ic,ci->i", jpsi, vgh) + xi)
        )
        z = jnp.zeros((), t.dtype)
        pa = cw * jnp.stack([jnp.stack([jphi[0, 0], z]), jnp.stack([2 * jphi[1, 0], psi[1]])])
        pb = cw * jnp.stack([jnp.stack([psi[1], 2 * jphi[1, 2]]), jnp.stack([z, jphi[2, 2]])])
        # entry (xy) = (aa), (ab), (bb): P^x F P^y^T
        prop = jnp.stack([pa @ f[0] @ pa.T, pa @ f[1] @ pb.T, pb @ f[2] @ pb.T])
        f_new = cw * cw * fsrc * t[:, None, None] + ratio * prop
        b_new = (
            cw * cw * bsrc * t[1] ** 2
            + ratio * cw * cw * jnp.stack([psi[0] * psi[2], psi[1] ** 2]) * b
        )
        return vgh_new, vhh_new, dh_new, b_new, f_new

    def step(carry, inp):
        k, t, lw, ratio, inv, v, d = inp
        stats, err = _pair_table.pair_stats(
            lambda kk: _pair_stats(act, kk, order), k, tabulate=tabulate
        )
        new = jax.vmap(lambda c, ss, tt, vv, dd: one(c, ss, tt, lw, ratio, inv, vv, dd))(
            carry, stats, t, v, d
        )
        return new, (new, err)

    p = ks.shape[1]
    dt = ks.dtype
    init = (
        jnp.zeros((p, 3, 3), dt),
        jnp.zeros((p, 3, 3), dt),
        jnp.zeros((p, 3), dt),
        jnp.zeros((p, 2), dt),
        jnp.zeros((p, 3, 2, 2), dt),
    )
    _, (outs, errs) = jax.lax.scan(
        step, init, (ks[:-1], ts[:-1], lam_w, ratios, inv_prev, vgg[:-1], dg[:-1])
    )
    out = tuple(jnp.concatenate([i[None], o]) for i, o in zip(init, outs, strict=True))
    return out + (jnp.max(errs, initial=0.0),) if tabulate else out


def _single_stats(act: Activation, k, order: int):
    """``(phi, phi', phi'', psi, psi', psi'', <s^4>, <s^2 s'^2>, <s'^4>)`` of one input."""
    if act.scale_invariant:
        a = _slope(act)
        a2, a4 = (1 + a * a) / 2, (1 + a**4) / 2
        zero = jnp.zeros_like(k)
        one = jnp.ones_like(k)
        return a2 * k, a2 * one, zero, a2 * one, zero, zero, 3 * a4 * k * k, a4 * k, a4 * one
    x, w = gaussian.hermite_rule(order, jnp.result_type(k))
    f0, f1, f2, f3, f4, f5 = (d(jnp.sqrt(k) * x) for d in _derivatives(act.fn, 5))

    def e(v):
        return jnp.sum(w * v)

    return (
        e(f0 * f0),
        e(f1 * f1 + f0 * f2),
        0.5 * e(f0 * f4 + 4 * f1 * f3 + 3 * f2 * f2),
        e(f1 * f1),
        e(f2 * f2 + f1 * f3),
        0.5 * e(f1 * f5 + 4 * f2 * f4 + 3 * f3 * f3),
        e(f0**4),
        e(f0 * f0 * f1 * f1),
        e(f1**4),
    )


@partial(jax.jit, static_argnames=("act", "order"))
def ntk_single_flow(act, cw, lam_w, kd, td, vgg, dg, ratios, inv_prev, *, order):
    """Single-input NTK recursion: ``(vgh, vhh, dh, b, f)``, each ``[L+1, N]``."""

    def one(carry, k, t, lw, ratio, inv, vgg, dg):
        vgh, vhh, dh, b, f = carry
        g, g1, g2, p, p1, p2, m4, m22, d4 = _single_stats(act, k, order)
        css, csd, cdd = m4 - g * g, m22 - g * p, d4 - p * p
        jg, jhk, jht = cw * g1, lw * g1 + cw * t * p1, cw * p
        c_gh = cw * (lw * css + cw * csd * t)
        c_hh = lw * lw * css + 2 * lw * cw * csd * t + cw * cw * cdd * t * t
        vgh_new = c_gh + ratio * jg * (vgg * jhk + vgh * jht)
        vhh_new = c_hh + ratio * (jhk * jhk * vgg + 2 * jhk * jht * vgh + jht * jht * vhh)
        dh_new = (
            jhk * dg
            + jht * dh
            + inv * (0.5 * (lw * g2 + cw * t * p2) * vgg + cw * p1 * vgh + 2 * cw * p1 * f)
        )
        f_new = cw * cw * m22 * t + ratio * (cw * g1) ** 2 * f
        b_new = cw * cw * d4 * t * t + ratio * cw * cw * p * p * b
        return vgh_new, vhh_new, dh_new, b_new, f_new

    def step(carry, inp):
        k, t, lw, ratio, inv, v, d = inp
        new = jax.vmap(lambda c, kk, tt, vv, dd: one(c, kk, tt, lw, ratio, inv, vv, dd))(
            carry, k, t, v, d
        )
        return new, new

    zero = jnp.zeros(kd.shape[1], kd.dtype)
    init = (zero,) * 5
    _, outs = jax.lax.scan(
        step, init, (kd[:-1], td[:-1], lam_w, ratios, inv_prev, vgg[:-1], dg[:-1])
    )
    return tuple(jnp.concatenate([i[None], o]) for i, o in zip(init, outs, strict=True))
