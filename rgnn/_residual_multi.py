"""The O(1/n) kernel side of a nonlinear residual MLP on several inputs (derived here).

Why not the pair rules of :mod:`rgnn.flow.rules`. A residual layer ``z' = gamma z + xi h``
breaks the rotation symmetry among units that lets the vertex carry every two-unit correlation
(:mod:`rgnn._residual_single`, "Why the vertex alone does not close"): the correlation of two
units is a general bilinear form ``B(f, g) = n Cov(f(z_i), g(z_k))``, ``i != k``, in two
functions of one unit's preactivations. :mod:`rgnn._residual_single` carries it on a grid of
``z`` for one input; on ``N`` inputs ``f`` is a function on ``R^N`` and no grid fits. But the
recursion only ever evaluates ``B`` on a finite family of functions, and every term, unrolled,
is a Gaussian moment of at most four variables. Everything below is derived here: PDLT's
appendix on residual learning (appendix B, eq. B.1 and its kernel recursion) gives the
leading-order kernels ``K' = gamma^2 K + xi^2 (C_b + C_W <s s>_K)`` only, and PDLT ch. 4
(eq. 4.90 for the vertex, sec. 4.3 for the subleading kernel) the plain layer, to which this
reduces.

**The recursion on several inputs.** Notation: ``s = sigma``; ``u = (a, b)``, ``a <= b``, an
unordered pair of inputs; ``q_u(z) = s(z_a) s(z_b)``; ``P_u = d_a d_b / (1 + delta_ab)`` (so
that ``<P_u f>_K = d<f>_K / dK_u``, Price's theorem, ``K_u`` one variable per pair);
``Sigma = C_0 + B`` with ``C_0(f, g) = <f g>_K - <f>_K <g>_K``; ``d(f) = n (E f(z_i) -
<f>_K)``. Given layer ``l``, ``z'_i = gamma z_i + xi h_i``, ``h_i ~ N(0, G)`` independent over
units, ``G_u = C_b + (C_W / n) sum_j q_u(z_j)``. With ``(T f)(z) = E f(gamma z + xi v)``,
``v ~ N(0, Gbar)``, ``Gbar_u = C_b + C_W <q_u>_K``, and ``d/dG_u E f(gamma z + xi v) = xi^2
E[(P_u f)(gamma z + xi v)]`` (Price), the conditional mean expands to second order in
``delta G = G - Gbar``:

.. math::

    E[f(z'_i) | l] = (Tf)(z_i) + \\xi^2 \\sum_u (T P_u f)(z_i)\\, \\delta G_u
      + \\tfrac12 \\xi^4 \\sum_{uv} (T P_u P_v f)(z_i)\\, \\delta G_u \\delta G_v ,

and ``n Cov(F(z_i), G_u) = C_W Sigma(F, q_u)`` (the unit itself through ``C_0``, the ``n - 1``
others through ``B``), ``n Cov(G_u, G_v) = C_W^2 Sigma(q_u, q_v)``, ``E delta G_u = C_W
d(q_u) / n``; two different units are independent given layer ``l``. Hence, with
``a_u(f) = xi^2 <P_u f>_{K'}`` (``T`` carries ``N(0, K)`` to ``N(0, K')``),

.. math::

    B'(f, g) &= B(Tf, Tg) + C_W \\sum_u \\big[a_u(g)\\, \\Sigma(Tf, q_u)
        + a_u(f)\\, \\Sigma(q_u, Tg)\\big]
        + C_W^2 \\sum_{uv} a_u(f) a_v(g)\\, \\Sigma(q_u, q_v), \\\\
    d'(f) &= d(Tf) + C_W \\sum_u d(q_u)\\, a_u(f) + C_W \\xi^2 \\sum_u \\Sigma(T P_u f, q_u)
        + \\tfrac12 C_W^2 \\xi^4 \\sum_{uv} \\langle P_u P_v f\\rangle_{K'} \\Sigma(q_u, q_v),

:mod:`rgnn._residual_single`'s recursion with the pair index ``u`` (one input: ``P = d^2 / 2``,
``a = <T_G f>``). The outputs: ``V_{(ab)(cd)} = B(z_a z_b, z_c z_d)``, ``n (E z_a z_b - K_ab)
= d(z_a z_b)`` and the excess kurtosis ``(d(z_a^4) - 6 K_aa d(z_a^2)) / (n K_aa^2)``. A
statistic on the pair ``(a, b)`` involves only functions of ``(z_a, z_b)`` (``T``, ``P_u``
and ``q_u``, ``u`` within the pair, keep them so), so the flow runs on every pair as a set of
``m = 2`` inputs (one input: ``m = 1``), like the engine's pair layout.

**Unrolled.** Let ``P_{l->r} f (z) = E[f(z^{(r)}) | z^{(l)} = z] = T_l T_{l+1} ... T_{r-1} f``
along one unit's leading-order chain ``z^{(t+1)} = gamma_{t+1} z^{(t)} + xi_{t+1} v_{t+1}``
(``v_{t+1} ~ N(0, Gbar^{(t+1)})`` independent). Since ``T_l P_{l+1->r} = P_{l->r}``,
``P_u P_{l+1->r} phi = Gamma^2 P_{l+1->r} P_u phi`` with ``Gamma = Gamma_{l+1->r} =
prod_{t=l+2}^{r} gamma_t`` (every coordinate is scaled alike) and ``<P_{l+1->r} phi>_{K^{(l+1)}}
= <phi>_{K^{(r)}}``, every argument of ``B^{(l)}`` that the recursion reaches from the outputs
is ``P_{l->r} phi`` with ``r >= l`` and ``phi`` in a fixed family of functions of one layer:
``q_w``, ``P_u q_w`` and ``z_c z_d`` (and ``z_a^4`` in ``d``; ``P_u`` of ``z_c z_d`` is a
constant, of ``z_a^4`` ``6 z_a^2``). Carry, for ``r, s >= l``,

.. math::

    W^{(l)}[r\\phi, s\\psi] = B^{(l)}(P_{l\\to r}\\phi, P_{l\\to s}\\psi), \\qquad
    D^{(l)}[r\\phi] = d^{(l)}(P_{l\\to r}\\phi),

zero on layer 1. With ``xi = xi_{l+1}``, ``alpha_u(r phi) = xi^2 Gamma_{l+1->r}^2
d<phi>_{K^{(r)}} / dK_u`` and ``Sigma^{(l)}(r phi, q_u) = C_0^{(l)}(P_{l->r} phi, q_u) +
W^{(l)}[r phi, l q_u]``:

.. math::

    W^{(l+1)}[r\\phi, s\\psi] &= W^{(l)}[r\\phi, s\\psi] + C_W \\sum_u \\big[
        \\alpha_u(s\\psi)\\, \\Sigma^{(l)}(r\\phi, q_u) + \\alpha_u(r\\phi)\\,
        \\Sigma^{(l)}(s\\psi, q_u)\\big]
        + C_W^2 \\sum_{uv} \\alpha_u(r\\phi)\\, \\alpha_v(s\\psi)\\, \\Sigma^{(l)}(q_u, q_v), \\\\
    D^{(l+1)}[r\\phi] &= D^{(l)}[r\\phi] + C_W \\sum_u D^{(l)}[l q_u]\\, \\alpha_u(r\\phi)
        + C_W \\xi^2 \\Gamma^2 \\sum_u \\Sigma^{(l)}(r P_u\\phi, q_u)
        + \\tfrac12 C_W^2 \\xi^4 \\Gamma^4 \\sum_{uv}
          \\frac{\\partial^2 \\langle\\phi\\rangle_{K^{(r)}}}{\\partial K_u \\partial K_v}
          \\Sigma^{(l)}(q_u, q_v),

and the outputs of layer ``l`` are ``W^{(l)}[l z_a z_b, l z_c z_d]`` and ``D^{(l)}[l z_a z_b]``.
The family has ``F = 2 nu + nu^2`` members per layer (``nu = m (m + 1) / 2``: 15 on a pair), so
``W`` is ``[L+1, F, L+1, F]``, updated by one ``lax.scan`` over the layers.

**The sources are cross-layer moments.** ``C_0^{(l)}(P_{l->r} phi, q_v) = E[phi(X) q_v(Y)] -
<phi>_{K^{(r)}} <q_v>_{K^{(l)}}`` with ``Y = z^{(l)}`` and ``X = z^{(r)}`` two points of the
same unit's chain: jointly Gaussian, ``Var Y = K^{(l)}``, ``Var X = K^{(r)}``,
``Cov(X, Y) = Gamma_{l->r} K^{(l)}`` (each step multiplies the covariance with ``Y`` by
``gamma`` and adds independent noise), i.e. ``X = Gamma Y + e``, ``e ~ N(0, S)``,
``S = K^{(r)} - Gamma^2 K^{(l)}`` independent of ``Y``: at most ``2 m = 4`` Gaussian variables,
the kind of moment of the engine's four-input rules. There are ``O(L^2)`` such ``(l, r)``
tables per pair. They are evaluated as follows:

* ``r = l`` (``X = Y``): the one- and two-input moments of :class:`rgnn.flow.moments.Moments`
  (exact polar integrals for the scale-invariant class, whose ``sigma''`` is the distributional
  delta function there);
* ``r > l``: a tensor-product rule on the ``2 m`` standard normal variables of
  ``Y = chol(K^{(l)}) y`` and ``e = chol(S) t`` (Gauss-Hermite; tanh's trapezoid rule of
  :func:`rgnn.perturbative._multi_rules`). For a smooth activation ``P_u`` acts on ``phi``
  directly (``sigma'``, ``sigma''``); for the scale-invariant class it is the Hermite weight
  of Price's theorem on ``e``, ``E[d_e d_f F(X) | Y] = E[F(X) ((S^{-1} e)_e (S^{-1} e)_f -
  S^{-1}_{ef}) | Y]``, ``S^{-1} e = chol(S)^{-T} t``, so no delta function is integrated. The
  kinks still limit the rule to algebraic convergence (relu: about ``1e-4`` of the vertex at
  20 nodes); :func:`rgnn.perturbative` reports the estimate in ``quadrature_error``;
* ``phi = z_c z_d``: Stein's lemma twice, ``C_0 = Gamma^2 sum_{ef} K_ce K_df
  <d_e d_f q_v>_{K^{(l)}}``;
* ``d<phi> / dK_u`` and the second derivatives: the gradient and Hessian of the kernel map
  ``<q_w>_K`` (automatic differentiation of the closed forms for the scale-invariant class, of
  the one- and two-input trapezoid rules otherwise; ``P_u q_w``'s are its second and third),
  ``d K_w / dK_u = delta_uw``, ``d<z_a^4> / dK_(aa) = 6 K_aa``.

**Checks** (``tests/test_residual.py``). One input: :mod:`rgnn._residual_single`'s grid flow
(relative ``1e-13`` for tanh and gelu, ``1e-5`` for relu at 64 nodes, the kinks). ``gamma = 0,
xi = 1``: every ``Gamma_{l->r}`` with ``r > l`` vanishes, ``X`` and ``Y`` are independent and
``alpha`` lives on ``r = l + 1`` only, so ``W^{(l+1)}[l+1 zz, l+1 zz] = C_W^2 xi^4 Sigma(q, q)``
and ``B^{(l+1)}(q, q) = J Sigma J^T``: PDLT's ``V' = C_W^2 Cov4 + J V J^T`` and ``Delta' = J
Delta + (1/2n) H : V``, the flow engine's plain rules (to rounding for relu, to quadrature for
the others). A linear activation: the residual rules of :mod:`rgnn.flow.rules` (exact there,
rounding). Monte Carlo over finite networks on several inputs (:mod:`tools.residual_monte_carlo`
``--inputs``), where the rotation-symmetric rules are rejected.

Not derived here: the NTK side (its mean shift, variance, ``A, B, D``) on several inputs, the
dNTK, the full four-index layout.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from rgnn.flow import moments as flow_moments


# ----------------------------------------------------------------------------- index tables
def _units(m: int):
    """The unordered index pairs ``u = (a, b)``, ``a <= b``, of a set of ``m`` inputs."""
    return [(a, b) for a in range(m) for b in range(a, m)]


def _tables(m: int):
    """Static tables of one set of ``m`` inputs (``nu = m (m + 1) / 2`` unordered pairs).

    * ``uidx [m, m]``: the unordered index of the ordered pair ``(a, b)``;
    * ``half [nu]``: ``1/2`` on the diagonal pairs (Price: ``P_u = d_a d_b / (1 + delta_ab)``);
    * the family of the bilinear form ``W`` (``F = 2 nu + nu^2`` functions of one layer):
      ``q_w = s_c s_d`` (``0..nu-1``), ``P_u q_w`` at ``nu + u nu + w``, ``z_c z_d`` at
      ``nu + nu^2 + w``;
    * the family of the functional ``D`` (``G = 2 nu + m``): ``q_w``, ``z_c z_d``, ``z_a^4``,
      with ``pmap [G, nu, F]`` (``P_u`` of each as a combination of the ``W`` family,
      constants dropped) and ``fourth [m, nu]`` (the unordered index of ``(a, a)``).
    """
    units = _units(m)
    nu = len(units)
    uidx = np.zeros((m, m), np.int32)
    for u, (a, b) in enumerate(units):
        uidx[a, b] = uidx[b, a] = u
    half = np.array([0.5 if a == b else 1.0 for a, b in units])
    n_f, n_g = 2 * nu + nu * nu, 2 * nu + m
    pmap = np.zeros((n_g, nu, n_f))
    for w in range(nu):
        for u in range(nu):
            pmap[w, u, nu + u * nu + w] = 1.0
    for a in range(m):
        # P_(aa) z_a^4 = (1/2) 12 z_a^2
        pmap[2 * nu + a, uidx[a, a], nu + nu * nu + uidx[a, a]] = 6.0
    return units, nu, uidx, half, n_f, n_g, pmap


def _to_matrix(kv, m: int):
    """``[m, m]`` symmetric matrix from its unordered entries ``kv [nu]``."""
    _, _, uidx, *_ = _tables(m)
    return kv[jnp.asarray(uidx)]


# ----------------------------------------------------------------------------- kernel maps
def _qmap(act, kv, m: int, rules):
    """``<s_a s_b>_K`` on every unordered pair (``[nu]``) as a function of the unordered
    entries ``kv [nu]`` of ``K`` (differentiated twice by :func:`_map_derivatives`): closed
    forms for the scale-invariant class, the one- and two-input trapezoid rules otherwise."""
    units, *_ = _tables(m)
    k = _to_matrix(kv, m)
    out = []
    for a, b in units:
        if a == b:
            if act.scale_invariant:
                slope = flow_moments._slope(act)
                out.append(0.5 * (1 + slope * slope) * k[a, a])
            else:
                x, w = rules["1"]
                out.append(jnp.sum(w * act.fn(jnp.sqrt(k[a, a]) * x) ** 2))
        elif act.scale_invariant:
            out.append(act.maps(k[a, a], k[b, b], k[a, b])[0])
        else:
            x, w = rules["2"]
            s1 = jnp.sqrt(k[a, a])
            c = k[a, b] / s1
            s2 = jnp.sqrt(k[b, b] - c * c)
            za = s1 * x[:, None]
            zb = c * x[:, None] + s2 * x[None, :]
            out.append(jnp.einsum("i,j,ij->", w, w, act.fn(za) * act.fn(zb)))
    return jnp.stack(out)


def _map_derivatives(act, kv, m: int, rules):
    """``(grad [nu, nu], hess [nu, nu, nu])`` of :func:`_qmap`: ``grad[w, u] = d<q_w>/dK_u``
    ``= <P_u q_w>`` (Price), ``hess[w, u, v] = <P_u P_v q_w>``."""
    f = partial(_qmap, act, m=m, rules=rules)
    return jax.jacfwd(f)(kv), jax.jacfwd(jax.jacfwd(f))(kv)


# ----------------------------------------------------------------------------- moments
def _same_layer(act, k, rules):
    """``C_0`` of the ``q`` and ``P_u q`` functions with ``q_v`` at one layer (the two
    branches of the chain coincide): ``[nu (w) + nu * nu (u, w), nu (v)]`` from the one- and
    two-input moments of :class:`rgnn.flow.moments.Moments` (exact polar integrals for the
    scale-invariant class, the distributional ``sigma''``)."""
    m = k.shape[0]
    units, nu, uidx, half, *_ = _tables(m)
    mom = flow_moments.Moments(act, k, rules, pointwise=False, kmax=2)
    t0 = mom.e((0, 0, 0, 0), "cdab").x  # <s_c s_d s_a s_b>
    t2 = mom.e((2, 0, 0, 0), "cdab").x  # <s''_c s_d s_a s_b>
    t11 = mom.e((1, 1, 0, 0), "cdab").x  # <s'_c s'_d s_a s_b>
    e0 = mom.e((0, 0), "ab").x
    e2 = mom.e((2, 0), "ab").x
    e11 = mom.e((1, 1), "ab").x
    eye = jnp.eye(m, dtype=k.dtype)
    # <d_e d_f (s_c s_d) X> for X = s_a s_b (four indices after efcd) and X = 1
    dd4 = (
        jnp.einsum("ec,fc,cdab->efcdab", eye, eye, t2)
        + jnp.einsum("ec,fd,cdab->efcdab", eye, eye, t11)
        + jnp.einsum("ed,fc,cdab->efcdab", eye, eye, t11)
        + jnp.einsum("ed,fd,dcab->efcdab", eye, eye, t2)
    )
    dd2 = (
        jnp.einsum("ec,fc,cd->efcd", eye, eye, e2)
        + jnp.einsum("ec,fd,cd->efcd", eye, eye, e11)
        + jnp.einsum("ed,fc,cd->efcd", eye, eye, e11)
        + jnp.einsum("ed,fd,dc->efcd", eye, eye, e2)
    )
    iu = np.array(units, np.int32)
    qv = e0[iu[:, 0], iu[:, 1]]  # [nu] <q_v>
    cq = t0[iu[:, 0], iu[:, 1]][:, iu[:, 0], iu[:, 1]] - qv[:, None] * qv[None, :]
    ep = dd4[iu[:, 0], iu[:, 1]][:, iu[:, 0], iu[:, 1]][:, :, iu[:, 0], iu[:, 1]]  # [u, w, v]
    mp = dd2[iu[:, 0], iu[:, 1]][:, iu[:, 0], iu[:, 1]]  # [u, w]
    cp = (ep - mp[:, :, None] * qv[None, None, :]) * jnp.asarray(half)[:, None, None]
    return jnp.concatenate([cq, cp.reshape(nu * nu, nu)], axis=0)


def _cross_layer(act, ki, kr, g, x, w):
    """``C_0`` of ``q_w`` and ``P_u q_w`` at layer ``r`` (smoothed down to layer ``i``) with
    ``q_v`` at layer ``i < r``: ``[nu + nu * nu, nu]``.

    ``Y = z^(i) ~ N(0, K^(i))`` and ``X = g Y + e``, ``e ~ N(0, S)``, ``S = K^(r) - g^2 K^(i)``
    independent of ``Y`` (``g`` the product of the shortcuts between the layers): a
    tensor-product rule (nodes ``x``, weights ``w`` per dimension) on the ``2 m`` standard
    normal variables of ``Y = chol(K^(i)) y`` and ``e = chol(S) t``. ``P_u`` on ``X`` is the
    Hermite weight of Price's theorem, ``E[d_e d_f F(X) | Y] = E[F(X) ((S^-1 e)_e (S^-1 e)_f
    - S^-1_ef) | Y]`` with ``S^-1 e = chol(S)^-T t`` (no derivative of ``sigma``: a kinked
    activation needs no delta function)."""
    m = ki.shape[0]
    units, nu, _, half, *_ = _tables(m)
    grid = jnp.stack(jnp.meshgrid(*([x] * m), indexing="ij"), -1).reshape(-1, m)  # [Q, m]
    wq = jnp.prod(jnp.stack(jnp.meshgrid(*([w] * m), indexing="ij"), -1), -1).reshape(-1)
    s = kr - g * g * ki
    lk = jnp.linalg.cholesky(ki)
    ls = jnp.linalg.cholesky(s)
    y = grid @ lk.T  # [Q, m]
    e = grid @ ls.T
    xx = g * y[:, None, :] + e[None, :, :]  # [Q (y), Q (t), m]
    sy = act.fn(y)
    iu = np.array(units, np.int32)
    qy = jnp.concatenate([jnp.ones_like(y[:, :1]), sy[:, iu[:, 0]] * sy[:, iu[:, 1]]], -1)
    if act.scale_invariant:
        sx = act.fn(xx)
        qx = sx[..., iu[:, 0]] * sx[..., iu[:, 1]]  # [Q, Q, nu]
        t = jax.scipy.linalg.solve_triangular(ls.T, grid.T, lower=False)  # [m, Q]
        sinv = jnp.linalg.inv(s)
        herm = (t[iu[:, 0]] * t[iu[:, 1]] - sinv[iu[:, 0], iu[:, 1]][:, None]) * jnp.asarray(half)[
            :, None
        ]
        hp = jnp.concatenate([jnp.ones_like(herm[:1]), herm], 0)  # [1 + nu, Q]
        inner = jnp.einsum("ytw,ht,t->yhw", qx, hp, wq)  # [Q (y), 1 + nu, nu]
        inner = inner.reshape(inner.shape[0], -1)  # [Q, (1 + nu) nu]: q_w, then P_u q_w
    else:
        # a smooth activation: the derivatives themselves (no Hermite weight, whose
        # cancellations grow with the condition number of S)
        d0, d1, d2 = _derivatives(act, xx)  # [Q, Q, m] each
        cols = [d0[..., c] * d0[..., d] for c, d in units]
        for e, f in units:  # P_(ef) (s_c s_d) (static cases, no array of all index tuples)
            for c, d in units:
                cols.append(_second(d0, d1, d2, e, f, c, d) * (0.5 if e == f else 1.0))
        # each column integrated over t as it is formed (fused; no [Q, Q, F] array)
        inner = jnp.stack([flow_moments._weighted_sum(col, wq) for col in cols], -1)
    mom = jnp.einsum("yf,yv,y->fv", inner, qy, wq)  # [nu + nu nu, 1 + nu]
    ey = qy.T @ wq  # [1 + nu]
    return mom[:, 1:] - mom[:, :1] * ey[None, 1:]


def _second(d0, d1, d2, e, f, c, d):
    """``d_e d_f (s(z_c) s(z_d))`` from the derivative arrays ``d0, d1, d2 [..., m]``."""
    if c == d:  # (s^2)'' on one input
        if e == f == c:
            return 2 * (d1[..., c] ** 2 + d0[..., c] * d2[..., c])
        return jnp.zeros_like(d0[..., c])
    out = jnp.zeros_like(d0[..., c])
    for a, b in ((c, d), (d, c)):  # a carries both derivatives, or one each
        if e == f == a:
            out = out + d2[..., a] * d0[..., b]
    if {e, f} == {c, d}:
        out = out + d1[..., c] * d1[..., d]
    return out


def _derivatives(act, z):
    """``(sigma, sigma', sigma'')`` at ``z`` (automatic differentiation, elementwise)."""
    f1 = jax.vmap(jax.grad(act.fn))
    f2 = jax.vmap(jax.grad(lambda v: jax.grad(act.fn)(v)))
    flat = z.reshape(-1)
    return act.fn(z), f1(flat).reshape(z.shape), f2(flat).reshape(z.shape)


# ----------------------------------------------------------------------------- the flow
def _shortcut_products(gamma):
    """``G[i, r] = prod_{t = i+1}^{r} gamma_t`` for ``r >= i`` (``1`` at ``r = i``), ``0``
    below (0-based layers)."""
    n = gamma.shape[0]
    i, r, t = np.meshgrid(np.arange(n), np.arange(n), np.arange(n), indexing="ij")
    inside = jnp.asarray((t > i) & (t <= r))
    prod = jnp.prod(jnp.where(inside, gamma[None, None, :], 1.0), axis=-1)
    return jnp.where(jnp.asarray(r[..., 0] >= i[..., 0]), prod, 0.0)


def set_flow(act, cw, gamma, xi, k, rules, cross):
    """``(V [R, m, m, m, m], DG [R, m, m], D4 [R, m])`` of one set of ``m`` inputs: the
    vertex ``B(z_a z_b, z_c z_d)``, ``d(z_a z_b)`` and ``d(z_a^4)`` (both times the width)
    on every layer, for the leading-order kernels ``k [R, m, m]`` and the factors ``gamma,
    xi [R]`` of each layer (module docstring). ``cross``: ``(nodes, weights)`` of the rule of
    the cross-layer moments."""
    n_layers, m = k.shape[0], k.shape[1]
    units, nu, uidx, half, n_f, n_g, pmap = _tables(m)
    dtype = k.dtype
    iu = np.array(units, np.int32)
    kv = k[:, iu[:, 0], iu[:, 1]]  # [R, nu]
    grad, hess = jax.vmap(lambda v: _map_derivatives(act, v, m, rules))(kv)
    eye_u = jnp.eye(nu, dtype=dtype)
    # d<phi>/dK_u for the W family at every layer: q_w, P_u' q_w, z_c z_d
    dphi = jnp.concatenate(
        [
            grad,
            jnp.transpose(hess, (0, 2, 1, 3)).reshape(n_layers, nu * nu, nu),
            jnp.broadcast_to(eye_u, (n_layers, nu, nu)),
        ],
        axis=1,
    )  # [R, F, u]; row nu + u' nu + w holds hess[w, u', u]
    # the D family: q_w, z_c z_d, z_a^4 (<z_a^4> = 3 K_aa^2)
    kd = k[:, np.arange(m), np.arange(m)]  # [R, m]
    diag_u = jnp.asarray(np.eye(nu)[uidx[np.arange(m), np.arange(m)]], dtype)  # [m, nu]
    dalpha = jnp.concatenate(
        [grad, jnp.broadcast_to(eye_u, (n_layers, nu, nu)), 6 * kd[:, :, None] * diag_u[None]],
        axis=1,
    )  # [R, G, u]
    dh = jnp.concatenate(
        [
            hess,
            jnp.zeros((n_layers, nu, nu, nu), dtype),
            jnp.broadcast_to(6 * jnp.einsum("au,av->auv", diag_u, diag_u), (n_layers, m, nu, nu)),
        ],
        axis=1,
    )  # [R, G, u, v]
    gp = _shortcut_products(gamma)  # [R, R]

    # C_0 of every (layer i, layer r >= i) pair of the chain
    same = jax.vmap(lambda kk: _same_layer(act, kk, rules))(k)  # [R, nu + nu^2, nu]
    pairs = np.array([(i, r) for i in range(n_layers - 1) for r in range(i + 1, n_layers)])
    xq, wq = cross
    crossed = jax.lax.map(
        lambda a: _cross_layer(act, a[0], a[1], a[2], xq, wq),
        (k[pairs[:, 0]], k[pairs[:, 1]], gp[pairs[:, 0], pairs[:, 1]]),
    )  # [P, nu + nu^2, nu]
    c0 = jnp.zeros((n_layers - 1, n_layers, nu + nu * nu, nu), dtype)
    steps = np.arange(n_layers - 1)
    c0 = c0.at[steps, steps].set(same[:-1])
    c0 = c0.at[pairs[:, 0], pairs[:, 1]].set(crossed)
    # z_c z_d by Stein's lemma: C_0 = g^2 sum_ef K_ce K_df <d_e d_f q_v>
    ddq = jnp.einsum("lvu,uef->lvef", grad, jnp.asarray(_ordered(m, uidx, half)))
    stein = jnp.einsum("lce,ldf,lvef->lcdv", k, k, ddq)[:, iu[:, 0], iu[:, 1]]  # [R, w, v]
    gsq = gp[:-1] ** 2  # [R-1, R]
    zz = gsq[:, :, None, None] * stein[:-1, None]
    c0 = jnp.concatenate([c0, zz], axis=2)  # [R-1, R, F, nu]

    pm = jnp.asarray(pmap, dtype)
    qi = np.arange(nu)

    def step(carry, inp):
        wf, dv = carry  # [R, F, R, F], [R, G]
        i, c0i = inp
        x2 = xi[i + 1] ** 2
        g2 = gp[i + 1] ** 2  # [R]: Gamma_{i+1 -> r}^2
        alpha = (x2 * g2)[:, None, None] * dphi  # [R, F, u]
        sig = c0i + jnp.take(wf, i, axis=2)[:, :, qi]  # [R, F, v]: Sigma(r phi, q_v)
        sig_qq = jnp.take(sig, i, axis=0)[qi]  # [u, v]
        one = jnp.einsum("sgv,rfv->rfsg", alpha, sig)
        wn = (
            wf
            + cw * (one + jnp.transpose(one, (2, 3, 0, 1)))
            + cw * cw * jnp.einsum("rfu,uv,sgv->rfsg", alpha, sig_qq, alpha)
        )
        d_q = jnp.take(dv, i, axis=0)[qi]  # [u]: d(q_u) at layer i
        dn = (
            dv
            + cw * x2 * g2[:, None] * jnp.einsum("rgu,u->rg", dalpha, d_q)
            + cw * x2 * g2[:, None] * jnp.einsum("guf,rfu->rg", pm, sig)
            + 0.5 * cw * cw * x2 * x2 * (g2 * g2)[:, None] * jnp.einsum("rguv,uv->rg", dh, sig_qq)
        )
        z0 = nu + nu * nu
        v_out = jnp.take(jnp.take(wn, i + 1, axis=0), i + 1, axis=1)[z0:, z0:]  # [nu, nu]
        d_row = jnp.take(dn, i + 1, axis=0)
        return (wn, dn), (v_out, d_row[nu : 2 * nu], d_row[2 * nu :])

    init = (jnp.zeros((n_layers, n_f, n_layers, n_f), dtype), jnp.zeros((n_layers, n_g), dtype))
    _, (vs, ds, d4) = jax.lax.scan(step, init, (jnp.asarray(steps), c0))
    vs = jnp.concatenate([jnp.zeros((1, nu, nu), dtype), vs])
    ds = jnp.concatenate([jnp.zeros((1, nu), dtype), ds])
    d4 = jnp.concatenate([jnp.zeros((1, m), dtype), d4])
    u = jnp.asarray(uidx)
    v4 = vs[:, u[:, :, None, None], u[None, None, :, :]]
    return v4, ds[:, u], d4


def _ordered(m, uidx, half):
    """``[nu, m, m]``: ``<d_e d_f F> = sum_u O[u, e, f] <P_u F>`` (``2`` on the diagonal)."""
    nu = len(half)
    out = np.zeros((nu, m, m))
    for e in range(m):
        for f in range(m):
            out[uidx[e, f], e, f] = 1.0 / half[uidx[e, f]]
    return out


def set_kernels(k, sets):
    """``[S, R, m, m]``: the kernels ``k [R, N, N]`` on every set of ``sets [S, m]``."""
    return jnp.moveaxis(jnp.moveaxis(k, 0, -1)[sets[:, :, None], sets[:, None, :]], -1, 1)


@partial(jax.jit, static_argnames=("act",))
def sets_flow(act, cw, gamma, xi, ks, rules, cross):
    """:func:`set_flow` on every set's kernels ``ks [S, R, m, m]`` (:func:`set_kernels`; the
    compilation depends on ``S``, not on the number of inputs): ``V [R, S, m, m, m, m]``,
    ``DG [R, S, m, m]``, ``D4 [R, S, m]``."""

    def one(kk):
        return set_flow(act, cw, gamma, xi, kk, rules, cross)

    v, dg, d4 = jax.lax.map(one, ks, batch_size=min(8, ks.shape[0]))
    return jnp.moveaxis(v, 0, 1), jnp.moveaxis(dg, 0, 1), jnp.moveaxis(d4, 0, 1)
