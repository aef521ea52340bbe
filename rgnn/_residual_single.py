"""The O(1/n) flow of a residual MLP on one input, for any activation (derived here).

Why the vertex alone does not close. In a plain MLP the weights ``W`` of a layer are
invariant under rotations of its units, so the preactivations' joint distribution is too, and
every correlation between two units at O(1/n) is carried by the vertex:
``Cov(f(z_i), g(z_k)) = (1/4n) sum V <d d f><d d g>`` for ``i != k``. A residual layer
``z' = gamma z + xi h`` adds ``z`` itself, which rotates with the units of the layer below while
``sigma(z)`` does not: only permutations of units remain a symmetry, and the correlation of two
units is a general bilinear form in the two functions. Here it is carried in full on one input.

Statistics (``n`` the common hidden width; functions of one unit's preactivation ``z``):

* ``B^{(l)}(f, g) = n Cov(f(z_i), g(z_k))``, ``i != k``: a bilinear form, held as a matrix on
  a uniform grid of ``z`` (``B(f, g) = f^T B g``);
* ``d^{(l)}(f) = n (E f(z_i) - <f>_{K^{(l)}})``: the O(1/n) shift of one unit's marginal.

``V = B(z^2, z^2)``, the mean-kernel shift is ``d(z^2) / n`` and the excess kurtosis
``(d(z^4) - 6 K d(z^2)) / (n K^2)``. ``B^{(1)} = 0``, ``d^{(1)} = 0``.

Recursion. Given layer ``l``, ``z'_i = gamma z_i + xi h_i`` with ``h_i ~ N(0, G)`` independent
over units, ``G = C_b + (C_W/n) sum_j s(z_j)^2`` (``s = sigma``). Write
``(T f)(z) = E_u f(gamma z + xi sqrt(Gbar) u)`` with ``Gbar = C_b + C_W <s^2>_K`` (a Gaussian
smoothing), ``T_G f`` and ``T_GG f`` its first and second derivatives in ``G``,
``a(f) = <T_G f>_K``, ``Sigma = C_0 + B`` with ``C_0(f, g) = <f g> - <f><g>`` (one unit's own
Gaussian covariance) and ``q = s^2``. Then ``E[f(z'_i) | layer l] = (T f)(z_i)`` at ``G``, and
expanding ``G = Gbar + delta G`` to second order (``n Var(G) = C_W^2 Sigma(q, q)``,
``n Cov(F(z_i), G) = C_W Sigma(F, q)``, the unit ``i`` itself and the others):

.. math::

    B'(f, g) &= B(Tf, Tg) + C_W \\big[a(g)\\, \\Sigma(Tf, q) + a(f)\\, \\Sigma(q, Tg)\\big]
        + C_W^2 a(f) a(g)\\, \\Sigma(q, q), \\\\
    d'(f) &= d(Tf) + C_W\\, d(q)\\, a(f) + C_W \\Sigma(T_G f, q)
        + \\tfrac12 C_W^2 \\langle T_{GG} f\\rangle_K \\Sigma(q, q) .

A plain layer (``gamma = 0, xi = 1``) has ``T f = <f>_{Gbar}``, a constant, and this reduces to
PDLT's recursions (``B'(f, g) = C_W^2 a(f) a(g) Sigma(q, q)`` with ``a(f) = <f''>/2``): the
tests compare the two. On the grid, ``T`` is the matrix of the Gaussian kernel
``phi((y - gamma z) / sqrt(v)) / sqrt(v)``, ``v = xi^2 Gbar`` (trapezoid weights), ``T_G`` and
``T_GG`` its exact derivatives ``xi^2 d/dv`` and ``xi^4 d^2/dv^2`` (Hermite factors
``(u - 1)/(2v)`` and ``(u^2 - 6u + 3)/(4v^2)``, ``u = (y - gamma z)^2 / v``). NumPy, float64.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from rgnn.architecture import MLP


@dataclasses.dataclass(frozen=True)
class SingleInput:
    """The O(1/n) statistics of a residual MLP on one input, layer axis first (``[L+1]``).

    Attributes:
      nngp: ``K^{(l)}`` (the fixed point's).
      vertex: ``V^{(l)}_{(aa)(aa)} = n Cov(z_i^2, z_k^2)``, ``i != k``.
      nngp_correction: ``E z^2 - K``, times the width ``n_{l-1}`` (``d(z^2)``).
      kurtosis: the excess kurtosis of one unit, times the width (``(d(z^4) - 6 K d(z^2)) / K^2``).
      coupling: ``V / K^2``, the width times the dimensionless quartic coupling.
    """

    nngp: np.ndarray
    vertex: np.ndarray
    nngp_correction: np.ndarray
    kurtosis: np.ndarray
    coupling: np.ndarray


def single_input_flow(arch: MLP, k1: float, *, points: int = 1201, span: float = 12.0):
    """:class:`SingleInput` of ``arch`` for an input with layer-1 kernel ``k1`` (any activation;
    plain layers included). ``points`` grid nodes on ``[-span, span] x sqrt(max_l K)``."""
    act = arch.act
    cw, cb = arch.weight_var, arch.effective_bias_var
    gamma, xi = arch.residual()
    # leading-order kernels by quadrature on a fine grid (to the grid's accuracy)
    y0 = np.linspace(-span, span, 4001)
    ks = [float(k1)]
    for layer in range(1, arch.n_layers):
        z = y0 * np.sqrt(ks[-1])
        w = np.exp(-0.5 * y0**2)
        w /= w.sum()
        q = float(w @ np.asarray(act.fn(z)) ** 2)
        ks.append(xi[layer] ** 2 * (cb + cw * q) + gamma[layer] ** 2 * ks[-1])
    y = np.linspace(-1.0, 1.0, points) * span * np.sqrt(max(ks))
    h = y[1] - y[0]
    s2 = np.asarray(act.fn(y), np.float64) ** 2
    n_grid = y.size
    b = np.zeros((n_grid, n_grid))
    d = np.zeros(n_grid)
    out_v, out_d, out_k = [0.0], [0.0], [0.0]
    for layer in range(1, arch.n_layers):
        k = ks[layer - 1]
        p = np.exp(-0.5 * y**2 / k)
        p /= p.sum()
        sigma = np.diag(p) - np.outer(p, p) + b
        gbar = cb + cw * float(p @ s2)
        g, x = gamma[layer], xi[layer]
        v = x * x * gbar
        diff = y[None, :] - g * y[:, None]  # [z, y]
        u = diff**2 / v
        kern = h * np.exp(-0.5 * u) / np.sqrt(2 * np.pi * v)
        t = kern
        t_g = x * x * kern * (u - 1) / (2 * v)
        t_gg = x**4 * kern * (u * u - 6 * u + 3) / (4 * v * v)
        a = t_g.T @ p
        sq = sigma @ s2
        qq = float(s2 @ sq)
        tsq = t.T @ sq
        b_new = (
            t.T @ b @ t + cw * (np.outer(tsq, a) + np.outer(a, tsq)) + cw * cw * qq * np.outer(a, a)
        )
        d_new = (
            t.T @ d + cw * float(d @ s2) * a + cw * (t_g.T @ sq) + 0.5 * cw * cw * qq * (t_gg.T @ p)
        )
        b, d = b_new, d_new
        kk = ks[layer]
        y2, y4 = y**2, y**4
        out_v.append(float(y2 @ b @ y2))
        out_d.append(float(d @ y2))
        out_k.append(float((d @ y4 - 6 * kk * (d @ y2)) / kk**2))
    kk = np.asarray(ks)
    vv = np.asarray(out_v)
    return SingleInput(kk, vv, np.asarray(out_d), np.asarray(out_k), vv / kk**2)
