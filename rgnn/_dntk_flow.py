"""The dNTK side of the perturbative flow: PDLT's ``P, Q`` and the ddNTK means ``R, S, T, U``.

The dNTK (PDLT ch. 11) is the derivative of the NTK along the gradient of one output,

.. math::

    \\widehat{dH}_{i_0 i_1 i_2; a_0 a_1 a_2} = \\sum_{\\mu\\nu} \\lambda_{\\mu\\nu}
        \\frac{d z_{i_0; a_0}}{d\\theta_\\mu} \\frac{d \\hat H_{i_1 i_2; a_1 a_2}}{d\\theta_\\nu},

the first correction to the kernel picture of training. Its mean vanishes (it is odd in the
preactivations); at O(1/n) its statistics are the cross-correlation with one preactivation,

.. math::

    E\\big[\\widehat{dH}^{(l)}_{i_0 i_1 i_2; a_0 a_1 a_2} z^{(l)}_{i_3; a_3}\\big]
    = \\frac{1}{n_{l-1}} \\big[\\delta_{i_0 i_3} \\delta_{i_1 i_2} P_{a_0 a_1 a_2 a_3}
        + \\delta_{i_0 i_1} \\delta_{i_2 i_3} Q_{a_0 a_1 a_2 a_3}
        + \\delta_{i_0 i_2} \\delta_{i_1 i_3} Q_{a_0 a_2 a_1 a_3}\\big] .

Derivation (conditional averages, as in :mod:`rgnn._ntk_flow`; ``n = n_l``, ``m = n_{l-1}``,
``s_{ja} = sigma(z^{(l)}_{ja})``, ``W = W^{(l+1)}``). Splitting the parameters into those of
layer ``l+1`` (learning rate ``lambda_W / n`` for the weights; the biases do not enter
``dH``) and the lower ones gives

.. math::

    \\widehat{dH}^{(l+1)}_{i_0 i_1 i_2} =
      \\frac{\\lambda_W}{n} \\Big[\\delta_{i_0 i_1} \\sum_{jk} s_{j0} s'_{j1} W_{i_2 k} s'_{k2}
        H_{jk;12} + (1 \\leftrightarrow 2)\\Big]
      + \\delta_{i_1 i_2} \\frac{\\lambda_W}{n} \\sum_{j_0 j} W_{i_0 j_0} s'_{j_0 0}
        \\big[s'_{j1} s_{j2} H_{j_0 j;01} + s_{j1} s'_{j2} H_{j_0 j;02}\\big]
      + \\sum_{j_0 j_1 j_2} W_{i_0 j_0} W_{i_1 j_1} W_{i_2 j_2} s'_{j_0 0}
        \\big[s''_{j_1 1} s'_{j_2 2} H_{j_0 j_1;01} H_{j_1 j_2;12}
        + s'_{j_1 1} s''_{j_2 2} H_{j_0 j_2;02} H_{j_1 j_2;12}
        + s'_{j_1 1} s'_{j_2 2} \\widehat{dH}^{(l)}_{j_0 j_1 j_2}\\big]

(input labels ``0..3`` stand for ``a_0..a_3``). Multiply by
``z_{i_3; 3} = b_{i_3} + sum_k W_{i_3 k} s_{k3}`` and average over ``W`` (Gaussian moments of
up to four entries), then over layer ``l``. Sums over one neuron give Gaussian averages
``<.>`` under ``K^{(l)}``; sums over two different neurons pick up, at the same order, the
O(1/m) correlations of layer ``l``: ``E[H_{jk;xy} f(z_j) g(z_k)] = (1/m) sum_cd F_{xy;cd}
<d_c f><d_d g>`` (``F`` of :mod:`rgnn._ntk_flow`), ``E[H_{jk;x_1y_1} H_{jk;x_2y_2} f g] =
B_{x_1 x_2 y_1 y_2} <f><g> / m`` and, by the same Stein argument,
``E[dH_{j_0 j_1 j_2} f(z)] = sum_{kc} E[dH_{j_0 j_1 j_2} z_{kc}] <d_{kc} f>``. Everything else
(three-neuron correlations, fluctuations of diagonal entries times off-diagonal ones) is
O(1/m^2). With ``r = n_l / n_{l-1}``, ``Theta = Theta^{(l)}`` and ``D_c(f) = <d_c f>``:

.. math::

    P'_{0123} &= \\lambda_W C_W \\big[\\langle s'_0 s_3 s'_1 s_2\\rangle \\Theta_{01}
        + \\langle s'_0 s_3 s_1 s'_2\\rangle \\Theta_{02}\\big]
      + C_W^2 \\Theta_{12} \\big[\\langle s'_0 s_3 s''_1 s'_2\\rangle \\Theta_{01}
        + \\langle s'_0 s_3 s'_1 s''_2\\rangle \\Theta_{02}\\big] \\\\
      &+ r \\sum_{cd} D_c(s'_0 s_3) \\big[F_{01;cd} D_d(\\lambda_W C_W s'_1 s_2
        + C_W^2 \\Theta_{12} s''_1 s'_2)
        + F_{02;cd} D_d(\\lambda_W C_W s_1 s'_2 + C_W^2 \\Theta_{12} s'_1 s''_2)\\big]
      + r C_W^2 \\langle s'_1 s'_2\\rangle \\sum_c P_{012c} D_c(s'_0 s_3), \\\\
    Q'_{0123} &= \\lambda_W C_W \\langle s_0 s'_1 s'_2 s_3\\rangle \\Theta_{12}
      + C_W^2 \\Theta_{12} \\big[\\langle s'_0 s''_1 s'_2 s_3\\rangle \\Theta_{01}
        + \\langle s'_0 s'_1 s''_2 s_3\\rangle \\Theta_{02}\\big] \\\\
      &+ r \\sum_{cd} F_{12;cd} D_c(\\lambda_W C_W s_0 s'_1 + C_W^2 \\Theta_{01} s'_0 s''_1)
        D_d(s'_2 s_3)
      + r C_W^2 \\langle s'_0 s'_1\\rangle \\big[B_{0122} \\langle s''_2 s_3\\rangle
        + \\sum_c Q_{012c} D_c(s'_2 s_3)\\big],

with ``P^{(1)} = Q^{(1)} = 0`` (the first layer's NTK does not depend on the parameters).
``F`` and ``B`` are carried along on all components of the pair:
``F'_{xy;cd} = C_W^2 <s'_x s_c s'_y s_d> Theta_xy + r C_W^2 sum_ef D_e(s'_x s_c) F_{xy;ef}
D_f(s'_y s_d)`` and ``B'_{xyzw} = C_W^2 <s'_x s'_y s'_z s'_w> Theta_xz Theta_yw
+ r C_W^2 <s'_x s'_y><s'_z s'_w> B_{xyzw}`` (as in :mod:`rgnn._ntk_flow`).

Gaussian expectations. Smooth activations: the 2-D quadrature grid of :mod:`rgnn.gaussian`,
derivatives of sigma (to third order) by autodiff, ``D_c`` by the product rule. Scale-invariant
class (relu, leaky relu, linear): exactly. Every product of ``sigma``, ``sigma'`` and powers of
``z`` on one variable is ``z^p`` times a step (``1`` for ``z > 0``, ``a^k`` below), integrated in
polar coordinates as for the vertex; ``sigma'' = (1 - a) delta(z)`` and, as the limit of smooth
activations, ``sigma'' sigma'^k = (1 - a^(k+1)) / (k+1) delta(z)``; ``D_c`` by Gaussian
integration by parts, ``<d_c f> = sum_u (K^{-1})_{cu} <z_u f>``. The delta terms are the
*distributional* derivative: the expected change of the NTK in a small gradient step includes
units whose preactivation crosses the kink. Autodiff of a relu network (``relu'' = 0`` almost
everywhere) gives the pointwise derivative instead, which drops them;
``kinks="pointwise"`` returns that one (the two agree for smooth activations and differ only
for a scale-invariant activation that is not linear).
The ddNTKs (PDLT ch. infinity) are the next order of the Taylor expansion of training: with
``g_x`` the learning-rate-weighted gradient of ``z_x`` (``g_x = Lambda grad z_x``),

.. math::

    ddI_{i_0 i_1 i_2 i_3} = D^3 z_{i_0}[g_{i_1}, g_{i_2}, g_{i_3}], \\qquad
    ddII_{i_1 i_2 i_3 i_4} = g_{i_3}^T\\, \\mathrm{Hess}(z_{i_1})\\, \\Lambda\\,
        \\mathrm{Hess}(z_{i_2})\\, g_{i_4},

so that the second derivative of the NTK along two gradients is
``D^2 H_{23}[g_0, g_1] = ddI_{2013} + ddI_{3012} + ddII_{2301} + ddII_{2310}``. Their means are
O(1/n), ``E[ddI_{i0i1i2i3}] = (d_{i0i1} d_{i2i3} R_{0123} + d_{i0i2} d_{i3i1} R_{0231}
+ d_{i0i3} d_{i1i2} R_{0312}) / n_{l-1}`` and ``E[ddII_{i1i2i3i4}] = (d_{i1i2} d_{i3i4} S_{1234}
+ d_{i1i3} d_{i2i4} T_{1342} + d_{i1i4} d_{i2i3} U_{1423}) / n_{l-1}`` (``R`` is symmetric in its
last two inputs, ``S_{1234} = S_{2143}``, ``T_{1342} = T_{2431}``, ``U_{1423} = U_{2314}``).

Derivation, by the same conditional averages. Write the Hessian-form dNTK
``dH^_{j_0; j_1 j_2} = Hess(z_{j_0})[g_{j_1}, g_{j_2}]`` (the dNTK above is
``dH_{0;12} = dH^_{1;02} + dH^_{2;01}``) and its correlators with one preactivation,
``E[dH^_{j_0;j_1j_2} z_{j_3}] = (d_{j_0j_3} d_{j_1j_2} P^_{0123} + d_{j_0j_1} d_{j_2j_3} Q^_{0123}
+ d_{j_0j_2} d_{j_1j_3} Q^_{0213}) / n_{l-1}``, so that ``P_{0123} = Q^_{1203} + Q^_{2103}`` and
``Q_{0123} = Q^_{1023} + P^_{2013}`` (checked to rounding by the tests). The gradient of
``z^{(l+1)}_i`` has the layer-``(l+1)`` part (``lambda_b`` on ``b_i``, ``lambda_W s_j / n`` on
``W_ij``) and ``sum_j W_ij s'_j g_j``; its Hessian couples ``W_ij`` to the lower parameters by
``s'_j grad z_j`` and is ``sum_j W_ij (s''_j grad z_j grad z_j + s'_j Hess z_j)`` on the lower
ones; the third derivative likewise. Insert, average over ``W^{(l+1)}`` (an odd number of
entries of one row averages to zero: this makes ``E[dH^_{j;jk} H_{jk}] = E[dH^_{k;jj} H_{jk}]
= 0`` for ``j != k`` exactly, which removes every term that would need them), then over layer
``l`` as for ``P, Q`` (two different neurons meet through ``F``, ``B`` and ``P^, Q^``; the
diagonal NTK is ``Theta`` at this order). Inputs ``0..3`` stand for the four slots; ``D_e(f) =
<d_e f>``; ``<.>`` under ``K^{(l)}``; ``r = n_l / n_{l-1}``:

.. math::

    P^'_{0123} &= C_W^2 \\big[\\Theta_{01}\\Theta_{02} \\langle s''_0 s_3 s'_1 s'_2\\rangle
        + r B_{0012} \\langle s''_0 s_3\\rangle \\langle s'_1 s'_2\\rangle
        + r \\langle s'_1 s'_2\\rangle \\textstyle\\sum_e P^_{012e} D_e(s'_0 s_3)\\big] \\\\
    Q^'_{0123} &= \\lambda_W C_W \\big[\\Theta_{02} \\langle s'_0 s_1 s'_2 s_3\\rangle
        + r \\textstyle\\sum_{ef} F_{02;ef} D_e(s'_0 s_1) D_f(s'_2 s_3)\\big]
      + C_W^2 \\big[\\Theta_{01}\\Theta_{02} \\langle s''_0 s'_1 s'_2 s_3\\rangle
        + r \\Theta_{01} \\textstyle\\sum_{ef} F_{02;ef} D_e(s''_0 s'_1) D_f(s'_2 s_3)
        + r \\langle s'_0 s'_1\\rangle \\sum_e Q^_{012e} D_e(s'_2 s_3)\\big] \\\\
    R'_{0123} &= \\lambda_W C_W \\big[\\Theta_{02}\\Theta_{03} \\langle s''_0 s_1 s'_2 s'_3\\rangle
        + r \\langle s'_2 s'_3\\rangle \\big(B_{0023} \\langle s''_0 s_1\\rangle
        + \\textstyle\\sum_e P^_{023e} D_e(s'_0 s_1)\\big)\\big] \\\\
      &+ C_W^2 \\big[\\Theta_{01}\\Theta_{02}\\Theta_{03} \\langle s'''_0 s'_1 s'_2 s'_3\\rangle
        + r \\langle s'_2 s'_3\\rangle \\big(\\Theta_{01} B_{0023} \\langle s'''_0 s'_1\\rangle
        + \\Theta_{01} \\textstyle\\sum_e P^_{023e} D_e(s''_0 s'_1)
        + \\langle s'_0 s'_1\\rangle R_{0123}\\big)\\big] \\\\
    S'_{1234} &= \\lambda_W C_W \\big[\\Theta_{13}\\Theta_{24} \\langle s'_1 s'_2 s'_3 s'_4\\rangle
        + r B_{1234} \\langle s'_1 s'_2\\rangle \\langle s'_3 s'_4\\rangle\\big]
      + C_W^2 \\big[\\Theta_{12}\\Theta_{13}\\Theta_{24} \\langle s''_1 s''_2 s'_3 s'_4\\rangle
        + r \\langle s'_3 s'_4\\rangle \\big(\\Theta_{12} B_{1234} \\langle s''_1 s''_2\\rangle
        + \\langle s'_1 s'_2\\rangle S_{1234}\\big)\\big] \\\\
    T'_{1342} &= \\lambda_W^2 \\big[\\Theta_{12} \\langle s'_1 s_3 s'_2 s_4\\rangle
        + r \\mathcal F(s'_1 s_3, s'_2 s_4)\\big]
      + \\lambda_W C_W \\big[\\Theta_{12}\\Theta_{24} \\langle s'_1 s_3 s''_2 s'_4\\rangle
        + \\Theta_{12}\\Theta_{13} \\langle s''_1 s'_3 s'_2 s_4\\rangle
        + r \\Theta_{24} \\mathcal F(s'_1 s_3, s''_2 s'_4)
        + r \\Theta_{13} \\mathcal F(s''_1 s'_3, s'_2 s_4) \\\\
      &\\qquad + r \\langle s'_2 s'_4\\rangle \\textstyle\\sum_e Q^_{241e} D_e(s'_1 s_3)
        + r \\langle s'_1 s'_3\\rangle \\sum_e Q^_{132e} D_e(s'_2 s_4)\\big]
      + C_W^2 \\big[\\Theta_{12}\\Theta_{13}\\Theta_{24} \\langle s''_1 s'_3 s''_2 s'_4\\rangle
        + r \\Theta_{13}\\Theta_{24} \\mathcal F(s''_1 s'_3, s''_2 s'_4) \\\\
      &\\qquad + r \\Theta_{13} \\langle s'_2 s'_4\\rangle \\textstyle\\sum_e Q^_{241e}
        D_e(s''_1 s'_3) + r \\Theta_{24} \\langle s'_1 s'_3\\rangle \\sum_e Q^_{132e}
        D_e(s''_2 s'_4)
        + r \\langle s'_1 s'_3\\rangle \\langle s'_2 s'_4\\rangle T_{1342}\\big] \\\\
    U'_{1423} &= C_W^2 \\big[\\Theta_{12}\\Theta_{13}\\Theta_{24}
        \\langle s''_1 s''_2 s'_3 s'_4\\rangle
        + r \\langle s'_1 s'_4\\rangle \\langle s'_2 s'_3\\rangle U_{1423}\\big],

with ``F(f, g) = sum_ef F_{12;ef} D_e(f) D_f(g)`` (``f`` on the neuron of input 1, ``g`` on
that of input 2) and every tensor zero on layer 1. The biases' learning rate never enters (a
bias has no second derivative). For the scale-invariant class the terms with ``sigma''`` or
``sigma'''`` are products of delta functions at the kink (``delta(z)^2`` on one input), so
the ddNTK exists there only with ``kinks="pointwise"``, where they vanish (for a linear
network they vanish identically).
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from rgnn import gaussian
from rgnn._ntk_flow import ARC_NODES, _angular_grid, _cholesky2, _derivatives, _slope
from rgnn.activations import Activation

KINKS = ("distributional", "pointwise")

_SIG, _D1, _D2, _D3 = 0, 1, 2, 3
_IDX = tuple(np.ndindex(2, 2, 2, 2))


def _abs_moment(p: int) -> float:
    """``E|xi|^p`` for ``xi ~ N(0, 1)``."""
    return 2 ** (p / 2) * math.gamma((p + 1) / 2) / math.sqrt(math.pi)


class _Smooth:
    """Gaussian expectations of products of ``sigma^(k)(z_v)`` on the quadrature grid."""

    def __init__(self, act: Activation, k, order: int):
        s1, c, s2 = _cholesky2(k)
        x, w = gaussian.hermite_rule(order, jnp.result_type(k))
        ds = _derivatives(act.fn, 3)
        u = s1 * x
        v = c * x[:, None] + s2 * x[None, :]
        self.fu = [d(u) for d in ds]
        self.fv = [d(v) for d in ds]
        self.w = w
        self.cache: dict = {}

    def e(self, factors):
        key = tuple(sorted(factors))
        if key not in self.cache:
            fu = jnp.ones_like(self.w)
            fv = None
            for var, order in key:
                if var == 0:
                    fu = fu * self.fu[order]
                else:
                    fv = self.fv[order] if fv is None else fv * self.fv[order]
            # factors of z_0 alone (every single-input expectation) need only the 1-D rule
            inner = 1.0 if fv is None else fv @ self.w
            self.cache[key] = jnp.sum(self.w * fu * inner)
        return self.cache[key]

    def d(self, c: int, factors):
        out = 0.0
        for i, (var, order) in enumerate(factors):
            if var == c:
                out = out + self.e(factors[:i] + ((var, order + 1),) + factors[i + 1 :])
        return out


class _Homogeneous:
    """The same expectations, exactly, for ``sigma(z) = z (z > 0), a z (z < 0)``."""

    def __init__(self, slope: float, k, single: bool, pointwise: bool, nodes: int = ARC_NODES):
        self.slope = slope
        self.k = k
        self.single = single
        self.pointwise = pointwise
        self.u, self.v, self.aw = _angular_grid(*_cholesky2(k), nodes)
        if not single:
            det = k[0] * k[2] - k[1] * k[1]
            self.inv = jnp.stack([jnp.stack([k[2], -k[1]]), jnp.stack([-k[1], k[0]])]) / det
        self.cache: dict = {}

    def _canon(self, orders, zpow: int):
        """One variable's factor as ``("pw", p, c_plus, c_minus)``, ``("delta", coeff)`` or
        ``None`` (identically zero)."""
        n0, n1, n2 = (sum(1 for o in orders if o == j) for j in range(3))
        if (self.pointwise or self.slope == 1.0) and any(o >= 2 for o in orders):
            return None
        if any(o > 2 for o in orders) or n2 > 1:
            raise NotImplementedError("only one second derivative per variable is supported")
        a = self.slope
        if n2 == 0:
            return ("pw", n0 + zpow, 1.0, a ** (n0 + n1))
        if self.pointwise or n0 + zpow > 0:
            return None
        return ("delta", (1 - a ** (n1 + 1)) / (n1 + 1))

    def _one_dim(self, f, var_k):
        """``E f(z)`` for ``z ~ N(0, var_k)`` and one canonical factor ``f``."""
        if f[0] == "delta":
            return f[1] / jnp.sqrt(2 * jnp.pi * var_k)
        _, p, cp, cm = f
        return var_k ** (p / 2) * _abs_moment(p) * (cp + (-1) ** p * cm) / 2

    def e(self, factors, zpow=(0, 0)):
        key = (tuple(sorted(factors)), zpow)
        if key in self.cache:
            return self.cache[key]
        fs = [self._canon([o for v, o in factors if v == var], zpow[var]) for var in range(2)]
        trivial = [f is not None and f[0] == "pw" and f[1:] == (0, 1.0, 1.0) for f in fs]
        k = self.k
        if fs[0] is None or fs[1] is None:
            out = jnp.zeros((), k.dtype)
        elif trivial[1]:
            out = self._one_dim(fs[0], k[0])
        elif trivial[0]:
            out = self._one_dim(fs[1], k[2])
        elif fs[0][0] == "pw" and fs[1][0] == "pw":
            _, pu, cpu, cmu = fs[0]
            _, pv, cpv, cmv = fs[1]
            p = pu + pv
            radial = 2 ** (p / 2) * math.gamma(p / 2 + 1)
            fu = self.u**pu * jnp.where(self.u > 0, cpu, cmu)
            fv = self.v**pv * jnp.where(self.v > 0, cpv, cmv)
            out = radial * jnp.sum(self.aw * fu * fv)
        elif fs[0][0] == "delta" and fs[1][0] == "pw":
            # z_1 given z_0 = 0 is N(0, K_11 - K_01^2 / K_00)
            out = (
                self._one_dim(fs[1], k[2] - k[1] ** 2 / k[0])
                * fs[0][1]
                / jnp.sqrt(2 * jnp.pi * k[0])
            )
        elif fs[1][0] == "delta" and fs[0][0] == "pw":
            out = (
                self._one_dim(fs[0], k[0] - k[1] ** 2 / k[2])
                * fs[1][1]
                / jnp.sqrt(2 * jnp.pi * k[2])
            )
        else:
            raise NotImplementedError("a second derivative on both variables is not supported")
        self.cache[key] = out
        return out

    def d(self, c: int, factors):
        if self.single:
            return self.e(factors, (1, 0)) / self.k[0]
        return sum(self.inv[c, u] * self.e(factors, (1, 0) if u == 0 else (0, 1)) for u in range(2))


def _engine(act: Activation, k, order: int, single: bool, pointwise: bool):
    if act.scale_invariant:
        return _Homogeneous(_slope(act), k, single, pointwise)
    return _Smooth(act, k, order)


def _step(act, cw, lw, ratio, k, t, p, q, f, b, dd_in=None, *, order, single, pointwise):
    """One layer of the recursion on one pair (or one input when ``single``).

    ``k = (K_00, K_01, K_11)``; ``t [2, 2]`` the NTK on the pair; ``p, q, b [2,2,2,2]``;
    ``f [2,2,2,2]`` with ``f[x, y, c, d] = F_{xy;cd}``. Returns the next ``(p, q, f, b)``,
    followed by the next ``(P^, Q^, R, S, T, U)`` when ``dd_in`` holds the current ones (the
    ddNTK recursions).
    """
    en = _engine(act, k, order, single, pointwise)
    var = (0,) if single else (0, 1)
    idx = [i for i in _IDX if all(j in var for j in i)]

    def e(*fac):
        return en.e(tuple(fac))

    def dd(c, *fac):
        return en.d(c, tuple(fac))

    def comp(build):
        out = jnp.zeros((2, 2, 2, 2), k.dtype)
        for i in idx:
            out = out.at[i].set(build(*i))
        return out

    def p_new(a0, a1, a2, a3):
        src = lw * cw * (
            e((a0, _D1), (a3, _SIG), (a1, _D1), (a2, _SIG)) * t[a0, a1]
            + e((a0, _D1), (a3, _SIG), (a1, _SIG), (a2, _D1)) * t[a0, a2]
        ) + cw * cw * t[a1, a2] * (
            e((a0, _D1), (a3, _SIG), (a1, _D2), (a2, _D1)) * t[a0, a1]
            + e((a0, _D1), (a3, _SIG), (a1, _D1), (a2, _D2)) * t[a0, a2]
        )
        prop = 0.0
        for c in var:
            lead = dd(c, (a0, _D1), (a3, _SIG))
            for d in var:
                g1 = lw * cw * dd(d, (a1, _D1), (a2, _SIG)) + cw * cw * t[a1, a2] * dd(
                    d, (a1, _D2), (a2, _D1)
                )
                g2 = lw * cw * dd(d, (a1, _SIG), (a2, _D1)) + cw * cw * t[a1, a2] * dd(
                    d, (a1, _D1), (a2, _D2)
                )
                prop = prop + lead * (f[a0, a1, c, d] * g1 + f[a0, a2, c, d] * g2)
            prop = prop + cw * cw * e((a1, _D1), (a2, _D1)) * p[a0, a1, a2, c] * lead
        return src + ratio * prop

    def q_new(a0, a1, a2, a3):
        src = lw * cw * e((a0, _SIG), (a1, _D1), (a2, _D1), (a3, _SIG)) * t[a1, a2] + (
            cw * cw * t[a1, a2]
        ) * (
            e((a0, _D1), (a1, _D2), (a2, _D1), (a3, _SIG)) * t[a0, a1]
            + e((a0, _D1), (a1, _D1), (a2, _D2), (a3, _SIG)) * t[a0, a2]
        )
        s01 = e((a0, _D1), (a1, _D1))
        prop = cw * cw * s01 * b[a0, a1, a2, a2] * e((a2, _D2), (a3, _SIG))
        for c in var:
            tail = dd(c, (a2, _D1), (a3, _SIG))
            prop = prop + cw * cw * s01 * q[a0, a1, a2, c] * tail
            for d in var:
                head = lw * cw * dd(d, (a0, _SIG), (a1, _D1)) + cw * cw * t[a0, a1] * dd(
                    d, (a0, _D1), (a1, _D2)
                )
                prop = prop + f[a1, a2, d, c] * head * tail
        return src + ratio * prop

    def f_new(x, y, c, d):
        prop = 0.0
        for e1 in var:
            for f1 in var:
                prop = prop + dd(e1, (x, _D1), (c, _SIG)) * f[x, y, e1, f1] * dd(
                    f1, (y, _D1), (d, _SIG)
                )
        return cw * cw * (e((x, _D1), (c, _SIG), (y, _D1), (d, _SIG)) * t[x, y] + ratio * prop)

    def b_new(x, y, z, w):
        return (
            cw
            * cw
            * (
                e((x, _D1), (y, _D1), (z, _D1), (w, _D1)) * t[x, z] * t[y, w]
                + ratio * e((x, _D1), (y, _D1)) * e((z, _D1), (w, _D1)) * b[x, y, z, w]
            )
        )

    out = (comp(p_new), comp(q_new), comp(f_new), comp(b_new))
    if dd_in is None:
        return out
    ph, qh, r, s, tt, u = dd_in

    def ph_new(a, b_, c, d):
        src = e((a, _D2), (d, _SIG), (b_, _D1), (c, _D1)) * t[a, b_] * t[a, c]
        prop = b[a, a, b_, c] * e((a, _D2), (d, _SIG)) * e((b_, _D1), (c, _D1))
        for g in var:
            prop = prop + e((b_, _D1), (c, _D1)) * ph[a, b_, c, g] * dd(g, (a, _D1), (d, _SIG))
        return cw * cw * (src + ratio * prop)

    def qh_new(a, b_, c, d):
        ff = sum(
            f[a, c, g, h] * dd(g, (a, _D1), (b_, _SIG)) * dd(h, (c, _D1), (d, _SIG))
            for g in var
            for h in var
        )
        ff2 = sum(
            f[a, c, g, h] * dd(g, (a, _D2), (b_, _D1)) * dd(h, (c, _D1), (d, _SIG))
            for g in var
            for h in var
        )
        qq = sum(qh[a, b_, c, g] * dd(g, (c, _D1), (d, _SIG)) for g in var)
        return lw * cw * (
            e((a, _D1), (b_, _SIG), (c, _D1), (d, _SIG)) * t[a, c] + ratio * ff
        ) + cw * cw * (
            e((a, _D2), (b_, _D1), (c, _D1), (d, _SIG)) * t[a, b_] * t[a, c]
            + ratio * (t[a, b_] * ff2 + e((a, _D1), (b_, _D1)) * qq)
        )

    def r_new(a, b_, c, d):
        scd = e((c, _D1), (d, _D1))
        pp1 = sum(ph[a, c, d, g] * dd(g, (a, _D1), (b_, _SIG)) for g in var)
        pp2 = sum(ph[a, c, d, g] * dd(g, (a, _D2), (b_, _D1)) for g in var)
        lam = e((a, _D2), (b_, _SIG), (c, _D1), (d, _D1)) * t[a, c] * t[a, d] + ratio * scd * (
            b[a, a, c, d] * e((a, _D2), (b_, _SIG)) + pp1
        )
        cc = e((a, _D3), (b_, _D1), (c, _D1), (d, _D1)) * t[a, b_] * t[a, c] * t[a, d]
        cc = cc + ratio * scd * (
            t[a, b_] * b[a, a, c, d] * e((a, _D3), (b_, _D1))
            + t[a, b_] * pp2
            + e((a, _D1), (b_, _D1)) * r[a, b_, c, d]
        )
        return lw * cw * lam + cw * cw * cc

    def s_new(a, b_, c, d):
        sab, scd = e((a, _D1), (b_, _D1)), e((c, _D1), (d, _D1))
        lam = (
            e((a, _D1), (b_, _D1), (c, _D1), (d, _D1)) * t[a, c] * t[b_, d]
            + ratio * b[a, b_, c, d] * sab * scd
        )
        cc = e((a, _D2), (b_, _D2), (c, _D1), (d, _D1)) * t[a, b_] * t[a, c] * t[b_, d]
        cc = cc + ratio * (
            t[a, b_] * b[a, b_, c, d] * e((a, _D2), (b_, _D2)) * scd + sab * scd * s[a, b_, c, d]
        )
        return lw * cw * lam + cw * cw * cc

    def t_new(a, b_, c, d):
        # T_{abcd} = T_{1342}: inputs 1 = a, 3 = b, 4 = c, 2 = d
        def fsum(x1, x2):
            return sum(f[a, d, g, h] * dd(g, *x1) * dd(h, *x2) for g in var for h in var)

        sab, sdc = e((a, _D1), (b_, _D1)), e((d, _D1), (c, _D1))
        q1 = sum(qh[d, c, a, g] * dd(g, (a, _D1), (b_, _SIG)) for g in var)
        q2 = sum(qh[a, b_, d, g] * dd(g, (d, _D1), (c, _SIG)) for g in var)
        q1b = sum(qh[d, c, a, g] * dd(g, (a, _D2), (b_, _D1)) for g in var)
        q2b = sum(qh[a, b_, d, g] * dd(g, (d, _D2), (c, _D1)) for g in var)
        ll = e((a, _D1), (b_, _SIG), (d, _D1), (c, _SIG)) * t[a, d] + ratio * fsum(
            ((a, _D1), (b_, _SIG)), ((d, _D1), (c, _SIG))
        )
        lc = (
            e((a, _D1), (b_, _SIG), (d, _D2), (c, _D1)) * t[a, d] * t[d, c]
            + e((a, _D2), (b_, _D1), (d, _D1), (c, _SIG)) * t[a, d] * t[a, b_]
            + ratio
            * (
                t[d, c] * fsum(((a, _D1), (b_, _SIG)), ((d, _D2), (c, _D1)))
                + t[a, b_] * fsum(((a, _D2), (b_, _D1)), ((d, _D1), (c, _SIG)))
                + sdc * q1
                + sab * q2
            )
        )
        cc = e((a, _D2), (b_, _D1), (d, _D2), (c, _D1)) * t[a, d] * t[a, b_] * t[d, c]
        cc = cc + ratio * (
            t[a, b_] * t[d, c] * fsum(((a, _D2), (b_, _D1)), ((d, _D2), (c, _D1)))
            + t[a, b_] * sdc * q1b
            + t[d, c] * sab * q2b
            + sab * sdc * tt[a, b_, c, d]
        )
        return lw * lw * ll + lw * cw * lc + cw * cw * cc

    def u_new(a, b_, c, d):
        # U_{abcd} = U_{1423}: inputs 1 = a, 4 = b, 2 = c, 3 = d
        src = e((a, _D2), (c, _D2), (d, _D1), (b_, _D1)) * t[a, c] * t[a, d] * t[c, b_]
        prop = e((a, _D1), (b_, _D1)) * e((c, _D1), (d, _D1)) * u[a, b_, c, d]
        return cw * cw * (src + ratio * prop)

    return out + tuple(comp(fn) for fn in (ph_new, qh_new, r_new, s_new, t_new, u_new))


@partial(jax.jit, static_argnames=("act", "order", "single", "pointwise", "dd"))
def dntk_flow(act, cw, lam_w, ks, ts, ratios, *, order, single, pointwise, dd=False):
    """``P`` and ``Q`` (and with ``dd`` the ddNTK means) over layers for a batch of pairs (or
    single inputs).

    Args:
      ks: ``[L+1, B, 3]`` the leading-order kernel on ``(00, 01, 11)``.
      ts: ``[L+1, B, 3]`` the leading-order NTK, same layout.
      lam_w: ``[L]`` ``lambda_W`` of layer ``l+1`` for the step ``l -> l+1``.
      ratios: ``[L]`` ``n_l / n_{l-1}``.
      dd: also run the ddNTK recursions.
    Returns:
      ``(p, q)``, each ``[L+1, B, 2, 2, 2, 2]`` (``[..., a0, a1, a2, a3]``, inputs as pair
      slots 0, 1; when ``single`` only the all-zero slot is filled); with ``dd`` followed by
      ``(P^, Q^, R, S, T, U)`` in the same layout.
    """

    def one(carry, k, t3, lw, ratio):
        p, q, f, b = carry[:4]
        t = jnp.stack([jnp.stack([t3[0], t3[1]]), jnp.stack([t3[1], t3[2]])])
        return _step(
            act,
            cw,
            lw,
            ratio,
            k,
            t,
            p,
            q,
            f,
            b,
            carry[4:] if dd else None,
            order=order,
            single=single,
            pointwise=pointwise,
        )

    keep = (0, 1, 4, 5, 6, 7, 8, 9) if dd else (0, 1)

    def step(carry, inp):
        k, t, lw, ratio = inp
        new = jax.vmap(lambda c, kk, tt: one(c, kk, tt, lw, ratio))(carry, k, t)
        return new, tuple(new[i] for i in keep)

    nb = ks.shape[1]
    zero = jnp.zeros((nb, 2, 2, 2, 2), ks.dtype)
    init = (zero,) * (10 if dd else 4)
    _, outs = jax.lax.scan(step, init, (ks[:-1], ts[:-1], lam_w, ratios))
    return tuple(jnp.concatenate([zero[None], o]) for o in outs)
