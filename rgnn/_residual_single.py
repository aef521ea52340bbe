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

NTK mean shift (derived here; PDLT ch. 8 has the plain case). One unit's NTK is
``H_i = Theta + delta_i``, ``delta_i = O(1/sqrt n)``; carry three more objects (``p = s'^2``,
``e = s s'``, ``H_ik`` the off-diagonal NTK):

* ``eta(f) = n E[delta_i f(z_i)]`` (a functional; ``eta(1) = n (E H - Theta)``, the mean shift);
* ``E(f, g) = n E[delta_i f(z_i) g(z_k)] - eta(f) <g>``, ``i != k`` (a bilinear form);
* ``F(f, g) = n E[H_ik f(z_i) g(z_k)]``, ``i != k`` (symmetric; ``F(f, g) = F_{aa;aa} <f'><g'>``
  for a plain layer).

The residual NTK (:mod:`rgnn.flow.rules`, "The NTK side of residual layers") gives, given layer
``l``, ``delta'_i = xi^2 (H~ - Theta~) + gamma^2 delta_i + Xi_i`` with the NTK metric
``H~ = lambda_b + lambda_W (1/n) sum_j q(z_j) + C_W (1/n) sum_j p(z_j) H_j`` and
``Xi_i = xi^2 (w^T M w - E) + 2 xi gamma w.v`` (``w`` row ``i`` of ``W``, ``M_jk = s'_j s'_k H_jk``,
``v_j = s'_j H_ji``), whose correlation with ``f(z'_i)`` is Stein's lemma on ``w``:
``n E[Xi_i f(z'_i) | l] = C_W^2 xi^4 (s^T M s / n) E[f''] + 2 C_W xi^2 gamma (v.s) E[f']``.
With ``T_1 f = E[f'(z') | z]`` (kernel ``(y - gamma z) / v``), ``E[f''(z') | z] = (2 / xi^2)
T_G f``, and the unit sums split as for ``B, d`` (the unit itself, the others through ``B``,
``E``, ``F``; three-unit terms are ``O(1/n^2)``), with ``S_qq = lambda_W Sigma(q, q)
+ C_W Theta Sigma(p, q) + C_W E(p, q)`` (``n Cov(H~, G) / C_W``) and
``c_e = <e^2> Theta + F(e, e)``:

.. math::

    \\eta'(f) &= \\gamma^2 [\\eta(Tf) + C_W E(T_G f, q)]
      + \\xi^2 \\big\\{\\lambda_W [\\Sigma(q, Tf) + d(q) \\langle Tf\\rangle]
      + C_W \\Theta [\\Sigma(p, Tf) + d(p) \\langle Tf\\rangle]
      + C_W [E(p, Tf) + \\eta(p) \\langle Tf\\rangle] + C_W S_{qq} \\langle T_G f\\rangle\\big\\} \\
      &\\quad + 2 C_W^2 \\xi^2 c_e \\langle T_G f\\rangle
      + 2 C_W \\xi^2 \\gamma [\\Theta \\langle e\\, T_1 f\\rangle + F(e, T_1 f)], \\
    E'(f, g) &= \\gamma^2 [E(Tf, Tg) + C_W E(Tf, q) \\langle T_G g\\rangle]
      + \\xi^2 \\langle Tf\\rangle [\\lambda_W \\Sigma(q, Tg) + C_W \\Theta \\Sigma(p, Tg)
      + C_W E(p, Tg) + C_W S_{qq} \\langle T_G g\\rangle], \\
    F'(f, g) &= \\gamma^2 F(Tf, Tg) + C_W \\xi^2 \\gamma \\big[\\langle T_1 f\\rangle
      (\\Theta \\langle e\\, Tg\\rangle + F(e, Tg)) + (f \\leftrightarrow g)\\big]
      + C_W^2 \\xi^4 c_e \\langle T_1 f\\rangle \\langle T_1 g\\rangle,

all zero on layer 1, and ``Theta' = xi^2 (lambda_b + lambda_W <q> + C_W <p> Theta) + gamma^2
Theta``. For ``f = 1``: ``DH' = gamma^2 DH + xi^2 [lambda_W d(q) + C_W Theta d(p) + C_W eta(p)]``
(``xi^2`` times the plain layer's shift of the metric's mean). A plain layer reduces to PDLT's
NTK mean shift (tests: the flow engine's, to roundoff, for relu, tanh, gelu, linear); Monte
Carlo checks the residual ones (:mod:`tools.residual_monte_carlo`). ``s'^2`` and ``s s'`` take
the mean of their one-sided limits at a kink (relu's step stays second order on the grid).

NTK variance (derived here; PDLT ch. 8 has the plain recursions for ``A`` and ``B``, and its
appendix on residual learning only the leading-order kernels). Carry three more objects
(``i != k``):

* ``nu(f) = n E[delta_i^2 f(z_i)]`` (a functional; ``nu(1) = n Var(H_ii)``, the NTK variance);
* ``A(f, g) = n E[delta_i delta_k f(z_i) g(z_k)]`` (``A(1, 1) = n Cov(H_ii, H_kk)``, PDLT's
  ``A`` on a plain layer, where it is ``n Var(H~)``);
* ``Bo(f, g) = n E[H_ik^2 f(z_i) g(z_k)]`` (``Bo(1, 1)``: PDLT's ``B``).

With ``Delta = H~ - Theta~`` (``Theta~ = lambda_b + <y>``), ``delta'_i = xi^2 Delta + gamma^2
delta_i + Xi_i``, where ``y = lambda_W q + C_W Theta p`` is one unit's share of ``H~``. Every
product of two of these fluctuations is ``O(1/n)``; a third fluctuation (``G - Gbar`` in
``E[f(z'_i) | l] = (Tf)(z_i; G)``, a three-unit correlation, ``n E[delta_i H_ik f g]``)
makes it ``O(1/n^2)``, so ``f(z'_i)`` enters only through ``Tf`` at ``Gbar``. The pieces:

* ``n Var(H~) = N_H = Sigma(y, y) + 2 C_W E(p, y) + C_W^2 A(p, p)`` (the unit's own
  Gaussian variance, the others through ``B``; ``H_jj = Theta + delta_j`` in the share of
  unit ``j``);
* ``n E[Delta delta_i g(z_i)] = E(g, y) + C_W A(g, p)`` (the other units' shares of ``H~``;
  the unit's own is ``O(1/n)``);
* given layer ``l`` the row ``w`` enters ``Xi_i`` through ``w^T M w`` and ``w.v``:
  ``n E[Xi_i^2 | l] = 2 C_W^2 xi^4 (1/n) sum_jm p_j p_m H_jm^2 + 4 C_W xi^2 gamma^2 sum_j
  p_j H_ji^2``, whose mean with ``g(z_i)`` is ``2 C_W^2 xi^4 c_p <g> + 4 C_W xi^2 gamma^2
  [Theta^2 <p g> + Bo(g, p)]`` with ``c_p = <p^2> Theta^2 + Bo(p, p)``; the joint
  distribution of ``sqrt(n) Xi_i`` and ``z'_i`` given ``l`` factorizes up to ``O(1/n)``
  (their joint cumulants are ``O(1/sqrt n)`` or smaller, and enter squared), and the cross
  terms ``Xi_i Delta``, ``Xi_i delta_i``, ``Xi_i Xi_k``, ``Xi_i delta_k`` are ``O(1/n^2)``
  (``E[Xi_i f(z'_i) | l]`` is ``O(1/n)``, Stein's lemma above);
* ``H'_ik = xi^2 w^T M u + xi gamma (u.v^(i) + w.v^(k)) + gamma^2 H_ik`` (``u`` row ``k``,
  ``v^(i)_m = s'_m H_mi``): its four terms are uncorrelated given ``l`` up to ``O(1/n^2)``.

Hence, with ``a_A(f) = E(Tf, y) + C_W A(Tf, p)`` and ``b_B(f) = Theta^2 <p Tf> + Bo(Tf, p)``:

.. math::

    \\nu'(f) &= \\gamma^4 \\nu(Tf) + \\xi^4 (N_H + 2 C_W^2 c_p) \\langle Tf\\rangle
      + 4 C_W \\xi^2 \\gamma^2 b_B(f) + 2 \\xi^2 \\gamma^2 a_A(f), \\\\
    A'(f, g) &= \\gamma^4 A(Tf, Tg) + \\xi^4 N_H \\langle Tf\\rangle \\langle Tg\\rangle
      + \\xi^2 \\gamma^2 [a_A(f) \\langle Tg\\rangle + \\langle Tf\\rangle a_A(g)], \\\\
    Bo'(f, g) &= \\gamma^4 Bo(Tf, Tg) + C_W^2 \\xi^4 c_p \\langle Tf\\rangle \\langle Tg\\rangle
      + C_W \\xi^2 \\gamma^2 [b_B(f) \\langle Tg\\rangle + \\langle Tf\\rangle b_B(g)],

all zero on layer 1. Outputs: ``n Var(H_ii) = nu(1)``, ``A = A(1, 1)``, ``B = Bo(1, 1)`` and
PDLT's ``D = n Cov(z_k^2, H_ii) = E(1, z^2)`` (two different units). A plain layer
(``Tf = <f>``) gives PDLT's ``A' = N_H``, ``B' = C_W^2 c_p`` and ``n Var(H_ii) = A' + 2 B'``
(tests: the flow engine's, to roundoff for relu and gelu, to its quadrature for tanh); a
linear activation gives the residual rules of :mod:`rgnn.flow.rules`, where the rotation
symmetry makes ``n Var(H_ii) = A + 2 B`` too (tests, to roundoff); the nonlinear residual
recursions are checked by Monte Carlo (:mod:`tools.residual_monte_carlo`). At a kink the
one-unit averages ``<p^2>`` and ``<y^2>`` take the mean of the one-sided limits, like ``p``.

dNTK (derived here; PDLT ch. 11 has the plain recursions for ``P, Q``, written in
:mod:`rgnn.flow.rules` with the Hessian-form dNTK ``dH^_{a;bc} = Hess(z_a)[g_b, g_c]``, ``g``
the learning-rate-weighted gradients; for a linear activation the residual rules are there
too). On one input ``dH_{i0 i1 i2} = dH^_{i1;i0 i2} + dH^_{i2;i0 i1}``, so with ``a != b``
PDLT's ``P = n E[dH_{abb} z_a] = 2 Qh(1, z)`` and ``Q = n E[dH_{aab} z_b] = Qh(1, z)
+ Ph(z, 1)``, where the flow carries two more bilinear forms (``a != b``):

* ``Qh(f, g) = n E[dH^_{a;ab} f(z_a) g(z_b)]`` (the unit's Hessian along its own and another
  unit's gradient; ``Qh = Q^ <f> <g'>`` for a plain layer, ``Q^`` the rules' ``QH``);
* ``Ph(f, g) = n E[dH^_{a;bb} f(z_a) g(z_b)]`` (along another unit's gradient twice;
  ``Ph = P^ <f'> <g>`` for a plain layer, ``P^`` the rules' ``PH``).

What carries over from PDLT ch. 11: the Hessian of the new unit,
``Hess(z'_a)[g'_c, g'_d] = (xi^2 lambda_W / n) [delta_{ca} sum_k e_k (M H)_{dk} + (c <-> d)]
+ xi sum_k W_ak [s''_k (M H)_{ck} (M H)_{dk} + s'_k sum_{mm'} M_cm M_dm' dH^_{k;mm'}]
+ gamma sum_{mm'} M_cm M_dm' dH^_{a;mm'}`` (``M = xi W s' + gamma``, the residual NTK's
backward matrix; ``e = s s'``; ``(M H)_{ck} = sum_m M_cm H_mk``), averaged over the new
weights (an odd number of entries of one row vanishes; Stein's lemma on the rows of ``a`` and
``b`` turns ``E[W_ak f(z'_a) | l]`` into ``(C_W / n) xi s_k (T_1 f)(z_a)``), then over layer
``l``: sums over one unit give Gaussian averages, over two the layer's ``F``, ``Bo``, ``Qh``,
``Ph``; three-unit correlations, ``dH^_{a;aa}`` (whose means are ``O(1/n)``) times a further
``O(1/sqrt n)`` factor, and the metric's fluctuation inside ``T`` are ``O(1/n^2)``. New
because of the shortcut: (i) the unit's own lower Hessian ``gamma dH^_{a;..}`` enters, with
``M_{aa} = gamma``, so ``Qh(Tf, Tg)``, ``Ph(Tf, Tg)`` propagate with ``gamma^3`` and, through
one branch factor on the other unit's side, ``Qh(Tf, e)`` (``gamma^2 xi^2 C_W <T_1 g>``) and
``Ph(Tf, p)`` (``gamma xi^2 C_W <Tg>``, ``p = s'^2``); (ii) the one-unit averages of PDLT
become bilinear forms carried on the grid (``F`` and ``Bo`` of the NTK side,
``Hf(u, v) = Theta <u v> + F(u, v)`` and ``Bf(u, v) = Theta^2 <u v> + Bo(u, v)``, the means of
``(1/n) sum_{km} u_k v_m H_km`` and ``(1/n) sum_{km} u_k v_m H_km^2``), because the other
unit's function ``g`` is smoothed by ``T`` instead of integrated. With the functionals
``X(h) = lambda_W Hf(e, h) + C_W Theta Hf(s'' s', h) + C_W Qh(p, h)`` and
``Y(h) = Ph(e, h) + Bf(s s'', h)``:

.. math::

    Qh'(f, g) &= \\gamma^3 Qh(Tf, Tg) + \\gamma^2 \\xi^2 C_W Qh(Tf, e) \\langle T_1 g\\rangle
      + \\langle Tf\\rangle \\big[\\xi^2 \\gamma X(Tg)
      + \\xi^4 C_W X(e) \\langle T_1 g\\rangle\\big], \\\\
    Ph'(f, g) &= \\gamma^3 Ph(Tf, Tg) + \\gamma \\xi^2 C_W Ph(Tf, p) \\langle Tg\\rangle
      + \\langle T_1 f\\rangle \\big[\\xi^2 \\gamma^2 C_W Y(Tg)
      + \\xi^4 C_W^2 Y(p) \\langle Tg\\rangle\\big],

both zero on layer 1 (``P^{(1)} = Q^{(1)} = 0``). The terms: ``lambda_W Hf(e, .)``
pairs the layer's weight gradient ``(lambda_W / n) xi s_k`` of one unit with the other's
backward path (PDLT's ``lambda_W C_W <s s' s' s> Theta``), ``Hf(s'' s', .)`` and
``Bf(s s'', .)`` the branch's second derivative (PDLT's ``s''`` terms), ``Qh(p, .)``,
``Ph(e, .)`` the lower layers' dNTK through the branch. A plain layer (``Tf = <f>``,
``T_1 f = <f'>``) gives PDLT's ``Q^' = C_W X(e)``, ``P^' = C_W^2 Y(p)`` (tests: the flow
engine's ``P, Q``, measured 1e-13 relative for relu, tanh and gelu, depth 4); a linear
activation gives the residual rules of :mod:`rgnn.flow.rules` (``Qh(1, z)`` grows by
``chi^2 = (gamma^2 + xi^2 C_W)^2``, ``P^ = 0``; tests, to roundoff); Monte Carlo over finite
networks checks the nonlinear residual ones (:mod:`tools.residual_monte_carlo`, ``--dntk``).
Kinks: as the flow engine's ``kinks``. ``"pointwise"`` (what automatic differentiation of a
relu network gives) has ``s'' = 0``; ``"distributional"`` has ``s'' = (1 - a) delta(z)``,
so ``s'' s' = (1 - a^2)/2 delta`` (the limit of smooth activations, as the engine) held on
the grid node at ``z = 0`` (weight ``1 / h``) and ``s s'' = 0``. On one input a plain relu
layer's delta terms vanish (``e(0) = 0``, ``<z delta> = 0``), while a residual one's
``F(s'' s', .)`` does not: there the two conventions differ.

ddNTK (derived here; PDLT ch. infinity has the plain recursions, written in
:mod:`rgnn.flow.rules`). With ``w_{a;b} = Hess(z_a) g_b`` (a covector like ``grad z``), PDLT's
second ddNTK is ``ddII_{klmp} = w_{k;m} . Lambda w_{l;p}`` and on one input, ``a != b``,
``S = n E[ddII_{aabb}]``, ``T = n E[ddII_{abab}]``, ``U = n E[ddII_{abba}]`` and
``R = n E[D^3 z_a[g_a, g_b, g_b]]`` (the estimators of :func:`rgnn.measure`). Carried as
bilinear forms ``R(f, g)``, ``S(f, g)``, ``T(f, g)``, ``U(f, g)``: the same means with
``f(z_a) g(z_b)`` inserted (``a`` the differentiated unit of ``R``, ``S``). The new layer's
``w'_{a;b}`` is ``xi s'_k (M H)_{bk}`` on the weights ``W_ak`` (learning rate ``lambda_W / n``)
plus, on the lower parameters, ``delta_{ab} (xi^2 lambda_W / n) sum_k e_k grad z_k
+ xi sum_k W_ak [s''_k (M H)_{bk} grad z_k + s'_k sum_m M_bm w_{k;m}] + gamma sum_m M_bm
w_{a;m}`` (PDLT's plain layer is ``gamma = 0``, ``M = W s'``); ``D^3 z'_a`` likewise (one
weight direction times ``D^2 s(z_k)``, and ``xi sum_k W_ak D^3 s(z_k) + gamma D^3 z_a`` on the
lower ones). Products of two of these averaged as for ``P, Q``; inner products of lower-layer
pieces are ``H``, ``dH^`` and ``ddII``. Dropped at O(1/n): three-unit correlations, and
products of a two-unit ``H_kb`` (size ``O(1/sqrt n)``) with a ``dH^`` or ``ddII`` whose unit
pattern is not a pairing, such as ``H_km dH^_{k;km}``, with one exception, ``J`` below. In a
plain MLP such products vanish for an odd activation (flipping the signs of one unit's weight
row flips that unit's preactivation and gradient only) and are ``O(1/n^2)`` in general
(measured, relu, depth 3, gamma 0.8, xi 0.6: ``n E[H_ab dH^_{a;ab}]`` 0.0065(13) at width 16,
0.0026(7) at 32; ``n E[H_ab dH^_{b;aa}]`` 0.0029(3), 0.0013(1): both falling like ``1/n``):
each needs three entries of one weight row below, or two rows linked twice.

The exception (derived here; no plain counterpart). ``U'`` needs one more bilinear form,
``b != k``:

* ``J(v, u) = n E[H_bk dH^_{b;kk} v(z_b) u(z_k)]`` (unit ``b``'s Hessian along unit ``k``'s
  gradient twice, times their off-diagonal NTK; ``v`` on the Hessian's unit).

Its pattern is odd in ``k`` (zero in a plain MLP with an odd activation and no insertion, and
``O(1/n^2)`` in a plain MLP whatever the activation), but a shortcut gives it a source at
O(1/n): the one weight ``W_bk`` of the branch enters ``H'_bk`` as ``xi gamma W_bk s'_k H_kk``
(unit ``k``'s gradient carried up by its own shortcut) and ``dH'^_{b;kk}`` as
``xi W_bk s''_k (M H)_kk^2`` with ``(M H)_kk = gamma H_kk + ...``, so their product pairs
``W_bk`` with itself (``C_W / n``), and the insertion ``u(z_k)`` meets ``s''_k s'_k`` (odd
for tanh, so the product is even; gelu has no parity at all). The same averages as above, with
``H'_bk = sum_{ij} M_bi M_kj H_ij`` and ``dH'^_{b;kk} = xi sum_l W_bl [s''_l (M H)_kl^2
+ s'_l (M dH^_l M^T)_kk] + gamma (M dH^_b M^T)_kk`` (``(M dH^_l M^T)_kk = sum_{mm'} M_km
M_km' dH^_{l;mm'}``; the new weights' part of ``g'_k`` sits on row ``k``, where
``Hess(z'_b)`` has none), give ``gamma^5 J(Tv, Tu)`` (``gamma^2 H_bk`` times
``gamma M_kk^2 dH^_{b;kk}``) and, pairing ``W_bi`` of ``xi gamma W_bi s'_i H_ik`` with
``W_bi`` of ``dH'^_{b;kk}`` (whose lower factors are ``gamma^2 H_ki^2`` and
``gamma^2 dH^_{i;kk}``), ``xi^2 gamma^3 C_W <Tv> [Theta^3 <s''s' Tu> + J(p, Tu)]`` (the first
from ``i = k``); every other term is a three-unit correlation, one unit's ``O(1/n)`` mean, or
needs three entries of one row:

.. math::

    J'(v, u) = \\gamma^5 J(Tv, Tu) + \\xi^2 \\gamma^3 C_W \\langle Tv\\rangle
      \\big[\\Theta^3 \\langle s''s'\\, Tu\\rangle + J(p, Tu)\\big],

zero on layer 1, on every plain layer (``gamma = 0``) and for a linear activation
(``s'' = 0``). In ``w'_{a;b} . Lambda w'_{b;a}`` it enters where the branch's ``s''`` term of
one Hessian, ``xi W_ak s''_k (M H)_{bk} grad z_k``, meets the other's lower Hessian along the
gradient of ``k``: (i) through ``(M H)_{bk} = xi sum_j W_bj s'_j H_jk + ...`` with
``xi^2 W_bj W_ak s'_j s'_k w_{j;k}`` (the two factors' ``W_ak`` and ``W_bj`` paired:
``xi^4 C_W^2 J(p, s''s') <Tf><Tg>``); (ii) through ``(M H)_{bk} = gamma H_bk + ...`` with
``gamma xi W_ak s'_k w_{b;k}`` (``W_ak`` paired: ``xi^2 gamma^2 C_W J(Tg, s''s') <Tf>``); and
both again with ``a <-> b``. A plain output layer above residual ones keeps the ``xi^4`` term.
The previous version of this recursion dropped ``J`` as one of the non-pairing products above;
without it ``U`` missed Monte Carlo from the second residual layer on (gelu, depth 3, gamma
0.8, xi 0.6, widths 32/64/128, layers 3, 4: 1.062, 12.31 against 1.177(33), 14.57(53); tanh,
widths 16/32/64: 0.037, 0.176 against 0.0468(11), 0.209(5)); with it, 1.239, 13.85 and
0.0480, 0.2042, and ``U`` agrees with Monte Carlo for tanh and gelu at depths 3 and 4 in three
residual settings (every layer within 2.1 standard errors of the weighted fit ``a + b/n``).
``J`` itself, measured directly (``n`` times the mean of ``H_bk dH^_{b;kk} u(z_k)`` over
``b != k``; depth 3, gamma 0.8, xi 0.6, widths 16/32/64, 2048 networks each): tanh,
``J(1, s''s')`` on layers 2, 3: 0.01883, 0.02426 against 0.01871(16), 0.02399(23), and
``J(1, 1) = 0`` (parity) against 0.0001(4), -0.0001(6); gelu ``J(1, s''s')`` 0.1261, 0.3559
against 0.1264(15), 0.3558(55), ``J(1, 1)`` 0.4945, 1.4400 against 0.4902(37), 1.436(19).

With ``v = lambda_W e + C_W Theta s''s'`` and the functionals
``rho(h) = lambda_W [Bf(s s'', h) + Ph(e, h)] + C_W Theta [Bf(s''' s', h) + Ph(s''s', h)]
+ C_W R(p, h)``, ``sigma(h) = lambda_W Bf(p, h) + C_W Theta Bf(s''^2, h) + C_W S(p, h)``,
``Z(h) = Qh(h, v) + C_W T(h, p)``:

* ``R'(f, g) = gamma^4 R(Tf, Tg) + gamma^2 xi^2 C_W R(Tf, p) <Tg>
  + <Tf> [xi^2 gamma^2 rho(Tg) + xi^4 C_W rho(p) <Tg>]``;
* ``S'(f, g) = gamma^4 S(Tf, Tg) + gamma^2 xi^2 C_W S(Tf, p) <Tg>
  + <Tf> [xi^2 gamma^2 sigma(Tg) + xi^4 C_W sigma(p) <Tg>]``;
* ``T'(f, g) = gamma^4 T(Tf, Tg) + xi^2 gamma^2 [Z(Tf) <Tg> + <Tf> Z(Tg)]
  + xi^4 c_T <Tf><Tg>``, ``c_T = Hf(v, v) + 2 C_W Qh(p, v) + C_W^2 T(p, p)``;
* ``U'(f, g) = gamma^4 U(Tf, Tg) + xi^2 gamma^2 C_W [(U(p, Tg) + J(Tg, s''s')) <Tf>
  + (U(Tf, p) + J(Tf, s''s')) <Tg>] + xi^4 C_W^2 [Theta^3 <(s''s')^2> + U(p, p)
  + 2 J(p, s''s')] <Tf><Tg>``,

all zero on layer 1. ``gamma^4``: the unit's own lower ddNTK through ``M_aa M_bb``; ``gamma^2
xi^2``: one side through the branch (``W`` paired with ``W``: ``C_W``), the other through the
shortcut; ``xi^4``: PDLT's plain sources with the one-unit averages replaced by the forms.
A plain layer gives PDLT's rules (tests: the flow engine's ``R, S, T, U`` to 1e-13 relative for
relu (pointwise), tanh, gelu); a linear activation gives the residual rules (``R = U = 0``,
``S' = chi^2 S + xi^2 lambda_W chi (Theta^2 + B)``, ``T' = chi^2 T + xi^4 lambda_W^2 (Theta K
+ F) + 2 xi^2 lambda_W chi Q^``; tests, to roundoff); Monte Carlo over finite networks checks
the nonlinear residual ones (:mod:`tools.residual_monte_carlo`, ``--dntk --ddntk``; ``U``
above). Kinks: as a plain MLP, the ddNTK of relu exists only with ``kinks="pointwise"``
(``s'' = s''' = 0``, so ``J = 0``); at the kink ``<p^2>`` takes the one-sided limits of
``s'^4``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
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
      ntk: ``Theta^{(l)}`` (``None`` unless ``single_input_flow(..., ntk=...)``; so are the
        following).
      ntk_correction: ``E H_ii - Theta``, times the width (``eta(1)``).
      ntk_variance: ``Var(H_ii)`` of one unit, times the width (``nu(1)``).
      ntk_vertex: PDLT's ``A``, ``n Cov(H_ii, H_kk)``, ``i != k`` (``A(1, 1)``).
      mixed_vertex: PDLT's ``D``, ``n Cov(z_k^2, H_ii)``, ``i != k`` (``E(1, z^2)``).
      ntk_b: PDLT's ``B``, ``n E[H_ik^2]``, ``i != k`` (``Bo(1, 1)``).
      dntk_p: PDLT's ``P``, ``n E[dH_{ikk} z_i]``, ``i != k`` (``2 Qh(1, z)``; ``None`` unless
        ``single_input_flow(..., dntk=...)``; so is the next).
      dntk_q: PDLT's ``Q``, ``n E[dH_{iik} z_k]``, ``i != k`` (``Qh(1, z) + Ph(z, 1)``).
      ddntk_r, ddntk_s, ddntk_t, ddntk_u: PDLT's ddNTK means ``R = n E[D^3 z_i[g_i, g_k, g_k]]``,
        ``S = n E[ddII_{iikk}]``, ``T = n E[ddII_{ikik}]``, ``U = n E[ddII_{ikki}]``, ``i != k``
        (``R(1, 1)`` ...; ``None`` unless ``single_input_flow(..., ddntk=True)``).
    """

    nngp: np.ndarray
    vertex: np.ndarray
    nngp_correction: np.ndarray
    kurtosis: np.ndarray
    coupling: np.ndarray
    ntk: np.ndarray | None = None
    ntk_correction: np.ndarray | None = None
    ntk_variance: np.ndarray | None = None
    ntk_vertex: np.ndarray | None = None
    mixed_vertex: np.ndarray | None = None
    ntk_b: np.ndarray | None = None
    dntk_p: np.ndarray | None = None
    dntk_q: np.ndarray | None = None
    ddntk_r: np.ndarray | None = None
    ddntk_s: np.ndarray | None = None
    ddntk_t: np.ndarray | None = None
    ddntk_u: np.ndarray | None = None


class _Form:
    """A bilinear form on the grid as a low-rank product ``M = U V^T`` (``U, V``: ``[grid, r]``).

    Every form here starts at zero on layer 1 and each layer maps it to ``c T^T M T`` plus a few
    outer products of grid vectors, so its rank grows by at most three per layer: carrying the
    factors makes a layer cost ``O(grid^2 r)`` (matrix-vector products with the smoothing
    kernel) instead of ``O(grid^3)`` (dense matrix products), with the same numbers up to
    rounding."""

    def __init__(self, u: np.ndarray, v: np.ndarray):
        self.u, self.v = u, v

    @classmethod
    def zero(cls, n: int) -> _Form:
        return cls(np.zeros((n, 0)), np.zeros((n, 0)))

    def mv(self, f: np.ndarray) -> np.ndarray:
        """``M f``: the form with ``f`` in its second slot, as a grid vector."""
        return self.u @ (self.v.T @ f)

    def rmv(self, f: np.ndarray) -> np.ndarray:
        """``M^T f``: the form with ``f`` in its first slot."""
        return self.v @ (self.u.T @ f)

    def __call__(self, f: np.ndarray, g: np.ndarray) -> float:
        """``f^T M g``."""
        return float((f @ self.u) @ (self.v.T @ g))

    def next(self, t: np.ndarray, scale: float, *outer: tuple[np.ndarray, np.ndarray]) -> _Form:
        """``scale T^T M T + sum_k a_k b_k^T`` for the pairs ``(a_k, b_k)`` in ``outer``."""
        us = [scale * (t.T @ self.u)] + [a[:, None] for a, _ in outer]
        vs = [t.T @ self.v] + [b[:, None] for _, b in outer]
        return _Form(np.concatenate(us, axis=1), np.concatenate(vs, axis=1))


def single_input_flow(
    arch: MLP,
    k1: float,
    *,
    points: int = 1201,
    span: float = 12.0,
    ntk=None,
    dntk=None,
    ddntk: bool = False,
):
    """:class:`SingleInput` of ``arch`` for an input with layer-1 kernel ``k1`` (any activation;
    plain layers included). ``points`` grid nodes on ``[-span, span] x sqrt(max_l K)``.
    ``ntk``: ``None``, or ``(theta1, lambda_b, lambda_w)`` (the layer-1 NTK and the ``[L+1]``
    learning-rate scalings) to carry the NTK side as well ("NTK mean shift", "NTK variance"
    above). ``dntk``: ``None``, or the kink mode (``"distributional"`` or ``"pointwise"``, as
    :func:`rgnn.perturbative`'s ``kinks``) to carry the dNTK as well ("dNTK" above; needs
    ``ntk``); ``ddntk``: the ddNTK as well ("ddNTK" above; needs ``dntk``). The bilinear forms
    are carried as low-rank factors (:class:`_Form`)."""
    if dntk is not None and ntk is None:
        raise ValueError("dntk: the dNTK recursions need the NTK side; pass ntk=(...) as well")
    if ddntk and dntk is None:
        raise ValueError("ddntk: the ddNTK recursions need the dNTK; pass dntk=... as well")
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
    ones = np.ones(n_grid)
    y2, y4 = y**2, y**4
    b = _Form.zero(n_grid)
    d = np.zeros(n_grid)
    out_v, out_d, out_k = [0.0], [0.0], [0.0]
    if ntk is not None:
        theta, lam_b, lam_w = ntk
        # s'^2 and s s' as the mean of their one-sided limits (a kink's node holds the midpoint
        # of the jump: the grid sums stay second order for relu's step)
        eps = 1e-9 * h
        with jax.enable_x64(True):
            grad = jax.vmap(jax.grad(act.fn))
            lims = [(jnp.asarray(y + e), grad(jnp.asarray(y + e))) for e in (-eps, eps)]
            p2 = np.mean([np.asarray(g_ * g_) for _, g_ in lims], axis=0)
            p4 = np.mean([np.asarray(g_**4) for _, g_ in lims], axis=0)
            ss = np.mean([np.asarray(act.fn(z_) * g_) for z_, g_ in lims], axis=0)
        if dntk is not None:
            with jax.enable_x64(True):
                grad2 = jax.vmap(jax.grad(jax.grad(act.fn)))
                sec = [(z_, g_, grad2(z_)) for z_, g_ in lims]
                # s'' s' and s s'' (pointwise: automatic differentiation, zero off a smooth
                # activation's support of s'')
                s21 = np.mean([np.asarray(c_ * g_) for _, g_, c_ in sec], axis=0)
                s20 = np.mean([np.asarray(act.fn(z_) * c_) for z_, _, c_ in sec], axis=0)
                if ddntk:  # s''^2, (s'' s')^2 and s''' s' (pointwise: zero for relu)
                    grad3 = jax.vmap(jax.grad(jax.grad(jax.grad(act.fn))))
                    s22 = np.mean([np.asarray(c_ * c_) for _, _, c_ in sec], axis=0)
                    s21sq = np.mean([np.asarray((c_ * g_) ** 2) for _, g_, c_ in sec], axis=0)
                    s31 = np.mean([np.asarray(grad3(z_) * g_) for z_, g_, _ in sec], axis=0)
            slope = act.negative_slope
            if dntk == "distributional" and act.scale_invariant and slope not in (None, 1.0):
                # s'' = (1 - a) delta(z): s'' s' = (1 - a^2) / 2 delta (the limit of smooth
                # activations, as the flow engine), s s'' = 0; the delta on the node at 0
                s21[n_grid // 2] += (1.0 - slope**2) / 2.0 / h
            qh, ph = _Form.zero(n_grid), _Form.zero(n_grid)
            out_p, out_q = [0.0], [0.0]
            if ddntk:
                rf, sf, tf, uf, jf = (_Form.zero(n_grid) for _ in range(5))
                out_r, out_s, out_t2, out_u = [0.0], [0.0], [0.0], [0.0]
        eta, eh, fo = np.zeros(n_grid), _Form.zero(n_grid), _Form.zero(n_grid)
        nu, ag, bo = np.zeros(n_grid), _Form.zero(n_grid), _Form.zero(n_grid)
        out_t, out_dh = [float(theta)], [0.0]
        out_nu, out_a, out_b, out_dd = [0.0], [0.0], [0.0], [0.0]
    for layer in range(1, arch.n_layers):
        k = ks[layer - 1]
        p = np.exp(-0.5 * y**2 / k)
        p /= p.sum()

        def sigma(f, p=p, b=b):  # Sigma = C_0 + B applied to f: diag(p) - p p^T + B
            return p * f - p * float(p @ f) + b.mv(f)

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
        sq = sigma(s2)
        qq = float(s2 @ sq)
        tsq = t.T @ sq
        b_new = b.next(t, 1.0, (cw * tsq, a), (cw * a, tsq), (cw * cw * qq * a, a))
        d_new = (
            t.T @ d + cw * float(d @ s2) * a + cw * (t_g.T @ sq) + 0.5 * cw * cw * qq * (t_gg.T @ p)
        )
        if ntk is not None:
            lw, lb = lam_w[layer], lam_b[layer]
            t_1 = kern * diff / v  # E[f'(z') | z]
            pk = p
            pss = pk * ss
            sp, eq = sigma(p2), eh.mv(s2)
            s_qq = lw * qq + cw * theta * float(p2 @ sq) + cw * float(p2 @ eq)
            tg_k = t_g.T @ pk  # f -> <T_G f>
            t_k = t.T @ pk  # f -> <T f>
            t1_k = t_1.T @ pk  # f -> <T f'>
            fss = fo.mv(ss)
            src = float(pk @ (ss * ss)) * theta + float(ss @ fss)
            eh_p2 = eh.rmv(p2)
            eta_new = (
                g * g * (t.T @ eta + cw * (t_g.T @ eq))
                + x
                * x
                * (
                    lw * (t.T @ sq + float(d @ s2) * t_k)
                    + cw * theta * (t.T @ sp + float(d @ p2) * t_k)
                    + cw * (t.T @ eh_p2 + float(eta @ p2) * t_k)
                    + cw * s_qq * tg_k
                )
                + 2 * cw * cw * x * x * src * tg_k
                + 2 * x * x * g * cw * (theta * (t_1.T @ pss) + t_1.T @ fss)
            )
            side = lw * (t.T @ sq) + cw * theta * (t.T @ sp) + cw * (t.T @ eh_p2)
            eh_new = eh.next(
                t, g * g, (g * g * cw * (t.T @ eq), tg_k), (x * x * t_k, side + cw * s_qq * tg_k)
            )
            one = theta * (t.T @ pss) + t.T @ fss
            fo_new = fo.next(
                t,
                g * g,
                (x * x * g * cw * t1_k, one),
                (x * x * g * cw * one, t1_k),
                (cw * cw * x**4 * src * t1_k, t1_k),
            )
            # the NTK variance ("NTK variance" above): y = lambda_W q + C_W Theta p is the
            # unit's share of the NTK metric H~, n_h = n Var(H~), c_p the Xi-part's source
            yv = lw * s2 + cw * theta * p2
            ap, ey = ag.mv(p2), eh.mv(yv)
            # one unit's Gaussian averages of y^2 and p^2 from the one-sided limits (a kink)
            yy = lw * lw * s2 * s2 + 2 * lw * cw * theta * s2 * p2 + (cw * theta) ** 2 * p4
            sig_yy = float(pk @ yy) - float(pk @ yv) ** 2 + b(yv, yv)
            n_h = sig_yy + 2 * cw * float(p2 @ ey) + cw * cw * float(p2 @ ap)
            bp = bo.mv(p2)
            c_p = float(pk @ p4) * theta**2 + float(p2 @ bp)
            a_a = t.T @ (ey + cw * ap)  # f -> E(Tf, y) + C_W A(Tf, p)
            b_b = theta**2 * (t.T @ (pk * p2)) + t.T @ bp  # f -> Theta^2 <p Tf> + Bo(Tf, p)
            g2, x2 = g * g, x * x
            nu_new = (
                g2 * g2 * (t.T @ nu)
                + x2 * x2 * (n_h + 2 * cw * cw * c_p) * t_k
                + 4 * cw * x2 * g2 * b_b
                + 2 * x2 * g2 * a_a
            )
            ag_new = ag.next(
                t,
                g2 * g2,
                (x2 * x2 * n_h * t_k, t_k),
                (x2 * g2 * a_a, t_k),
                (x2 * g2 * t_k, a_a),
            )
            bo_new = bo.next(
                t,
                g2 * g2,
                (cw * cw * x2 * x2 * c_p * t_k, t_k),
                (cw * x2 * g2 * b_b, t_k),
                (cw * x2 * g2 * t_k, b_b),
            )
            if dntk is not None:
                # the dNTK ("dNTK" above): xf the functional X, yf the functional Y
                xf = (
                    lw * (theta * pk * ss + fo.rmv(ss))
                    + cw * theta * (theta * pk * s21 + fo.rmv(s21))
                    + cw * qh.rmv(p2)
                )
                yf = ph.rmv(ss) + theta**2 * pk * s20 + bo.rmv(s20)
                qh_new = qh.next(
                    t,
                    g * g2,
                    (t_k, x2 * g * (t.T @ xf) + x2 * x2 * cw * float(xf @ ss) * t1_k),
                    (g2 * x2 * cw * (t.T @ qh.mv(ss)), t1_k),
                )
                ph_new = ph.next(
                    t,
                    g * g2,
                    (g * x2 * cw * (t.T @ ph.mv(p2)), t_k),
                    (t1_k, x2 * g2 * cw * (t.T @ yf) + x2 * x2 * cw * cw * float(yf @ p2) * t_k),
                )
                if ddntk:
                    # the ddNTK ("ddNTK" above): rho, sig, zf the functionals rho, sigma, Z
                    rho = (
                        lw * (theta**2 * pk * s20 + bo.rmv(s20) + ph.rmv(ss))
                        + cw * theta * (theta**2 * pk * s31 + bo.rmv(s31) + ph.rmv(s21))
                        + cw * rf.rmv(p2)
                    )
                    rf = rf.next(
                        t,
                        g2 * g2,
                        (g2 * x2 * cw * (t.T @ rf.mv(p2)), t_k),
                        (t_k, x2 * g2 * (t.T @ rho) + x2 * x2 * cw * float(rho @ p2) * t_k),
                    )
                    sig = (
                        lw * (theta**2 * pk * p2 + bo.rmv(p2))
                        + cw * theta * (theta**2 * pk * s22 + bo.rmv(s22))
                        + cw * sf.rmv(p2)
                    )
                    # sigma(p): the one-unit <p^2> from the one-sided limits of s'^4 (a kink)
                    sig_p = float(sig @ p2) + lw * theta**2 * float(pk @ (p4 - p2 * p2))
                    sf = sf.next(
                        t,
                        g2 * g2,
                        (g2 * x2 * cw * (t.T @ sf.mv(p2)), t_k),
                        (t_k, x2 * g2 * (t.T @ sig) + x2 * x2 * cw * sig_p * t_k),
                    )
                    vv = lw * ss + cw * theta * s21
                    zf = qh.mv(vv) + cw * tf.mv(p2)
                    c_t = (
                        theta * float(pk @ (vv * vv))
                        + fo(vv, vv)
                        + 2 * cw * qh(p2, vv)
                        + cw * cw * tf(p2, p2)
                    )
                    tz = x2 * g2 * (t.T @ zf)
                    tf = tf.next(t, g2 * g2, (tz, t_k), (t_k, tz + x2 * x2 * c_t * t_k))
                    c_u = theta**3 * float(pk @ s21sq) + uf(p2, p2) + 2 * jf(p2, s21)
                    js = t.T @ jf.mv(s21)  # f -> J(Tf, s''s')
                    uf = uf.next(
                        t,
                        g2 * g2,
                        (x2 * g2 * cw * (t.T @ uf.mv(p2) + js), t_k),
                        (
                            t_k,
                            x2 * g2 * cw * (t.T @ uf.rmv(p2) + js) + x2 * x2 * cw * cw * c_u * t_k,
                        ),
                    )
                    jsrc = t.T @ (jf.rmv(p2) + theta**3 * pk * s21)
                    jf = jf.next(t, g * g2 * g2, (t_k, x2 * g * g2 * cw * jsrc))
                    out_r.append(rf(ones, ones))
                    out_s.append(sf(ones, ones))
                    out_t2.append(tf(ones, ones))
                    out_u.append(uf(ones, ones))
                qh, ph = qh_new, ph_new
                q_hat, p_hat = qh(ones, y), ph(y, ones)
                out_p.append(2.0 * q_hat)
                out_q.append(q_hat + p_hat)
            nu, ag, bo = nu_new, ag_new, bo_new
            theta = x * x * (lb + lw * float(pk @ s2) + cw * float(pk @ p2) * theta) + g * g * theta
            eta, eh, fo = eta_new, eh_new, fo_new
            out_t.append(theta)
            out_dh.append(float(eta.sum()))
            out_nu.append(float(nu.sum()))
            out_a.append(ag(ones, ones))
            out_b.append(bo(ones, ones))
            out_dd.append(eh(ones, y2))
        b, d = b_new, d_new
        kk = ks[layer]
        out_v.append(b(y2, y2))
        out_d.append(float(d @ y2))
        out_k.append(float((d @ y4 - 6 * kk * (d @ y2)) / kk**2))
    kk = np.asarray(ks)
    vv = np.asarray(out_v)
    extra = {}
    if ntk is not None:
        extra = dict(
            ntk=np.asarray(out_t),
            ntk_correction=np.asarray(out_dh),
            ntk_variance=np.asarray(out_nu),
            ntk_vertex=np.asarray(out_a),
            mixed_vertex=np.asarray(out_dd),
            ntk_b=np.asarray(out_b),
        )
        if dntk is not None:
            extra.update(dntk_p=np.asarray(out_p), dntk_q=np.asarray(out_q))
        if ddntk:
            extra.update(
                ddntk_r=np.asarray(out_r),
                ddntk_s=np.asarray(out_s),
                ddntk_t=np.asarray(out_t2),
                ddntk_u=np.asarray(out_u),
            )
    return SingleInput(kk, vv, np.asarray(out_d), np.asarray(out_k), vv / kk**2, **extra)
