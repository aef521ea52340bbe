"""The O(1/n) flow of a nonlinear residual MLP on several inputs: the kernel side, the NTK side,
the dNTK and the ddNTK recursions (derived here).

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

**The NTK side** (derived here; PDLT ch. 8 has the plain recursions it reduces to, the NTK
mean, its cross correlations ``D, F`` with the preactivations and the NTK variance ``A, B``,
ch. 9 their criticality, and its appendix on residual learning only the leading-order kernels
and NTK). One unit's NTK on
the pair is ``H_{ii;ab} = Theta_ab + delta_{i;ab}``, the off-diagonal ``H_{ik;ab}``
(``i != k``), with ``p_ab = s'_a s'_b``, ``e_xy = s_x s'_y``, ``y_ab = lambda_W q_ab +
C_W Theta_ab p_ab`` (one unit's share of the NTK metric ``H~_ab = lambda_b + lambda_W (1/n)
sum_j q_ab(z_j) + C_W (1/n) sum_j p_ab(z_j) H_{jj;ab}``). :mod:`rgnn._residual_single`'s
objects carry pair indices (``i != k``; functions of one unit's ``z in R^m``):

* ``eta_ab(f) = n E[delta_{i;ab} f(z_i)]``;
  ``E_ab(f, g) = n E[delta_{i;ab} f(z_i) g(z_k)] - eta_ab(f) <g>``;
  ``F_ab(f, g) = n E[H_{ik;ab} f(z_i) g(z_k)]``;
* ``nu_(ab)(cd)(f) = n E[delta_{i;ab} delta_{i;cd} f(z_i)]``; ``A_(ab)(cd)(f, g) = n
  E[delta_{i;ab} delta_{k;cd} f(z_i) g(z_k)]``; ``Bo_(ab)(cd)(f, g) = n E[H_{ik;ab} H_{ik;cd}
  f(z_i) g(z_k)]``.

The conditional mean's expansion above in ordered indices, with ``kappa = xi^2 / 2`` and
``T_cd f = T d_c d_d f``, is ``E[f(z'_i) | l] = Tf + kappa sum_cd (T_cd f) delta G_cd + ...``
(``n Cov(F(z_i), G_cd) = C_W Sigma(F, q_cd)``). The layer gives ``delta'_{i;ab} = xi^2 (H~_ab -
Theta~_ab) + gamma^2 delta_{i;ab} + Xi_{i;ab}``, ``Xi_{i;ab} = xi^2 (w^T M^{ab} w - E) + xi
gamma (w.v^{ab} + w.v'^{ab})`` (``w`` row ``i`` of ``W``, ``M^{ab}_jm = s'_{j;a} s'_{m;b}
H_{jm;ab}``, ``v^{ab}_j = s'_{j;a} H_{ji;ab}``, ``v'^{ab}_j = s'_{j;b} H_{ij;ab}``) and
``H'_{ik;ab} = xi^2 w^T M^{ab} u + xi gamma (sum_j w_j s'_{j;a} H_{jk;ab} + sum_m u_m
s'_{m;b} H_{im;ab}) + gamma^2 H_{ik;ab}`` (``u`` row ``k``). Stein's lemma on the rows
(``d_{w_j} f(z'_i) = xi sum_c s_{j;c} d_c f``) and the unit sums split as on one input give,
with ``S_(ab)(cd) = lambda_W Sigma(q_ab, q_cd) + C_W Theta_ab Sigma(p_ab, q_cd) + C_W
E_ab(p_ab, q_cd)`` (``n Cov(H~_ab, G_cd) / C_W``), ``c_(cd;ab) = Theta_ab <e_ca e_db> +
F_ab(e_ca, e_db)`` and ``T_c f = T d_c f``:

.. math::

    \\eta'_{ab}(f) &= \\gamma^2 [\\eta_{ab}(Tf) + C_W \\kappa \\textstyle\\sum_{cd}
        E_{ab}(T_{cd} f, q_{cd})]
      + \\xi^2 \\{\\lambda_W [\\Sigma(q_{ab}, Tf) + d(q_{ab}) \\langle Tf\\rangle]
      + C_W \\Theta_{ab} [\\Sigma(p_{ab}, Tf) + d(p_{ab}) \\langle Tf\\rangle] \\\\
      &\\quad + C_W [E_{ab}(p_{ab}, Tf) + \\eta_{ab}(p_{ab}) \\langle Tf\\rangle]
      + C_W \\kappa \\textstyle\\sum_{cd} S_{(ab)(cd)} \\langle T_{cd} f\\rangle\\}
      + C_W^2 \\xi^4 \\textstyle\\sum_{cd} c_{(cd;ab)} \\langle T_{cd} f\\rangle \\\\
      &\\quad + C_W \\xi^2 \\gamma \\textstyle\\sum_c [\\Theta_{ab} \\langle (e_{ca} + e_{cb})
        T_c f\\rangle + F_{ab}(e_{ca}, T_c f) + F_{ba}(e_{cb}, T_c f)], \\\\
    E'_{ab}(f, g) &= \\gamma^2 [E_{ab}(Tf, Tg) + C_W \\kappa \\textstyle\\sum_{cd}
        E_{ab}(Tf, q_{cd}) \\langle T_{cd} g\\rangle]
      + \\xi^2 \\langle Tf\\rangle [\\lambda_W \\Sigma(q_{ab}, Tg)
      + C_W \\Theta_{ab} \\Sigma(p_{ab}, Tg) + C_W E_{ab}(p_{ab}, Tg)
      + C_W \\kappa \\textstyle\\sum_{cd} S_{(ab)(cd)} \\langle T_{cd} g\\rangle], \\\\
    F'_{ab}(f, g) &= \\gamma^2 F_{ab}(Tf, Tg) + C_W \\xi^2 \\gamma \\textstyle\\sum_c
        \\big[\\langle T_c f\\rangle (\\Theta_{ab} \\langle e_{ca} Tg\\rangle
        + F_{ab}(e_{ca}, Tg)) + \\langle T_c g\\rangle (\\Theta_{ab} \\langle e_{cb} Tf\\rangle
        + F_{ab}(Tf, e_{cb}))\\big]
      + C_W^2 \\xi^4 \\textstyle\\sum_{cd} c_{(cd;ab)} \\langle T_c f\\rangle
        \\langle T_d g\\rangle .

For the variance, ``N_(ab)(cd) = n Cov(H~_ab, H~_cd) = Sigma(y_ab, y_cd) + C_W E_ab(p_ab,
y_cd) + C_W E_cd(p_cd, y_ab) + C_W^2 A_(ab)(cd)(p_ab, p_cd)``, ``a^{X;Y}(f) = n E[(H~_X -
Theta~_X) delta_{i;Y} Tf(z_i)] = E_Y(Tf, y_X) + C_W A_(Y)(X)(Tf, p_X)``, ``b_(ab)(cd) =
Theta_ab Theta_cd <p_ac p_bd> + Bo_(ab)(cd)(p_ac, p_bd)``; ``Cov(w^T M w, w^T N w) =
(C_W / n)^2 tr(M (N + N^T))`` pairs ``(ab)`` with ``(cd)`` and with ``(dc)``, and the linear
part of ``Xi`` gives the four terms of ``beta_(ab)(cd)(f) = Theta_ab Theta_cd <(p_ac + p_ad +
p_bc + p_bd) Tf> + Bo_(ab)(cd)(p_ac, Tf) + Bo_(ab)(dc)(p_ad, Tf) + Bo_(ba)(cd)(p_bc, Tf) +
Bo_(ba)(dc)(p_bd, Tf)``:

.. math::

    \\nu'_{(ab)(cd)}(f) &= \\gamma^4 \\nu_{(ab)(cd)}(Tf) + \\xi^4 [N_{(ab)(cd)}
        + C_W^2 (b_{(ab)(cd)} + b_{(ab)(dc)})] \\langle Tf\\rangle
      + \\xi^2 \\gamma^2 [a^{ab;cd}(f) + a^{cd;ab}(f)]
      + C_W \\xi^2 \\gamma^2 \\beta_{(ab)(cd)}(f), \\\\
    A'_{(ab)(cd)}(f, g) &= \\gamma^4 A_{(ab)(cd)}(Tf, Tg)
      + \\xi^4 N_{(ab)(cd)} \\langle Tf\\rangle \\langle Tg\\rangle
      + \\xi^2 \\gamma^2 [a^{cd;ab}(f) \\langle Tg\\rangle
      + \\langle Tf\\rangle a^{ab;cd}(g)], \\\\
    Bo'_{(ab)(cd)}(f, g) &= \\gamma^4 Bo_{(ab)(cd)}(Tf, Tg)
      + C_W^2 \\xi^4 b_{(ab)(cd)} \\langle Tf\\rangle \\langle Tg\\rangle
      + C_W \\xi^2 \\gamma^2 \\big[(\\Theta_{ab} \\Theta_{cd} \\langle p_{bd} Tf\\rangle
      + Bo_{(ab)(cd)}(Tf, p_{bd})) \\langle Tg\\rangle \\\\
      &\\quad + \\langle Tf\\rangle (\\Theta_{ab} \\Theta_{cd} \\langle p_{ac} Tg\\rangle
      + Bo_{(ab)(cd)}(p_{ac}, Tg))\\big],

all zero on layer 1 (and ``B, d`` as above). One input (``m = 1``) gives
:mod:`rgnn._residual_single`'s recursions term by term. Outputs of layer ``l``: ``n (E
H_{ii;ab} - Theta_ab) = eta_ab(1)``, ``n Var(H_{ii;ab}) = nu_(ab)(ab)(1)``, PDLT's ``A_(ab)(cd) =
A_(ab)(cd)(1, 1)``, ``B_{a b c d}`` (``E[H_{ik;ac} H_{ik;bd}] = B_{abcd} / n``) ``=
Bo_(ac)(bd)(1, 1)`` and ``D_(cd)(ab) = n Cov(z_{k;c} z_{k;d}, H_{ii;ab}) = E_ab(1, z_c z_d)``.

*Unrolled* as the kernel side: ``T_l P_{l+1->r} = P_{l->r}``, ``d_c P_{l+1->r} = Gamma
P_{l+1->r} d_c`` (``Gamma = Gamma_{l+1->r}``) and ``<T P_{l+1->r} phi>_{K^{(l)}} =
<phi>_{K^{(r)}}``, so every argument the recursions reach from the outputs is ``P_{l->r}
d_D phi`` with ``D`` a multiset of inputs and ``phi`` in a fixed family: members ``one``,
``q_w``, ``p_w``, ``z_c z_d`` and ``d_cd q_w``, ``d_cd p_w`` (``B``, ``d``, ``E``), ``e_xy``
and ``d_c p_w`` (``F``); 40 on a pair. Every form is a table ``[L+1, members, L+1,
members]`` (pair components last; ``A`` and ``Bo`` on the members ``one, p_w`` only,
``nu`` on ``one``), updated by the same ``lax.scan``; a member outside the family maps to a
zero sentinel, reached only by entries no output reads (the one-input and plain checks
below would see any that were). The sources: the raw cross-layer moments ``E[d_D phi(X)
psi(Y)]`` of every member with the anchors ``psi`` in ``one, q, p, e`` at the lower layer
(``C_0`` subtracts the product of the means from the same rule, so that independent ``X`` and
``Y`` give exactly zero); the same-layer ones from :class:`rgnn.flow.moments.Moments` (exact
for relu); the Gaussian averages ``<d_D phi>_{K^{(r)}}`` of even order by Price's theorem on
the closed-form kernel maps (``<s s>``, ``<s' s'>``, ``K``; automatic differentiation, exact
through relu's kink), ``<d_c e_xy>`` by the product rule on the exact moments. For the
scale-invariant class (``s s'' = 0``) ``p_cd = d_c d_d q_cd / (1 + delta_cd)`` and ``e_xy =
d_y q_xy / (1 + delta_xy)``: every member is a derivative of the continuous ``q``, taken by
the Hermite weights on ``e`` (no step function is integrated by the rule: with ``p`` itself
the rule converged like ``1 / nodes``, 5% at 20 nodes), and the anchors ``p, e`` on ``Y`` move
onto the smooth conditional mean ``G(Y) = E[member(X) | Y]`` by Gaussian integration by parts
(``E[d_c Q G] = E[Q ((K^{-1} Y)_c G - Gamma G_{+c})]``).

**Checks of the NTK side** (``tests/test_residual.py``): one input equals
:mod:`rgnn._residual_single`'s grid flow (tanh ``1e-8``, gelu ``1e-10`` relative at 20 nodes;
relu ``1e-4``, converging algebraically with the nodes to the grid); ``gamma = 0, xi = 1`` on
three inputs equals the plain engine on every NTK field (``1e-11``); a linear activation
equals the exact residual rules of :mod:`rgnn.flow.rules`; Monte Carlo across widths
(:mod:`tools.residual_monte_carlo`).

**The dNTK** (derived here; PDLT ch. 11 has the plain recursions for ``P, Q``, written in
:mod:`rgnn.flow.rules` through the Hessian-form dNTK ``dH^_{j0;j1j2} = Hess(z_{j0})[g_{j1},
g_{j2}]``, with ``P_{0123} = Q^_{1203} + Q^_{2103}`` and ``Q_{0123} = Q^_{1023} + P^_{2013}``;
:mod:`rgnn._residual_single` has the residual recursion on one input, whose two bilinear forms
are carried here with input indices). On the inputs ``(a0, a1, a2)`` of the three slots, two
different units ``i != k`` and functions ``f, g`` of one unit's preactivations:

* ``Qh_{a0a1a2}(f, g) = n E[dH^_{i;ik;a0a1a2} f(z_i) g(z_k)]`` (so ``Q^_{a0a1a2a3} =
  Qh_{a0a1a2}(1, z_{a3})``; a plain layer has ``Qh = <f> sum_e Q^_{a0a1a2e} <d_e g>``);
* ``Ph_{a0a1a2}(f, g) = n E[dH^_{i;kk;a0a1a2} f(z_i) g(z_k)]`` (``P^_{a0a1a2a3} =
  Ph_{a0a1a2}(z_{a3}, 1)``; plain: ``sum_e P^_{a0a1a2e} <d_e f> <g>``).

The new layer's Hessian (:mod:`rgnn._residual_single`, "dNTK", with ``M_{ij;a} = xi W_ij
s'_{j;a} + gamma delta_ij``) is, on the inputs,
``Hess(z'_{i0;a0})[g'_{i1;a1}, g'_{i2;a2}] = (xi^2 lambda_W / n) [delta_{i0i1} sum_j
s'_{j;a0} s_{j;a1} sum_m M_{i2m;a2} H_{jm;a0a2} + (1 <-> 2)] + xi sum_j W_{i0j} s''_{j;a0}
(sum_m M_{i1m;a1} H_{mj;a1a0}) (sum_m M_{i2m;a2} H_{mj;a2a0}) + sum_j M_{i0j;a0} sum_{mm'}
M_{i1m;a1} M_{i2m';a2} dH^_{j;mm'}``. Multiply by ``f(z'_i) g(z'_k)`` and average over the
new weights (entries of one row paired, ``E[W_ij W_im] = C_W delta_jm / n``, or moved onto
``f`` by Stein's lemma, ``E[W_ij f(z'_i) | l] = (C_W / n) xi sum_c s_{j;c} (T_c f)(z_i)``,
``T_c f = T d_c f``), then over layer ``l`` as on one input: a sum over one unit is a
Gaussian average, over two the layer's ``F``, ``Bo``, ``Qh``, ``Ph`` (the NTK side's
``F_ab(f, g)`` and ``Bo_(ab)(cd)(f, g)`` above); three-unit correlations, ``dH^_{i;mk}`` on
three different units, and every product with a further ``O(1/sqrt n)`` factor are
``O(1/n^2)``. With ``e_xy = s_x s'_y``, ``t_xy = s''_x s'_y``, ``u_xy = s_x s''_y``,
``p_xy = s'_x s'_y``, ``Hf_ab(f, g) = Theta_ab <f g> + F_ab(f, g)`` and
``Bf_(ab)(cd)(f, g) = Theta_ab Theta_cd <f g> + Bo_(ab)(cd)(f, g)`` (the means of
``(1/n) sum_{jk} f_j g_k H_jk`` and of ``(1/n) sum_{jk} f_j g_k H_jk H_jk``), inputs
``0, 1, 2`` standing for ``a0, a1, a2``:

.. math::

    X_{012}(h) &= \\lambda_W Hf_{02}(e_{10}, h) + C_W \\Theta_{01} Hf_{02}(t_{01}, h)
      + C_W Qh_{012}(p_{01}, h), \\\\
    Y_{012;c}(h) &= Ph_{012}(e_{c0}, h) + Bf_{(01)(02)}(u_{c0}, h), \\\\
    Qh'_{012}(f, g) &= \\gamma^3 Qh_{012}(Tf, Tg) + \\gamma^2 \\xi^2 C_W \\textstyle\\sum_d
      Qh_{012}(Tf, e_{d2}) \\langle T_d g\\rangle
      + \\langle Tf\\rangle \\big[\\xi^2 \\gamma X_{012}(Tg) + \\xi^4 C_W \\textstyle\\sum_d
      X_{012}(e_{d2}) \\langle T_d g\\rangle\\big], \\\\
    Ph'_{012}(f, g) &= \\gamma^3 Ph_{012}(Tf, Tg) + \\gamma \\xi^2 C_W Ph_{012}(Tf, p_{12})
      \\langle Tg\\rangle + \\textstyle\\sum_c \\langle T_c f\\rangle \\big[\\xi^2 \\gamma^2 C_W
      Y_{012;c}(Tg) + \\xi^4 C_W^2 Y_{012;c}(p_{12}) \\langle Tg\\rangle\\big],

both zero on layer 1. The terms: ``lambda_W Hf(e_10, .)`` is the layer's weight gradient of
one unit against the other's backward path (the ``gamma`` branch of ``M``, or its ``W``
branch paired by Stein with ``g``: the ``xi^4`` terms), ``Theta_01 Hf(t_01, .)`` and
``Bf(u_c0, .)`` the branch's second derivative (``W_{i0j} s''_j`` paired with a ``W`` of
``M_{i1m}``, or moved onto ``f``), ``Qh(p_01, .)`` and ``Ph(e_c0, .)`` the lower layers'
dNTK through the branch, and the ``gamma^3``, ``gamma^2``, ``gamma`` terms the shortcut's
part of ``M`` (the unit's own lower Hessian). ``m = 1`` is :mod:`rgnn._residual_single`'s
recursion term by term (``T_1`` there is ``T_c`` here); ``gamma = 0, xi = 1`` gives PDLT's
``Q^' = C_W X_{012}(e_{32})`` and ``P^' = C_W^2 Y_{012;3}(p_{12})``, the plain rules.

*Unrolled* as the NTK side: every argument is ``P_{l->r} phi`` with ``phi`` in the family
``one``, ``z_c``, ``e_xy``, ``t_xy``, ``p_xy``, ``u_xy`` (ordered pairs; ``1 + m + 4 m^2``
members, 19 on a pair), closed under the recursions of ``F`` (which reads ``<d_c phi>``
and ``<e . P phi>``), ``Bo`` (``<phi>``, ``<p . P phi>``), ``Qh`` and ``Ph`` (``<t . P phi>``,
``<u . P phi>``). The tables ``F [L+1, U, L+1, U, m, m]``, ``Bo [..., m, m, m, m]``,
``Qh``, ``Ph [..., m, m, m]`` start at zero and are updated by one ``lax.scan``; the outputs
of layer ``l`` are ``Q^ = Qh^{(l)}[l one, l z_{a3}]`` and ``P^ = Ph^{(l)}[l z_{a3}, l one]``.
Sources: the raw moments ``E[phi(X) psi(Y)]`` of one unit's chain as for the NTK side (at
``r = l`` from :class:`rgnn.flow.moments.Moments`, the plain engine's rules, with ``<z_c
F> = sum_d K_cd <d_d F>``; at ``r > l`` the tensor rule, ``E[X_c psi(Y)] = Gamma E[Y_c
psi(Y)]`` exactly), ``<phi>`` and ``<d_c phi>`` (the distributional derivative: it comes
from Stein's lemma, an identity of integrals) from ``Moments``. Kinks (``kinks`` of
:func:`rgnn.perturbative`): ``"pointwise"`` drops ``s''`` in the Hessian (``t = u = 0``, what
automatic differentiation gives); ``"distributional"`` keeps its delta function, ``s'' s' =
(1 - a^2) / 2 delta`` as the flow engine (``u_xy = s_x s''_y`` does not vanish for ``x !=
y``). For the scale-invariant class every member is then a derivative of the continuous
``q_w = s_c s_d`` (``t_ab = d_a d_a d_b q_ab``, ``t_aa = d^3 q_aa / 4``, ``u_ab = d_b d_b
q_ab``, as ``p`` and ``e`` on the NTK side), taken by Hermite weights on the noise, and an
anchor's derivatives (up to three) are moved onto the smooth conditional mean by Gaussian
integration by parts; the same-layer moments with one delta are the flow engine's (exact),
those with two (``t`` or ``u`` against ``t`` or ``u``) are never read.

**Checks of the dNTK** (``tests/test_residual.py``): ``gamma = 0, xi = 1`` equals the plain
engine on three inputs (relu to roundoff; tanh at ``quadrature_order=96`` to roundoff, at 48
both carry their two-input rule's error, about ``1e-6`` of ``P``; relu in both kink
conventions to roundoff); one input equals :mod:`rgnn._residual_single`'s grid flow (tanh at
64 nodes and gelu to ``1e-7``; relu pointwise ``6e-5`` at 20 nodes, distributional ``5e-4``
at 20 and ``3e-5`` at 40: the kinks converge algebraically); a linear activation equals the
exact residual rules of :mod:`rgnn.flow.rules`; Monte Carlo across widths
(:mod:`tools.residual_monte_carlo`, ``--dntk --inputs 2``: relu, tanh, gelu within 3 standard
errors on every pair component, where the rotation-symmetric rules are 50 off for relu).

**The ddNTK** (derived here; PDLT ch. infinity has the plain recursions for ``R, S, T, U``,
written in :mod:`rgnn.flow.rules` through ``ddI_{i0i1i2i3} = D^3 z_{i0}[g_{i1}, g_{i2},
g_{i3}]`` and ``ddII_{i1i2i3i4} = g_{i3}^T Hess(z_{i1}) Lambda Hess(z_{i2}) g_{i4}``;
:mod:`rgnn._residual_single` ("ddNTK") has the residual recursion on one input, including the
residual-only form ``J``; here its five bilinear forms carry input indices, as ``Qh, Ph``
above). With ``w_{i;k}^{(x,y)} = Hess(z_{i;x}) g_{k;y}`` (so ``ddII_{i1i2i3i4;1234} =
w_{i1;i3}^{(1,3)} . Lambda w_{i2;i4}^{(2,4)}``), two different units ``a != b`` and the slot
inputs written ``0..4``:

* ``R_{0123}(f, g) = n E[ddI_{aabb;0123} f(z_a) g(z_b)]`` (plain ``R_{0123} = R_{0123}(1, 1)``);
* ``S_{1234}(f, g) = n E[ddII_{aabb;1234} f(z_a) g(z_b)]`` (``S_{1234}(1, 1)``);
* ``T_{1234}(f, g) = n E[ddII_{abab;1234} f(z_a) g(z_b)]`` (the rules' ``T_{1342}``);
* ``U_{1234}(f, g) = n E[ddII_{abba;1234} f(z_a) g(z_b)]`` (the rules' ``U_{1423}``);
* ``J_{xy;012}(v, u) = n E[H_{ab;xy} dH^_{a;bb;012} v(z_a) u(z_b)]`` (five inputs; zero on
  every plain layer and for ``s'' = 0``).

What carries over (PDLT ch. infinity, and the one-input recursion term by term): the new
layer's Hessian-vector product, on the inputs (``M_{bm;y} = xi W_bm s'_{m;y} + gamma
delta_bm``, ``(MH)_{bk;yx} = sum_m M_{bm;y} H_{mk;yx}``),
``w'^{(x,y)}_{a;b}`` = (A) ``xi s'_{k;x} (MH)_{bk;yx}`` on the weights ``W_ak`` (learning rate
``lambda_W / n``); (B) ``delta_ab (xi^2 lambda_W / n) sum_k e_{yx;k} grad z_{k;x}``;
(C) ``xi sum_k W_ak s''_{k;x} (MH)_{bk;yx} grad z_{k;x}``; (D) ``xi sum_k W_ak s'_{k;x}
sum_m M_{bm;y} w^{(x,y)}_{k;m}``; (E) ``gamma sum_m M_{bm;y} w^{(x,y)}_{a;m}``; and
``D^3 z'`` likewise. What is derived here: which products of two of these survive at
O(1/n) and with which inputs; every factor takes the inputs of the gradient or Hessian it
comes from, so each term of the one-input recursion acquires its indices as follows
(``e_xy = s_x s'_y``, ``t_xy = s''_x s'_y``, ``u_xy = s_x s''_y``, ``p_xy = s'_x s'_y``,
``r_xy = s'''_x s'_y``, ``c_xy = s''_x s''_y``; ``Hf``, ``Bf`` as for the dNTK, first
function on the first input of each ``H``):

* ``J`` (pairing ``W_ai`` of ``H'_{ab;xy}``'s term ``xi gamma W_ai s'_{i;x} H_{ib;xy}``
  with ``W_ai`` of the branch's part of ``dH'^_{a;bb;012}``, whose lower factors are
  ``gamma^2 H_{bi;10} H_{bi;20}`` and ``gamma^2 dH^_{i;bb;012}``;
  ``i = b`` gives the ``Theta`` term):

  .. math::

      J'_{xy;012}(v, u) = \\gamma^5 J_{xy;012}(Tv, Tu) + \\xi^2 \\gamma^3 C_W \\langle Tv\\rangle
        \\big[\\Theta_{xy}\\Theta_{10}\\Theta_{20} \\langle t_{0x}\\, Tu\\rangle
        + J_{xy;012}(p_{x0}, Tu)\\big];

* ``U`` ((D)(D) both ``W``'s paired across the two factors; (D)(E), (E)(D) one pairing;
  (C)(D) and (C)(E): the ``J`` terms, (i) and (ii) of the one-input derivation; (C)(C) the
  ``Theta`` source; (A)(A) vanishes, the two weight parts sit on different rows):

  .. math::

      U'_{1234}(f, g) &= \\gamma^4 U(Tf, Tg) + \\xi^2\\gamma^2 C_W \\big[(U(p_{14}, Tg)
        + J_{31;214}(Tg, t_{14})) \\langle Tf\\rangle + (U(Tf, p_{23})
        + J_{42;132}(Tf, t_{23})) \\langle Tg\\rangle\\big] \\\\
      &+ \\xi^4 C_W^2 \\big[\\Theta_{12}\\Theta_{13}\\Theta_{24} \\langle t_{14} t_{23}\\rangle
        + U(p_{14}, p_{23}) + J_{31;214}(p_{23}, t_{14}) + J_{42;132}(p_{14}, t_{23})\\big]
        \\langle Tf\\rangle \\langle Tg\\rangle

  (``U`` without indices is ``U_{1234}``);
* ``S``, with ``sigma_{1234}(h) = lambda_W Bf_{(31)(42)}(h, p_{12}) + C_W Theta_{12}
  Bf_{(31)(42)}(h, c_{12}) + C_W S_{1234}(p_{12}, h)`` (``h`` on unit ``b``):

  .. math::

      S'_{1234}(f, g) = \\gamma^4 S(Tf, Tg) + \\gamma^2 \\xi^2 C_W S(Tf, p_{34}) \\langle Tg\\rangle
        + \\langle Tf\\rangle \\big[\\xi^2 \\gamma^2 \\sigma_{1234}(Tg)
        + \\xi^4 C_W \\sigma_{1234}(p_{34}) \\langle Tg\\rangle\\big];

* ``T``, with ``v_13 = lambda_W e_31 + C_W Theta_13 t_13``, ``v_24 = lambda_W e_42 + C_W
  Theta_24 t_24`` ((B) plus the part of (C) whose ``(MH)`` pairs its own ``W``),
  ``Z(h) = Qh_{132}(h, v_24) + C_W T_{1234}(h, p_24)``, ``Z~(h) = Qh_{241}(h, v_13) + C_W
  T_{1234}(p_13, h)``:

  .. math::

      T'_{1234}(f, g) &= \\gamma^4 T(Tf, Tg) + \\xi^2\\gamma^2 \\big[Z(Tf) \\langle Tg\\rangle
        + \\langle Tf\\rangle \\tilde Z(Tg)\\big] \\\\
      &+ \\xi^4 \\big[Hf_{12}(v_{13}, v_{24}) + C_W Qh_{241}(p_{24}, v_{13})
        + C_W Qh_{132}(p_{13}, v_{24}) + C_W^2 T(p_{13}, p_{24})\\big]
        \\langle Tf\\rangle \\langle Tg\\rangle;

* ``R``, with ``rho_{0123}(h) = lambda_W [Bf_{(02)(03)}(u_{10}, h) + Ph_{023}(e_{10}, h)]
  + C_W Theta_{01} [Bf_{(02)(03)}(r_{01}, h) + Ph_{023}(t_{01}, h)] + C_W R_{0123}(p_{01}, h)``:

  .. math::

      R'_{0123}(f, g) = \\gamma^4 R(Tf, Tg) + \\gamma^2 \\xi^2 C_W R(Tf, p_{23}) \\langle Tg\\rangle
        + \\langle Tf\\rangle \\big[\\xi^2 \\gamma^2 \\rho_{0123}(Tg)
        + \\xi^4 C_W \\rho_{0123}(p_{23}) \\langle Tg\\rangle\\big],

all zero on layer 1. No Stein move of a new weight onto ``f`` or ``g`` survives (every
``W`` is paired inside the product), so only ``T`` (never ``T_c``) acts on the insertions,
unlike the dNTK. Checks of the bookkeeping by hand: one input (every index equal) is
:mod:`rgnn._residual_single`'s recursion term by term; ``gamma = 0, xi = 1`` is the plain
rules of :mod:`rgnn.flow.rules` term by term (``Bf -> Theta Theta <..> + B <..><..>``,
``Ph_{023}(e_10, p_23) -> sum_e P^_{023e} D_e(s'_0 s_1) <s'_2 s'_3>``, ``Hf_{12}(v_13, v_24)
-> lambda_W^2 [Theta_12 <s'_1 s_3 s'_2 s_4> + F(s'_1 s_3, s'_2 s_4)] + ...``,
``J = 0``); a linear activation (``s'' = s''' = 0``: ``R = U = J = 0``) gives the residual
rules' ``S', T'`` of :mod:`rgnn.flow.rules` (``Bf_{(31)(42)}(h, p_12) -> Theta_13 Theta_24
<h> + B_1234 <h>`` with ``p = 1``). *Unrolled*, the family grows by ``r_xy``, ``c_xy`` and the
one-unit four-factor averages ``<t_14 t_23>``; ``J`` is a table over five inputs
(``2^5 = 32`` components on a pair).

Outputs in the plain engine's layout (its ``T_{abcd} = T_{1342}``, ``U_{abcd} = U_{1423}``):
``ddntk_r[abcd] = R_{abcd}(1, 1)``, ``ddntk_s[abcd] = S_{abcd}(1, 1)``, ``ddntk_t[abcd] =
T_{adbc}(1, 1)``, ``ddntk_u[abcd] = U_{acdb}(1, 1)`` (the rules' ``U`` source ``Theta_ac
Theta_ad Theta_cb <s''_a s'_b s''_c s'_d>`` is the ``Theta_12 Theta_13 Theta_24 <t_14 t_23>``
above).

*Unrolled* in the dNTK's scan (:func:`dntk_set_flow` with ``ddntk=True``): the family grows
by ``r_xy`` and ``c_xy`` (``1 + m + 6 m^2`` members, 27 on a pair; ``F``, ``Bo``, ``Qh``,
``Ph`` are carried on all of them), ``R, S, T, U`` are tables ``[L+1, U, L+1, U, m, m, m, m]``
and ``J`` ``[..., m^5]``, all updated by :func:`_ddntk_update` in the same ``lax.scan``; the
same-layer moments come from :class:`rgnn.flow.moments.Moments` (``<t_14 t_23>`` among them),
the cross-layer ones from the tensor rule as for the dNTK. Kinked activations: pointwise only
(``t = u = r = c = 0``; the distributional ddNTK does not exist, as for a plain MLP).

**Checks of the ddNTK** (``tests/test_residual.py``): one input equals
:mod:`rgnn._residual_single`'s grid flow (``J`` included; depth 3, gamma 0.8, xi 0.6: gelu at
20 nodes and tanh at 64 to all 8 printed digits, relu pointwise at 40 nodes ``3e-4`` of ``S``
on the last layer, the kinks); ``gamma = 0, xi = 1`` on three inputs equals the plain engine
(gelu ``3e-16``, relu ``1e-14`` absolute at scale 200); a linear activation equals the exact
residual rules (``1e-14``); Monte Carlo on two inputs (:mod:`tools.residual_monte_carlo`,
``--dntk --ddntk --inputs 2``, depth 3, widths 16/32/64, 1024 networks, weighted fit ``a +
b/n``): every pair component of ``R, S, T, U`` within 2.5 standard errors for gelu (gamma 0.8,
xi 0.6) and tanh (gamma 0.8, xi 0.6 and per-layer gamma 0.9, -0.5, xi 0.5, 1.1).

**Sets of three and four inputs** (the full four-index layout, :func:`rgnn.perturbative` with
``full=True``; derived here). The flows above are written for a set of ``m`` inputs; the full
layout runs them on every four-subset of the inputs (every index tuple of four inputs lies in
one) and scatters each set's ``[m, m, m, m]`` statistics into ``[L+1, N, N, N, N]``. Only the
cross-layer moments need care: on ``m = 4`` the tensor rule above has ``2 m = 8`` dimensions.
But every member of the three families (``q_w``, ``P_u q_w``; ``d_D phi_w``, ``e_xy``; the
dNTK kinds ``s^(i)_x s^(j)_y`` and ``z_c``) and every anchor is supported on at most two
inputs (``P_u q_w`` and ``d_D phi_w`` vanish unless ``u``, ``D`` lie in ``w``), so each entry
is ``E[f(X_w) h(Y_v)]`` with ``w``, ``v`` pairs of the set, and ``(X_w, Y_v)`` is a
4-variable Gaussian: ``Y_v ~ N(0, K^(i)_vv)``, and the regression of ``X_w = g Y_w + e_w`` on
``Y_v`` gives ``X_w = M Y_v + e'``, ``M = g K^(i)_wv (K^(i)_vv)^-1``, ``e' ~ N(0, S')``
independent of ``Y_v``, ``S' = K^(r)_ww - g^2 K^(i)_wv (K^(i)_vv)^-1 K^(i)_vw`` (``g`` the
shortcut product between the layers; ``S'`` is ``S_ww`` plus ``g^2`` times a Schur
complement, positive definite). ``w = v`` is ``M = g``, ``S' = S``: one unit's chain on the
pair, the pair layout's computation. :func:`_restricted` evaluates the pair routine on each
ordered combination of pairs (``6 x 6 = 36`` on four inputs, each the 4-variable rule of one
pair) and gathers the table by static maps (:func:`_family_maps`): an entry whose member and
anchor fit in one pair from that pair's own rule, the others from the first pairs holding
each. The raw moments of the NTK side and the dNTK are assembled as each combination's
covariance plus the product of the means (each mean from the pair of its own function), so
that the flows' ``C_0`` is the combination's own, exactly zero for independent ``X`` and
``Y`` (``gamma = 0``), as on one pair; the ``z_c`` rows stay exact (``g E[Y_c h(Y)]``, the
same-layer moments of the set). The same-layer moments on three and four inputs are
:class:`rgnn.flow.moments.Moments`' (the plain engine's rule, ``quadrature_order_multi``).
Kinked activations keep the ``2 m``-variable rule of their Hermite weights (the chain rule
with a matrix ``M`` is not written here), and :func:`rgnn.perturbative` refuses them in the
full layout.

**Checks of the full layout** (``tests/test_residual_full.py``): the pairs' tables equal the
``2 m``-variable rule for a polynomial activation (both exact; four inputs with a quadratic at
5 nodes, three with a cubic at 7, every family: ``2e-14`` relative); a cubic activation's full
layout restricted to each pair equals the pair layout (EXACT); ``gamma = 0, xi = 1`` equals the
plain engine's full layout; the identity as a smooth custom activation equals the exact linear
residual rules; Monte Carlo on four inputs (:mod:`tools.residual_monte_carlo` ``--full
--inputs 4 --dntk --ddntk``, depth 3, gamma 0.8, xi 0.6, widths 16/32/64, 1024 networks,
weighted fit ``a + b/n``): tanh and gelu, every component of every field within 3.3 standard
errors, the components on four distinct inputs (off every pair) of ``V, A, D, B, P, Q, R, S,
T, U`` within 2.93. With tanh or gelu the full layout's pair components and the pair layout differ
by the cross-layer rule's error (gelu, depth 2, 20 nodes: ``1e-5`` of ``D``; ``1e-8`` at 40):
a single input's moments come from different pairs' rules.
"""

from __future__ import annotations

import itertools
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
        if act.scale_invariant and a == b:
            slope = flow_moments._slope(act)
            out.append(0.5 * (1 + slope * slope) * k[a, a])
        elif act.scale_invariant:
            out.append(act.maps(k[a, a], k[b, b], k[a, b])[0])
        else:
            out.append(_rule_average(act.fn, k, a, b, rules))
    return jnp.stack(out)


def _rule_average(f, k, a: int, b: int, rules):
    """``<f(z_a) f(z_b)>_K`` for an elementwise ``f``: the one-input rule when ``a == b``, else
    the two-input rule in Cholesky coordinates."""
    if a == b:
        x, w = rules["1"]
        return jnp.sum(w * f(jnp.sqrt(k[a, a]) * x) ** 2)
    x, w = rules["2"]
    s1 = jnp.sqrt(k[a, a])
    c = k[a, b] / s1
    s2 = jnp.sqrt(k[b, b] - c * c)
    za = s1 * x[:, None]
    zb = c * x[:, None] + s2 * x[None, :]
    return jnp.einsum("i,j,ij->", w, w, f(za) * f(zb))


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


def _cross_layer(act, ki, kr, g, x, w, restrict=None):
    """``C_0`` of ``q_w`` and ``P_u q_w`` at layer ``r`` (smoothed down to layer ``i``) with
    ``q_v`` at layer ``i < r``: ``[nu + nu * nu, nu]``.

    ``Y = z^(i) ~ N(0, K^(i))`` and ``X = g Y + e``, ``e ~ N(0, S)``, ``S = K^(r) - g^2 K^(i)``
    independent of ``Y`` (``g`` the product of the shortcuts between the layers): a
    tensor-product rule (nodes ``x``, weights ``w`` per dimension) on the ``2 m`` standard
    normal variables of ``Y = chol(K^(i)) y`` and ``e = chol(S) t``. ``P_u`` on ``X`` is the
    Hermite weight of Price's theorem, ``E[d_e d_f F(X) | Y] = E[F(X) ((S^-1 e)_e (S^-1 e)_f
    - S^-1_ef) | Y]`` with ``S^-1 e = chol(S)^-T t`` (no derivative of ``sigma``: a kinked
    activation needs no delta function); a smooth activation: :func:`_cross_layer_smooth`,
    on a set of three or more inputs from the pairs' 4-variable integrals (:func:`_restricted`;
    ``restrict=False``: the ``2 m``-variable rule, a check)."""
    if not act.scale_invariant:
        if _restricts(ki, restrict):
            return _restricted(
                lambda kyy, mm, sx: _cross_layer_smooth(act, kyy, mm, sx, x, w), "kernel", ki, kr, g
            )
        return _cross_layer_smooth(act, ki, g, kr - g * g * ki, x, w)
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
    mom = jnp.einsum("yf,yv,y->fv", inner, qy, wq)  # [nu + nu nu, 1 + nu]
    ey = qy.T @ wq  # [1 + nu]
    return mom[:, 1:] - mom[:, :1] * ey[None, 1:]


def _restricts(ki, restrict) -> bool:
    """Whether a smooth cross-layer table of the set with kernel ``ki [m, m]`` comes from its
    pairs (:func:`_restricted`): ``restrict``, or by default on three or more inputs."""
    return ki.shape[0] >= 3 if restrict is None else bool(restrict)


def _chain(kyy, mm, sx, x, w):
    """The tensor-product rule of one cross-layer moment: ``Y = chol(kyy) y`` on ``p``
    inputs and ``X = mm Y + chol(sx) t`` (``mm`` a matrix, or a scalar ``g`` for ``g Y``),
    nodes ``x`` and weights ``w`` per dimension: ``(wq [Q], y [Q, p], xx [Q (y), Q (t), p])``."""
    p = kyy.shape[0]
    grid = jnp.stack(jnp.meshgrid(*([x] * p), indexing="ij"), -1).reshape(-1, p)  # [Q, p]
    wq = jnp.prod(jnp.stack(jnp.meshgrid(*([w] * p), indexing="ij"), -1), -1).reshape(-1)
    y = grid @ jnp.linalg.cholesky(kyy).T
    e = grid @ jnp.linalg.cholesky(sx).T
    my = mm * y if jnp.ndim(mm) == 0 else y @ mm.T
    return wq, y, my[:, None, :] + e[None, :, :]


def _cross_layer_smooth(act, kyy, mm, sx, x, w):
    """:func:`_cross_layer` for a smooth activation, on the chain ``X = mm Y + e``, ``e ~ N(0,
    sx)``, ``Y ~ N(0, kyy)`` (:func:`_chain`; ``mm = g``, ``sx = S`` is one unit's chain on
    one set of inputs, a matrix ``mm`` the restriction of a larger set, :func:`_restricted`):
    the derivatives themselves (no Hermite weight, whose cancellations grow with the
    condition number of ``S``)."""
    m = kyy.shape[0]
    units, nu, *_ = _tables(m)
    wq, y, xx = _chain(kyy, mm, sx, x, w)
    sy = act.fn(y)
    iu = np.array(units, np.int32)
    qy = jnp.concatenate([jnp.ones_like(y[:, :1]), sy[:, iu[:, 0]] * sy[:, iu[:, 1]]], -1)
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


def _gram(act, kyy, mm, sx, x, w, order: int):
    """Every two-factor product of one unit's values at the upper layer of a cross-layer
    moment, integrated over the noise. On the chain ``X = mm Y + e`` (:func:`_chain`), the
    basis ``f_k(X_c)``, ``f = (s, s', ..., s^(order), z, 1)`` (column ``k p + c``,
    automatic derivatives), and at each node ``y`` its Gram matrix over the noise nodes:
    ``G[y, k p + c, l p + d] = sum_t w_t f_k(X_c) f_l(X_d)``, one batched matrix product for
    all products. Measured on one pair at 20 nodes (tanh, float64, one call, loaded 2-core
    machine): the NTK side's moments 84.5 -> 17.2 ms, the ddNTK family's 31.6 -> 17.9 ms,
    against a gather of the products a member uses or a ``[Q, Q, U]`` array of the family;
    the kernel side's dozen products stay one fused pass each (8.3 ms, 13.5 ms with the Gram
    matrix). Returns ``(wq [Q], y [Q, p], G [Q, B p, B p])``, ``B = order + 3``."""
    wq, y, xx = _chain(kyy, mm, sx, x, w)
    b = jnp.concatenate(_derivatives3(act, xx)[: order + 1] + [xx, jnp.ones_like(xx)], -1)
    return wq, y, jnp.einsum("ytj,ytk->yjk", b * wq[None, :, None], b)


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


# ----------------------------------------------------------------------------- the NTK side
def _ntk_members(m: int):
    """The static family of the NTK side on a set of ``m`` inputs (module docstring, "The NTK
    side"): members ``(kind, w, D)``, the function ``d_D phi_w`` with ``phi`` one of
    ``one`` (the constant), ``q`` (``s_c s_d``), ``p`` (``s'_c s'_d``), ``zz`` (``z_c z_d``)
    on an unordered pair ``w = (c, d)``, or ``e`` (``s_x s'_y``) on an ordered pair, and ``D``
    a sorted tuple of the inputs differentiated. Returns ``(members, index)``; the zero
    sentinel (a member outside the family) is ``len(members)``."""
    units = _units(m)
    ordered = [(x, y) for x in range(m) for y in range(m)]
    members = [("one", (), ())]
    members += [("q", w, ()) for w in units]
    members += [("p", w, ()) for w in units]
    members += [("zz", w, ()) for w in units]
    members += [("q", w, d) for w in units for d in units]
    members += [("p", w, d) for w in units for d in units]
    members += [("e", w, ()) for w in ordered]
    members += [("p", w, (c,)) for w in units for c in range(m)]
    index = {mem: i for i, mem in enumerate(members)}
    return members, index


def _ntk_tables(m: int):
    """Static index tables of :func:`_ntk_members`: ``deriv1 [M, m]`` and ``deriv2 [M, m, m]``
    (the member ``d_c (member)``, ``d_c d_d (member)``, or the sentinel ``M``) and the members
    ``mq, mp, mzz, me [m, m]`` of ``q_cd``, ``p_cd``, ``z_c z_d`` and ``e_xy``."""
    members, index = _ntk_members(m)
    n_m = len(members)
    deriv1 = np.full((n_m + 1, m), n_m, np.int32)
    deriv2 = np.full((n_m + 1, m, m), n_m, np.int32)
    for i, (kind, w, d) in enumerate(members):
        if kind == "one":
            continue
        for c in range(m):
            deriv1[i, c] = index.get((kind, w, tuple(sorted(d + (c,)))), n_m)
            for e in range(m):
                deriv2[i, c, e] = index.get((kind, w, tuple(sorted(d + (c, e)))), n_m)
    mq = np.zeros((m, m), np.int32)
    mp, mzz, me = mq.copy(), mq.copy(), mq.copy()
    for c in range(m):
        for d in range(m):
            w = (min(c, d), max(c, d))
            mq[c, d] = index[("q", w, ())]
            mp[c, d] = index[("p", w, ())]
            mzz[c, d] = index[("zz", w, ())]
            me[c, d] = index[("e", (c, d), ())]
    return members, deriv1, deriv2, mq, mp, mzz, me


def _anchors(m: int):
    """The anchor functions on the lower layer of a cross-layer moment: ``one``, ``q_cd``,
    ``p_cd`` (unordered pairs), ``e_xy`` (ordered): ``[(kind, w)]`` and the index tables
    ``aq, ap, ae [m, m]``."""
    units = _units(m)
    ordered = [(x, y) for x in range(m) for y in range(m)]
    anchors = [("one", ())] + [("q", w) for w in units] + [("p", w) for w in units]
    anchors += [("e", w) for w in ordered]
    index = {a: i for i, a in enumerate(anchors)}
    aq = np.zeros((m, m), np.int32)
    ap, ae = aq.copy(), aq.copy()
    for c in range(m):
        for d in range(m):
            w = (min(c, d), max(c, d))
            aq[c, d], ap[c, d], ae[c, d] = index[("q", w)], index[("p", w)], index[("e", (c, d))]
    return anchors, aq, ap, ae


def _member_basis(m: int):
    """``[M, 6, 6, m, m]``: every member as a combination of the products ``f_k(z_c) f_l(z_d)``
    of the basis ``(s, s', s'', s^(3), z, 1)`` (the product rule of :func:`_member_terms`; the
    smooth path of :func:`_ntk_cross`)."""
    members, *_ = _ntk_tables(m)
    out = np.zeros((len(members), 6, 6, m, m))
    for i, (kind, w, d) in enumerate(members):
        if kind == "one":
            out[i, 5, 5, 0, 0] = 1.0
            continue
        (o1, p1), (o2, p2) = _factor_orders(kind)
        for k1, k2 in _member_terms(kind, w, d):
            idx = []
            for o, poly, k in ((o1, p1, k1), (o2, p2, k2)):
                if poly:
                    idx.append(4 if k == 0 else (5 if k == 1 else None))
                else:
                    idx.append(o + k if o + k <= 3 else None)
            if None not in idx:
                out[i, idx[0], idx[1], w[0], w[1]] += 1.0
    return out


def _factor_orders(kind):
    """The two factors of a member's base function as ``(order of sigma, polynomial?)``."""
    return {
        "q": ((0, False), (0, False)),
        "p": ((1, False), (1, False)),
        "e": ((0, False), (1, False)),
        "zz": ((0, True), (0, True)),
    }[kind]


def _member_terms(kind, w, d):
    """``d_D (f_1(z_c) f_2(z_d))`` by the product rule: ``[(k_1, k_2)]``, the extra derivative
    orders of the two factors, one entry per assignment of the indices of ``D`` to a factor
    whose input it is."""
    terms = []
    for assign in np.ndindex(*((2,) * len(d))):
        if all(w[side] == j for side, j in zip(assign, d, strict=True)):
            terms.append((sum(1 for s in assign if s == 0), sum(1 for s in assign if s == 1)))
    return terms


def _anchor_values(act, y, anchors):
    """``[Q, A]``: the anchors on the lower layer's grid ``y [Q, m]``."""
    s = act.fn(y)
    ds = jax.vmap(jax.grad(act.fn))(y.reshape(-1)).reshape(y.shape)
    cols = []
    for kind, w in anchors:
        if kind == "one":
            cols.append(jnp.ones_like(y[:, 0]))
        elif kind == "q":
            cols.append(s[:, w[0]] * s[:, w[1]])
        elif kind == "p":
            cols.append(ds[:, w[0]] * ds[:, w[1]])
        else:
            cols.append(s[:, w[0]] * ds[:, w[1]])
    return jnp.stack(cols, -1)


def _ntk_cross(act, ki, kr, g, x, w, restrict=None):
    """Raw cross-layer moments ``E[(d_D phi)(X) psi(Y)]`` of every member (``[M, A]``) with
    every anchor, ``Y = z^(i)``, ``X = z^(r) = g Y + e``, ``e ~ N(0, S)`` (as
    :func:`_cross_layer`: a tensor rule on ``Y = chol(K^(i)) y`` and ``e = chol(S) t``; the
    derivatives of a smooth activation directly, :func:`_ntk_cross_smooth`, the Hermite
    weights of Price's theorem on ``e`` for the scale-invariant class; ``restrict`` as for
    :func:`_cross_layer`)."""
    if not act.scale_invariant:
        if _restricts(ki, restrict):
            return _restricted(
                lambda kyy, mm, sx: _ntk_cross_smooth(act, kyy, mm, sx, x, w), "ntk", ki, kr, g
            )
        return _ntk_cross_smooth(act, ki, g, kr - g * g * ki, x, w)
    m = ki.shape[0]
    grid = jnp.stack(jnp.meshgrid(*([x] * m), indexing="ij"), -1).reshape(-1, m)
    wq = jnp.prod(jnp.stack(jnp.meshgrid(*([w] * m), indexing="ij"), -1), -1).reshape(-1)
    s = kr - g * g * ki
    lk = jnp.linalg.cholesky(ki)
    ls = jnp.linalg.cholesky(s)
    y = grid @ lk.T
    e = grid @ ls.T
    xx = g * y[:, None, :] + e[None, :, :]  # [Q (y), Q (t), m]
    return _ntk_cross_kinked(act, ki, g, grid, wq, y, xx, s, lk, ls)


def _ntk_cross_smooth(act, kyy, mm, sx, x, w):
    """:func:`_ntk_cross` for a smooth activation on the chain ``X = mm Y + e`` (as
    :func:`_cross_layer_smooth`): every member is a sum of products ``f_k(X_c) f_l(X_d)`` of
    the basis ``(s, s', s'', s^(3), z, 1)``: all of them from the Gram matrix of
    :func:`_gram`, then a static combination."""
    m = kyy.shape[0]
    anchors, *_ = _anchors(m)
    wq, y, gram = _gram(act, kyy, mm, sx, x, w, order=3)  # basis (s, s', s'', s^(3), z, 1)
    mb = _member_basis(m)
    k_, l_, c_, d_ = np.nonzero(np.any(mb != 0, axis=0))  # the products some member uses
    prods = gram[:, k_ * m + c_, l_ * m + d_]  # [Q (y), P]
    inner = prods @ jnp.asarray(mb[:, k_, l_, c_, d_].T, gram.dtype)  # [Q (y), M]
    av = _anchor_values(act, y, anchors)  # [Q, A]
    return jnp.einsum("ym,ya,y->ma", inner, av, wq)


_HERMITE_ORDER = 4
"""Highest total order of the Hermite weights in the kinked cross-layer moments (the
statistics need at most four derivatives of ``q``)."""


def _multisets(m: int, order: int):
    """Sorted index tuples of length ``0..order`` over ``m`` inputs."""
    out = [()]
    for n in range(1, order + 1):
        out += [t for t in itertools.combinations_with_replacement(range(m), n)]
    return out


def _hermite_weights(m: int, s, ls, grid):
    """The multi-index Hermite weights of Price's theorem on the noise ``e = L_S grid`` of
    covariance ``S`` (``ls`` its Cholesky factor): ``He_{D+c} = (S^-1 e)_c He_D - sum_{j in D}
    S^-1_cj He_{D-j}`` for every sorted index tuple ``D`` up to :data:`_HERMITE_ORDER`.
    Returns ``(sets, hw [H, Q])``, ``hw[i]`` the weight of ``sets[i]`` at each node (built at
    trace time: the recursion over tuples is a fixed, small unrolled set of products)."""
    sets = _multisets(m, _HERMITE_ORDER)
    t = jax.scipy.linalg.solve_triangular(ls.T, grid.T, lower=False)  # [m, Q]: S^-1 e
    sinv = jnp.linalg.inv(s)
    herm = {(): jnp.ones_like(t[0])}
    for d in sets[1:]:
        c, rest = d[-1], d[:-1]
        h = t[c] * herm[rest]
        for j in range(len(rest)):
            h = h - sinv[c, rest[j]] * herm[rest[:j] + rest[j + 1 :]]
        herm[d] = h
    return sets, jnp.stack([herm[d] for d in sets])


def _ntk_cross_kinked(act, ki, g, grid, wq, y, xx, s, lk, ls):
    """:func:`_ntk_cross` for the scale-invariant class, with no discontinuous integrand:
    there ``s s'' = 0``, so ``p_cd = d_c d_d q_cd / (1 + delta_cd)`` and ``e_xy = d_y q_xy /
    (1 + delta_xy)``, and every member is a derivative of the continuous ``q`` (or of ``z_c
    z_d``), taken by the Hermite weights of Price's theorem on ``e`` (``E[d_D F(X) | Y] =
    E[F(X) He_D(e; S) | Y]``, ``He_{D+c} = (S^-1 e)_c He_D - sum_{j in D} S^-1_cj
    He_{D-j}``); the anchors ``p`` and ``e`` on ``Y`` are moved onto the smooth conditional
    mean ``G(Y) = E[member(X) | Y]`` by Gaussian integration by parts, ``E[d_c Q(Y) G(Y)] =
    E[Q(Y) ((K^-1 Y)_c G(Y) - d_c G(Y))]`` with ``d_c G = g G_{+c}`` (the member with one
    more derivative)."""
    m = ki.shape[0]
    members, *_ = _ntk_tables(m)
    anchors, *_ = _anchors(m)
    units = _units(m)
    uid = {w: i for i, w in enumerate(units)}
    sets, hw = _hermite_weights(m, s, ls, grid)
    sid = {t: i for i, t in enumerate(sets)}
    sx = act.fn(xx)
    base = [jnp.ones_like(xx[..., 0])]
    base += [sx[..., a] * sx[..., b] for a, b in units]
    base += [xx[..., a] * xx[..., b] for a, b in units]
    base = jnp.stack(base, -1)  # [Q, Q, 1 + 2 nu]: one, q_w, z_c z_d
    inner = jnp.einsum("ytb,ht,t->ybh", base, hw, wq)  # [Q (y), base, H]

    # every (member, extra derivative) as (coefficient, base, Hermite index): one gather
    extras = [()] + [(c,) for c in range(m)] + units
    xid = {e: i for i, e in enumerate(extras)}
    coef = np.zeros((len(members), len(extras)))
    bidx = np.zeros((len(members), len(extras)), np.int32)
    hidx = np.zeros((len(members), len(extras)), np.int32)
    for i, (kind, w, d) in enumerate(members):
        for j, extra in enumerate(extras):
            if kind == "one":
                b, dd, c = 0, (), 1.0
            elif kind in ("q", "zz"):
                b, dd, c = (1 if kind == "q" else 1 + len(units)) + uid[w], d, 1.0
            elif kind == "p":
                b, dd, c = 1 + uid[w], d + w, 1.0 / (1.0 + (w[0] == w[1]))
            else:  # e_xy
                x_, y_ = w
                b = 1 + uid[(min(x_, y_), max(x_, y_))]
                dd, c = d + (y_,), 1.0 / (1.0 + (x_ == y_))
            full = tuple(sorted(dd + extra))
            if len(full) <= _HERMITE_ORDER and not (kind == "one" and extra):
                coef[i, j], bidx[i, j], hidx[i, j] = c, b, sid[full]
    powers = jnp.stack([g ** len(e) for e in extras])
    gm = inner[:, bidx, hidx] * (jnp.asarray(coef, inner.dtype) * powers[None, :])[None]
    # the anchors as weights on (y, extra): E[psi(Y) G(Y)] = sum_y sum_x W[y, a, x] G[y, x]
    sy = act.fn(y)
    hy = jax.scipy.linalg.solve_triangular(lk.T, grid.T, lower=False).T  # [Q, m]: K^-1 Y
    kinv = jnp.linalg.inv(ki)
    cols = []
    for akind, aw in anchors:
        col = [jnp.zeros_like(wq)] * len(extras)
        if akind == "one":
            col[0] = jnp.ones_like(wq)
        elif akind == "q":
            col[0] = sy[:, aw[0]] * sy[:, aw[1]]
        elif akind == "p":  # d_c d_d q_cd / (1 + delta_cd), by parts twice
            c, d = aw
            qa = sy[:, c] * sy[:, d] / (1.0 + (c == d))
            col[0] = qa * (hy[:, c] * hy[:, d] - kinv[c, d])
            col[xid[(d,)]] = col[xid[(d,)]] - qa * hy[:, c]
            col[xid[(c,)]] = col[xid[(c,)]] - qa * hy[:, d]
            col[xid[(c, d)]] = col[xid[(c, d)]] + qa
        else:  # e_xy = d_y q_xy / (1 + delta_xy), by parts once
            x_, y_ = aw
            qa = sy[:, x_] * sy[:, y_] / (1.0 + (x_ == y_))
            col[0] = qa * hy[:, y_]
            col[xid[(y_,)]] = -qa
        cols.append(jnp.stack(col, -1))
    wy = jnp.stack(cols, 1)  # [Q, A, X]
    return jnp.einsum("yax,ymx,y->ma", wy, gm, wq)


def _derivatives3(act, z):
    """``(sigma, sigma', sigma'', sigma''')`` at ``z`` (automatic differentiation)."""
    f = act.fn
    fs = [f]
    for _ in range(3):
        fs.append(jax.grad(fs[-1]))
    flat = z.reshape(-1)
    return [f(z)] + [jax.vmap(h)(flat).reshape(z.shape) for h in fs[1:]]


def _ntk_same(act, k, rules):
    """Raw same-layer moments ``E[phi(Y) psi(Y)]`` (``[M, A]``) of the members ``one``, ``q``,
    ``p``, ``e`` with every anchor, from the exact one- and two-input moments of
    :class:`rgnn.flow.moments.Moments` (the others, never needed on one layer, are zero)."""
    m = k.shape[0]
    members, *_ = _ntk_tables(m)
    anchors, *_ = _anchors(m)
    mom = flow_moments.Moments(act, k, rules, pointwise=False, kmax=2)
    kinds = ("q", "p", "e")
    order = {"q": (0, 0), "p": (1, 1), "e": (0, 1)}
    two = jnp.stack([mom.e(order[u], "ab").x for u in kinds])  # [3, m, m]
    four = jnp.stack([mom.e(order[u] + order[v], "cdab").x for u in kinds for v in kinds])
    flat = jnp.concatenate([jnp.zeros((1,), k.dtype), jnp.ones((1,), k.dtype)])
    flat = jnp.concatenate([flat, two.reshape(-1), four.reshape(-1)])
    n2 = two.size
    idx = np.zeros((len(members), len(anchors)), np.int32)  # 0: zero, 1: one
    for i, (kind, w, d) in enumerate(members):
        for j, (akind, aw) in enumerate(anchors):
            if d or kind == "zz":
                continue
            if kind == "one" and akind == "one":
                idx[i, j] = 1
            elif kind == "one" or akind == "one":
                u, (x_, y_) = (akind, aw) if kind == "one" else (kind, w)
                idx[i, j] = 2 + np.ravel_multi_index((kinds.index(u), x_, y_), two.shape)
            else:
                pos = (3 * kinds.index(kind) + kinds.index(akind), w[0], w[1], aw[0], aw[1])
                idx[i, j] = 2 + n2 + np.ravel_multi_index(pos, four.shape)
    return flat[idx]


def _avg_map(act, kf, m: int, rules):
    """``[q (nu), p (nu), zz (nu)]``: ``<s_c s_d>``, ``<s'_c s'_d>`` and ``<z_c z_d>`` on every
    unordered pair as functions of the full ``[m, m]`` kernel ``kf`` (symmetrized, so that
    ``d/dK_cd = (1/2) <d_c d_d ...>`` by Price's theorem): closed forms for the
    scale-invariant class, the one- and two-input trapezoid rules otherwise."""
    units, *_ = _tables(m)
    k = 0.5 * (kf + kf.T)
    q = _qmap(act, k[np.triu_indices(m)], m, rules)

    def ds(z):  # s' elementwise
        return jax.vmap(jax.grad(act.fn))(z.reshape(-1)).reshape(z.shape)

    out = []
    for a, b in units:
        if act.scale_invariant and a == b:
            slope = flow_moments._slope(act)
            out.append(0.5 * (1 + slope * slope) + 0 * k[a, a])
        elif act.scale_invariant:
            out.append(act.maps(k[a, a], k[b, b], k[a, b])[1])
        else:
            out.append(_rule_average(ds, k, a, b, rules))
    zz = jnp.stack([k[a, b] for a, b in units])
    return jnp.concatenate([q, jnp.stack(out), zz])


def _ntk_averages(act, k, rules):
    """Gaussian averages of the members at one layer (kernel ``k [m, m]``): ``av0 [M+1]``
    (``<d_D phi>``), ``av1 [M+1, m]`` (``<d_c d_D phi>``, where needed), ``av2 [M+1, m, m]``
    and ``av4 [M+1, m, m, m, m]`` (``<d_c d_d d_D phi>``, ``<d^4 phi>`` of the members with
    ``D = ()``). Even orders by Price's theorem on :func:`_avg_map` (automatic
    differentiation of the closed forms: exact through relu's kink), the first derivative of
    ``e`` by the product rule on the exact moments of :class:`rgnn.flow.moments.Moments`."""
    m = k.shape[0]
    members, *_ = _ntk_tables(m)
    units, nu, *_ = _tables(m)
    uid = {w: i for i, w in enumerate(units)}
    f = partial(_avg_map, act, m=m, rules=rules)
    val = f(k)
    jac = 2 * jax.jacfwd(f)(k)  # [3 nu, m, m]
    hess = 4 * jax.jacfwd(jax.jacfwd(f))(k)  # [3 nu, m, m, m, m]
    mom = flow_moments.Moments(act, k, rules, pointwise=False, kmax=2)
    s_s2 = mom.e((0, 2), "ab").x  # <s_x s''_y>
    base = {"q": 0, "p": nu, "zz": 2 * nu}
    z0 = jnp.zeros((), k.dtype)
    a0, a1, a2, a4 = [], [], [], []
    eye = jnp.eye(m, dtype=k.dtype)
    for kind, w, d in members:
        z1, z2, z4 = (jnp.zeros((m,) * r, k.dtype) for r in (1, 2, 4))
        if kind == "one":
            a0.append(jnp.ones((), k.dtype))
            a1.append(z1), a2.append(z2), a4.append(z4)
            continue
        if kind == "e":
            x, y = w
            pv = val[nu + uid[(min(x, y), max(x, y))]]
            a0.append(z0)
            a1.append(eye[x] * pv + eye[y] * s_s2[x, y])
            a2.append(z2), a4.append(z4)
            continue
        b = base[kind] + uid[w]
        if len(d) == 0:
            a0.append(val[b]), a1.append(z1), a2.append(jac[b]), a4.append(hess[b])
        elif len(d) == 1:
            a0.append(z0), a1.append(jac[b][:, d[0]]), a2.append(z2), a4.append(z4)
        else:
            a0.append(jac[b][d[0], d[1]]), a1.append(z1)
            a2.append(hess[b][d[0], d[1]]), a4.append(z4)
    a0.append(z0), a1.append(jnp.zeros((m,), k.dtype))
    a2.append(jnp.zeros((m, m), k.dtype)), a4.append(jnp.zeros((m,) * 4, k.dtype))
    return jnp.stack(a0), jnp.stack(a1), jnp.stack(a2), jnp.stack(a4)


def ntk_set_flow(act, cw, gamma, xi, lam_w, k, theta, rules, cross):
    """The NTK side of one set of ``m`` inputs (module docstring, "The NTK side"):
    ``(DH [R, m, m], D [R, m, m, m, m], V [R, m, m, m, m], DG [R, m, m])``: ``n`` times the NTK
    mean shift ``eta_ab(1)``, PDLT's ``D`` as ``E_ab(1, z_c z_d)`` at ``[l, c, d, a, b]``, and
    the kernel side's vertex and kernel correction recomputed on the larger family (a check),
    for the leading-order kernels ``k [R, m, m]``, NTKs ``theta [R, m, m]``, the factors
    ``gamma, xi [R]`` and weight learning-rate scalings ``lam_w [R]`` of each layer (the
    bias scalings enter through ``theta`` only)."""
    n_layers, m = k.shape[0], k.shape[1]
    dtype = k.dtype
    members, deriv1, deriv2, mq, mp, mzz, me = _ntk_tables(m)
    anchors, aq, ap, ae = _anchors(m)
    n_m = len(members) + 1  # with the zero sentinel
    n_a = len(anchors)
    gp = _shortcut_products(gamma)
    av0, av1, av2, av4 = jax.vmap(lambda kk: _ntk_averages(act, kk, rules))(k)
    same = jax.vmap(lambda kk: _ntk_same(act, kk, rules))(k)  # [R, M-1, A]
    pairs = np.array([(i, r) for i in range(n_layers - 1) for r in range(i + 1, n_layers)])
    xq, wq = cross
    crossed = jax.lax.map(
        lambda a: _ntk_cross(act, a[0], a[1], a[2], xq, wq),
        (k[pairs[:, 0]], k[pairs[:, 1]], gp[pairs[:, 0], pairs[:, 1]]),
    )  # [P, M-1, A]
    raw = jnp.zeros((n_layers - 1, n_layers, n_m, n_a), dtype)
    steps = np.arange(n_layers - 1)
    raw = raw.at[steps, steps, :-1].set(same[:-1])
    raw = raw.at[pairs[:, 0], pairs[:, 1], :-1].set(crossed)
    # C_0: the raw moment less the product of the means (both from the same rule)
    # C_0: the raw moment less the product of the means, both from the same rule (so that
    # independent X and Y give exactly zero)
    c0 = raw - raw[..., :1] * raw[:, :, :1, :]
    d2 = jnp.asarray(deriv2)
    d1 = jnp.asarray(deriv1)
    # the sub-family of the variance: one, p_w; sp [m, m] the sub-index of p_xy
    units = _units(m)
    sub = np.array([0] + [mp[a, b] for a, b in units], np.int32)
    sp = np.zeros((m, m), np.int32)
    for u, (a, b) in enumerate(units):
        sp[a, b] = sp[b, a] = 1 + u

    def step(carry, inp):
        bt, dt, et, ee, ft, at, bo, nu = carry
        i, c0i, rawi = inp
        x2 = xi[i + 1] ** 2
        g = gamma[i + 1]
        kap = 0.5 * x2
        lw = lam_w[i + 1]
        th = theta[i]
        g1 = gp[i + 1]  # [R]
        al2 = kap * (g1**2)[:, None, None, None] * av2  # [R, M, m, m]
        t1 = g1[:, None, None] * av1  # [R, M, m]
        b_i = jnp.take(bt, i, axis=2)  # [R, M, M]: B(r f, i h)
        sigq = c0i[:, :, aq] + b_i[:, :, mq]  # [R, M, m, m]
        sigp = c0i[:, :, ap] + b_i[:, :, mp]
        s_qq = jnp.take(sigq, i, axis=0)[mq]  # [m, m (cd), m, m (ef)]: Sigma(q_cd, q_ef)
        s_pq = jnp.take(sigq, i, axis=0)[mp]  # Sigma(p_ab, q_cd)
        e_i = jnp.take(jnp.take(ee, i, axis=0), i, axis=1)  # [M, M, m, m] E(i h, i h')
        f_i = jnp.take(jnp.take(ft, i, axis=0), i, axis=1)
        e_ir = jnp.take(ee, i, axis=0)  # [M, R, M, m, m] E(i h, r f)
        e_ri = jnp.take(ee, i, axis=2)  # [R, M, M, m, m] E(r f, i h)
        f_ir = jnp.take(ft, i, axis=0)
        f_ri = jnp.take(ft, i, axis=2)
        ar = np.arange(m)
        # S_(ab)(cd) = n Cov(H~_ab, G_cd) / C_W
        e_pq = e_i[
            mp[:, :, None, None], mq[None, None], ar[:, None, None, None], ar[None, :, None, None]
        ]
        s_hq = lw * s_qq + cw * th[:, :, None, None] * s_pq + cw * e_pq
        raw_i = jnp.take(rawi, i, axis=0)  # [M, A] same layer
        ee_same = raw_i[me[:, :, None, None], ae[None, None]]  # [x, y, x', y']: <e_xy e_x'y'>
        # c_(cd;ab) = Theta_ab <e_ca e_db> + F_ab(e_ca, e_db)
        ce = th[None, None] * jnp.einsum("cadb->cdab", ee_same) + jnp.einsum(
            "cadbab->cdab", f_i[me[:, :, None, None], me[None, None]]
        )
        # ---- B and d (the kernel side on the larger family)
        one = jnp.einsum("sGcd,rFcd->rFsG", al2, sigq)
        bn = (
            bt
            + cw * (one + jnp.transpose(one, (2, 3, 0, 1)))
            + cw * cw * jnp.einsum("rFcd,cdef,sGef->rFsG", al2, s_qq, al2)
        )
        d_q = jnp.take(dt, i, axis=0)[mq]
        d_p = jnp.take(dt, i, axis=0)[mp]
        sq2 = jnp.einsum("rFcdcd->rF", sigq[:, d2])
        dn = (
            dt
            + cw * jnp.einsum("cd,rFcd->rF", d_q, al2)
            + cw * kap * (g1**2)[:, None] * sq2
            + 0.5
            * cw
            * cw
            * kap
            * kap
            * (g1**4)[:, None]
            * jnp.einsum("rFcdef,cdef->rF", av4, s_qq)
        )
        # ---- eta_ab(f)
        e_fq = jnp.einsum("rFcdcdab->rFab", e_ri[:, d2][:, :, :, :, mq])  # E(d_cd f, q_cd)
        eta_i = jnp.take(et, i, axis=0)  # [M, m, m]
        eta_p = eta_i[mp, ar[:, None], ar[None, :]]  # eta_ab(p_ab)
        e_pf = jnp.einsum("abrFab->rFab", e_ir[mp])  # E_ab(p_ab, r f)
        r_e = rawi[:, :, ae]  # [R, M, m, m]: <e_xy  P f>
        r1 = rawi[:, d1]  # [R, M, m (c), A]
        ra = jnp.einsum("rFcca->rFca", r1[..., ae])  # <e_ca  d_c f>  [R, M, c, a]
        f1 = f_ir[me][:, :, :, d1]  # [x, y, R, M, c, m, m]: F(i e_xy, r d_c f)
        fa = jnp.einsum("carFcab->rFcab", f1)  # F_ab(e_ca, d_c f)
        fb = jnp.einsum("cbrFcba->rFcab", f1)  # F_ba(e_cb, d_c f)
        gam_part = jnp.einsum(
            "r,rFcab->rFab",
            g1,
            th[None, None, None] * (ra[:, :, :, :, None] + ra[:, :, :, None, :]) + fa + fb,
        )
        etan = (
            g * g * (et + cw * kap * (g1**2)[:, None, None, None] * e_fq)
            + x2
            * (
                lw * (sigq + d_q[None, None] * av0[:, :, None, None])
                + cw * th[None, None] * (sigp + d_p[None, None] * av0[:, :, None, None])
                + cw * (e_pf + eta_p[None, None] * av0[:, :, None, None])
                + cw * jnp.einsum("abcd,rFcd->rFab", s_hq, al2)
            )
            + cw
            * cw
            * x2
            * x2
            * jnp.einsum("cdab,rFcd->rFab", ce, (g1**2)[:, None, None, None] * av2)
            + cw * x2 * g * gam_part
        )
        # ---- E_ab(f, g)
        e_fqv = jnp.einsum("rFcdab,sGcd->rFsGab", e_ri[:, :, mq], al2)
        side = (
            lw * sigq
            + cw * th[None, None] * sigp
            + cw * e_pf
            + cw * jnp.einsum("abcd,sGcd->sGab", s_hq, al2)
        )
        en = g * g * (ee + cw * e_fqv) + x2 * jnp.einsum("rF,sGab->rFsGab", av0, side)
        # ---- F_ab(f, g)
        # Theta_ab <e_ca P g> + F_ab(e_ca, g): [c, a, b] for every (s, g)
        fe_g = jnp.einsum("casGab->sGcab", f_ir[me])  # F_ab(e_ca, s g)
        fg_e = jnp.einsum("rFdbab->rFdab", f_ri[:, :, me])  # F_ab(r f, e_db)
        re_ca = r_e[..., None] * th[None, None, None]  # <e_ca g> Theta_ab
        u_g = re_ca + fe_g  # [S, G, c, a, b]
        re_db = r_e[:, :, :, None, :] * th[None, None, None]
        v_f = re_db + fg_e  # [R, F, d, a, b]
        fn = (
            g * g * ft
            + cw
            * x2
            * g
            * (jnp.einsum("rFc,sGcab->rFsGab", t1, u_g) + jnp.einsum("sGd,rFdab->rFsGab", t1, v_f))
            + cw * cw * x2 * x2 * jnp.einsum("cdab,rFc,sGd->rFsGab", ce, t1, t1)
        )
        # keep the sentinel's rows and columns zero
        mask = jnp.asarray(np.arange(n_m) < n_m - 1, dtype)
        bn = bn * mask[None, :, None, None] * mask[None, None, None, :]
        dn = dn * mask[None, :]
        etan = etan * mask[None, :, None, None]
        en = en * mask[None, :, None, None, None, None] * mask[None, None, None, :, None, None]
        fn = fn * mask[None, :, None, None, None, None] * mask[None, None, None, :, None, None]
        # ---- the NTK variance: nu_(ab)(cd)(1), A_(ab)(cd)(f, g), Bo_(ab)(cd)(f, g) on the
        # sub-family {one, p_w} ("NTK variance" in the module docstring)
        g2, x4 = g * g, x2 * x2
        s_av = av0[:, sub]  # [R, S]
        ee_s = ee[:, sub]  # [R, S, R, M, m, m]: E_Y(r f, s h)
        e_sq = jnp.take(ee_s, i, axis=2)[:, :, mq]  # [R, S, x1, x2, y1, y2]: E_Y(f, q_X)
        e_sp = jnp.take(ee_s, i, axis=2)[:, :, mp]
        a_i = jnp.take(at, i, axis=2)  # [R, S, S, m, m, m, m]: A_(Y)(X)(r f, i h)
        a_fp = jnp.einsum("rFxyabxy->rFxyab", a_i[:, :, sp])  # A_(Y)(X)(f, p_X) at [X, Y]
        # a_A^(X;Y)(f) = E_Y(f, y_X) + C_W A_(Y)(X)(f, p_X), y_X = lambda_W q_X + C_W Theta_X p_X
        a_a = lw * e_sq + cw * th[None, None, :, :, None, None] * e_sp + cw * a_fp
        # N_(ab)(cd) = n Cov(H~_ab, H~_cd)
        sig_i = {
            (u, v): jnp.take(sv, i, axis=0)[mu]
            for u, mu in (("q", mq), ("p", mp))
            for v, sv in (("q", sigq), ("p", sigp))
        }  # Sigma(u_ab, v_cd) [a, b, c, d]
        tab, tcd = th[:, :, None, None], th[None, None]
        s_yy = (
            lw * lw * sig_i["q", "q"]
            + lw * cw * tcd * sig_i["q", "p"]
            + lw * cw * tab * sig_i["p", "q"]
            + cw * cw * tab * tcd * sig_i["p", "p"]
        )
        e_i_all = jnp.take(jnp.take(ee, i, axis=0), i, axis=1)  # [M, M, m, m]
        ar4 = np.arange(m)
        a_, b_, c_, d_ = np.meshgrid(ar4, ar4, ar4, ar4, indexing="ij")
        e_py = (
            lw * e_i_all[mp[a_, b_], mq[c_, d_], a_, b_]
            + cw * th[c_, d_] * e_i_all[mp[a_, b_], mp[c_, d_], a_, b_]
        )  # E_ab(p_ab, y_cd) [a, b, c, d]
        a_ii = jnp.take(a_i, i, axis=0)  # [S, S, m, m, m, m]
        a_pp = a_ii[sp[a_, b_], sp[c_, d_], a_, b_, c_, d_]
        n_h = s_yy + cw * e_py + cw * jnp.transpose(e_py, (2, 3, 0, 1)) + cw * cw * a_pp
        bo_i = jnp.take(jnp.take(bo, i, axis=0), i, axis=1)  # [S, S, m, m, m, m] at layer i
        pp_same = raw_i[mp[:, :, None, None], ap[None, None]]  # <p_xy p_zw> [x, y, z, w]
        # c_(ab)(cd) = Theta_ab Theta_cd <p_ac p_bd> + Bo_(ab)(cd)(p_ac, p_bd)
        c_b = (
            th[a_, b_] * th[c_, d_] * pp_same[a_, c_, b_, d_]
            + bo_i[sp[a_, c_], sp[b_, d_], a_, b_, c_, d_]
        )
        # w-side Theta_ab Theta_cd <p_ac g> + Bo_(ab)(cd)(p_ac, g) and u-side (f, p_bd)
        rp = rawi[:, sub][:, :, ap]  # [R, S, x, y]: <p_xy  P g>
        bo_pg = jnp.take(bo, i, axis=0)  # [S, R, S, m, m, m, m]: Bo(i h, s g)
        bo_gp = jnp.take(bo, i, axis=2)  # [R, S, S, m, m, m, m]: Bo(r f, i h)
        w_b = (th[a_, b_] * th[c_, d_])[None, None] * rp[:, :, a_, c_] + jnp.moveaxis(
            bo_pg[sp[a_, c_], :, :, a_, b_, c_, d_], (0, 1, 2, 3), (2, 3, 4, 5)
        )
        u_b = (th[a_, b_] * th[c_, d_])[None, None] * rp[:, :, b_, d_] + bo_gp[
            :, :, sp[b_, d_], a_, b_, c_, d_
        ]
        atn = (
            g2 * g2 * at
            + x4 * jnp.einsum("rF,sG,abcd->rFsGabcd", s_av, s_av, n_h)
            + x2
            * g2
            * (
                jnp.einsum("rFcdab,sG->rFsGabcd", a_a, s_av)
                + jnp.einsum("rF,sGabcd->rFsGabcd", s_av, a_a)
            )
        )
        bon = (
            g2 * g2 * bo
            + cw * cw * x4 * jnp.einsum("rF,sG,abcd->rFsGabcd", s_av, s_av, c_b)
            + cw
            * x2
            * g2
            * (
                jnp.einsum("rFabcd,sG->rFsGabcd", u_b, s_av)
                + jnp.einsum("rF,sGabcd->rFsGabcd", s_av, w_b)
            )
        )
        # nu(1): the unit's own NTK variance (f = one, read at layer i)
        a_one = jnp.take(a_a, i, axis=0)[0]  # [X, Y]
        p_bar = av0[i][mp]  # <p_xy>
        tt = th[a_, b_] * th[c_, d_]
        bo_one = bo_pg[:, i, 0]  # [S (p), m, m, m, m]: Bo_(..)(..)(i p, 1)
        lin = (
            tt * (p_bar[a_, c_] + p_bar[a_, d_] + p_bar[b_, c_] + p_bar[b_, d_])
            + bo_one[sp[a_, c_], a_, b_, c_, d_]
            + bo_one[sp[a_, d_], a_, b_, d_, c_]
            + bo_one[sp[b_, c_], b_, a_, c_, d_]
            + bo_one[sp[b_, d_], b_, a_, d_, c_]
        )
        nun = (
            g2 * g2 * nu
            + x4 * n_h
            + x2 * g2 * (a_one + jnp.transpose(a_one, (2, 3, 0, 1)))
            + cw * cw * x4 * (c_b + c_b[a_, b_, d_, c_])
            + cw * x2 * g2 * lin
        )
        j = i + 1
        zzi = mzz
        out = (
            jnp.take(etan, j, axis=0)[0],
            jnp.take(jnp.take(en, j, axis=0), j, axis=1)[0][zzi],  # [c, d, a, b]
            jnp.take(jnp.take(bn, j, axis=0), j, axis=1)[zzi][:, :, zzi],
            jnp.take(dn, j, axis=0)[zzi],
            nun,
            jnp.take(jnp.take(atn, j, axis=0), j, axis=1)[0, 0],
            jnp.take(jnp.take(bon, j, axis=0), j, axis=1)[0, 0],
        )
        return (bn, dn, etan, en, fn, atn, bon, nun), out

    z = jnp.zeros
    n_s = len(sub)
    init = (
        z((n_layers, n_m, n_layers, n_m), dtype),
        z((n_layers, n_m), dtype),
        z((n_layers, n_m, m, m), dtype),
        z((n_layers, n_m, n_layers, n_m, m, m), dtype),
        z((n_layers, n_m, n_layers, n_m, m, m), dtype),
        z((n_layers, n_s, n_layers, n_s) + (m,) * 4, dtype),
        z((n_layers, n_s, n_layers, n_s) + (m,) * 4, dtype),
        z((m,) * 4, dtype),
    )
    _, outs = jax.lax.scan(step, init, (jnp.asarray(steps), c0, raw))
    return tuple(jnp.concatenate([jnp.zeros((1,) + o.shape[1:], dtype), o]) for o in outs)


@partial(jax.jit, static_argnames=("act",))
def ntk_sets_flow(act, cw, gamma, xi, lam_w, ks, thetas, rules, cross):
    """:func:`ntk_set_flow` on every set's kernels and NTKs ``ks, thetas [S, R, m, m]``
    (:func:`set_kernels`; one compilation per number of sets): ``DH [R, S, m, m]``,
    ``D [R, S, m, m, m, m]``, ``nu``, ``A``, ``Bo [R, S, m, m, m, m]`` (``n`` times each; the
    kernel side's check values are dropped)."""

    def one(a):
        dh, dd, _, _, nu, aa, bo = ntk_set_flow(act, cw, gamma, xi, lam_w, a[0], a[1], rules, cross)
        return dh, dd, nu, aa, bo

    out = jax.lax.map(one, (ks, thetas), batch_size=min(8, ks.shape[0]))
    return tuple(jnp.moveaxis(v, 0, 1) for v in out)


# ----------------------------------------------------------------------------- the dNTK
_DNTK_KINDS = {"e": (0, 1), "t": (2, 1), "p": (1, 1), "u": (0, 2)}
"""The two-factor members of the dNTK side, ``s^(i)_x s^(j)_y`` on an ordered pair ``(x, y)``:
``e = s s'``, ``t = s'' s'``, ``p = s' s'``, ``u = s s''`` (derivative orders ``(i, j)``)."""

_DDNTK_KINDS = {**_DNTK_KINDS, "r": (3, 1), "c": (2, 2)}
"""The ddNTK side's family: the dNTK side's, then ``r = s''' s'`` and ``c = s'' s''`` (module
docstring, "The ddNTK"); the dNTK side's members keep their indices."""


def _dntk_members(m: int, table=_DNTK_KINDS):
    """The static family of the dNTK side on a set of ``m`` inputs (module docstring, "The
    dNTK"): ``one``, then ``z_c`` (``m``), then ``e_xy, t_xy, p_xy, u_xy`` (``m^2`` each,
    ordered pairs, row-major). Returns ``(size, mz [m], {kind: [m, m]})`` (member indices)."""
    mz = 1 + np.arange(m, dtype=np.int32)
    kinds = {}
    start = 1 + m
    for kind in table:
        kinds[kind] = (start + np.arange(m * m, dtype=np.int32)).reshape(m, m)
        start += m * m
    return start, mz, kinds


def _dntk_kinds(act, pointwise: bool, table=_DNTK_KINDS):
    """The two-factor kinds that are not identically zero: ``t`` and ``u`` carry ``sigma''``,
    which the pointwise convention drops for a kinked activation."""
    if act.scale_invariant and pointwise:
        return ("e", "p")
    return tuple(table)


def _dntk_same(act, k, rules, pointwise: bool, table=_DNTK_KINDS):
    """Same-layer moments of the dNTK family at one layer (kernel ``k [m, m]``), from
    :class:`rgnn.flow.moments.Moments` (the plain engine's rules: exact polar integrals for the
    scale-invariant class): ``same [U, U]`` (``<f g>``), ``av0 [U]`` (``<f>``) and ``av1 [U, m]``
    (``<d_c f>``, the distributional derivative: Stein's lemma; relu's by integration by
    parts). ``<z_c F> = sum_d K_cd <d_d F>`` (Stein), ``<z_c z_d> = K_cd``."""
    m = k.shape[0]
    n_u, _, _ = _dntk_members(m, table)
    live = _dntk_kinds(act, pointwise, table)
    smooth = not act.scale_invariant
    kmax = (4 if table is _DDNTK_KINDS else 3) if smooth else 2
    mom = flow_moments.Moments(act, k, rules, pointwise=pointwise, kmax=kmax)
    zero2 = jnp.zeros((m, m), k.dtype)
    zero4 = jnp.zeros((m,) * 4, k.dtype)
    two = {u: mom.e(table[u], "xy").x if u in live else zero2 for u in table}
    dd = {u: mom.d(table[u], "cxy").x if u in live else jnp.zeros((m,) * 3, k.dtype) for u in table}
    kinds = list(table)
    rows = []
    one = jnp.ones((1, 1), k.dtype)
    rows.append(
        jnp.concatenate(
            [one, jnp.zeros((1, m), k.dtype)] + [two[u].reshape(1, -1) for u in kinds], axis=1
        )
    )
    zk = {u: jnp.einsum("cd,dxy->cxy", k, dd[u]).reshape(m, -1) for u in kinds}
    rows.append(jnp.concatenate([jnp.zeros((m, 1), k.dtype), k] + [zk[u] for u in kinds], 1))
    for u in kinds:
        blocks = [two[u].reshape(-1, 1), zk[u].T]
        for v in kinds:
            # a kinked activation's products of two delta functions (t, u with t, u) are not
            # read by the recursions: left zero
            deltas = act.scale_invariant and u in "tu" and v in "tu"
            if u in live and v in live and not deltas:
                f4 = mom.e(table[u] + table[v], "xyab").x
            else:
                f4 = zero4
            blocks.append(f4.reshape(m * m, m * m))
        rows.append(jnp.concatenate(blocks, axis=1))
    same = jnp.concatenate(rows, axis=0)
    av0 = same[0]
    av1 = jnp.concatenate(
        [jnp.zeros((1, m), k.dtype), jnp.eye(m, dtype=k.dtype)]
        + [jnp.transpose(dd[u], (1, 2, 0)).reshape(m * m, m) for u in kinds],
        axis=0,
    )
    assert same.shape == (n_u, n_u)
    return same, av0, av1


def _dntk_values(der, z, kinds, table=_DNTK_KINDS):
    """``[..., U]``: the dNTK family at the points ``z [..., m]`` from the derivatives
    ``der`` (``[s, s', s'', s''']``, each ``[..., m]``); kinds not in ``kinds`` are zero."""
    m = z.shape[-1]
    cols = [jnp.ones_like(z[..., :1]), z]
    for kind, (i, j) in table.items():
        if kind in kinds:
            v = der[i][..., :, None] * der[j][..., None, :]
        else:
            v = jnp.zeros(z.shape + (m,), z.dtype)
        cols.append(v.reshape(z.shape[:-1] + (m * m,)))
    return jnp.concatenate(cols, axis=-1)


def _dntk_specs(kind, a: int, b: int):
    """A member ``kind_ab`` of the scale-invariant class (``s s'' = 0``) as ``coef *
    d_D q_w``: ``(coef, w, D)`` (``w`` the unordered pair of the base ``q_w = s_c s_d``,
    ``None`` for the constant), or ``None`` (zero). ``e_ab = d_b q_ab``, ``p_ab = d_a d_b
    q_ab``, ``t_ab = s''_a s'_b = d_a d_a d_b q_ab``, ``u_ab = s_a s''_b = d_b d_b q_ab``
    (``a != b``); on the diagonal ``e, p`` are halved, ``t_aa = d^3 q_aa / 4`` (the
    distributional ``s s''' = -s' s''``, so ``d^3 q = 4 s' s''``) and ``u_aa = 0``: the
    distributional derivatives of the flow engine, ``s'' s' = (1 - a^2) / 2 delta``."""
    w = (min(a, b), max(a, b))
    if kind == "one":
        return 1.0, None, ()
    if a == b:
        return {"e": (0.5, w, (a,)), "p": (0.5, w, (a, a)), "t": (0.25, w, (a, a, a))}.get(kind)
    table = {"e": (b,), "p": (a, b), "t": (a, a, b), "u": (b, b)}
    return 1.0, w, table[kind]


def _dntk_cross_kinked(act, ki, kr, g, x, w, live):
    """:func:`_dntk_cross` for the scale-invariant class: every member is ``coef * d_D q_w``
    (:func:`_dntk_specs`), taken by the Hermite weights of Price's theorem on ``e`` (as
    :func:`_ntk_cross_kinked`: no step or delta function is integrated by the rule), and every
    anchor ``coef * d_D q_w(Y)`` is moved onto the smooth conditional mean ``G(Y) =
    E[member(X) | Y]`` by Gaussian integration by parts, ``E[d_c Q(Y) G(Y)] = E[Q(Y) (A_c
    G)(Y)]``, ``A_c G = (K^-1 Y)_c G - g G_{+c}`` (``G_{+c}``: the member with one more
    derivative), applied ``|D|`` times (up to three). ``live``: the kinds not identically
    zero. The combinations the recursions read fit the Hermite order 4 (a member of order 3
    meets anchors of order at most 1, and so on); the others are left zero."""
    m = ki.shape[0]
    n_u, _, kinds = _dntk_members(m)
    units = _units(m)
    uid = {u: i for i, u in enumerate(units)}
    grid = jnp.stack(jnp.meshgrid(*([x] * m), indexing="ij"), -1).reshape(-1, m)
    wq = jnp.prod(jnp.stack(jnp.meshgrid(*([w] * m), indexing="ij"), -1), -1).reshape(-1)
    s = kr - g * g * ki
    lk = jnp.linalg.cholesky(ki)
    ls = jnp.linalg.cholesky(s)
    y = grid @ lk.T
    xx = g * y[:, None, :] + (grid @ ls.T)[None, :, :]
    sets, hw = _hermite_weights(m, s, ls, grid)
    sid = {t: i for i, t in enumerate(sets)}
    sx = act.fn(xx)
    base = jnp.stack([jnp.ones_like(xx[..., 0])] + [sx[..., a] * sx[..., b] for a, b in units], -1)
    inner = jnp.einsum("ytb,ht,t->ybh", base, hw, wq)  # [Q (y), 1 + nu, H]
    # the family as (coef, base, D); z and the dead kinds are zero rows
    specs = [None] * n_u
    specs[0] = (1.0, None, ())
    for kind in live:
        for a in range(m):
            for b in range(m):
                specs[kinds[kind][a, b]] = _dntk_specs(kind, a, b)
    extras = _multisets(m, 3)
    xid = {e: i for i, e in enumerate(extras)}
    coef = np.zeros((n_u, len(extras)))
    bidx = np.zeros((n_u, len(extras)), np.int32)
    hidx = np.zeros((n_u, len(extras)), np.int32)
    for i, spec in enumerate(specs):
        if spec is None:
            continue
        c, wb, d = spec
        for j, extra in enumerate(extras):
            full = tuple(sorted(d + extra))
            if (wb is None and extra) or len(full) > _HERMITE_ORDER:
                continue  # the constant's derivatives vanish; beyond the order: unread
            coef[i, j] = c
            bidx[i, j] = 0 if wb is None else 1 + uid[wb]
            hidx[i, j] = sid[full]
    powers = jnp.stack([g ** len(e) for e in extras])
    gm = inner[:, bidx, hidx] * (jnp.asarray(coef, inner.dtype) * powers[None, :])[None]
    # the anchors as weights on (y, extra), by parts: terms (coef, h-monomial, extra)
    sy = act.fn(y)
    hy = jax.scipy.linalg.solve_triangular(lk.T, grid.T, lower=False).T  # [Q, m]: K^-1 Y
    kinv = jnp.linalg.inv(ki)
    cols = []
    for spec in specs:
        col = [jnp.zeros_like(wq)] * len(extras)
        if spec is not None:
            c, wb, d = spec
            qa = c * (jnp.ones_like(wq) if wb is None else sy[:, wb[0]] * sy[:, wb[1]])
            terms = [(1.0, (), ())]
            for cc in d:  # A_cc on every term
                nxt = []
                for k_, mono, ext in terms:
                    nxt.append((k_, mono + (cc,), ext))
                    for pos, dd in enumerate(mono):
                        nxt.append((-k_ * kinv[dd, cc], mono[:pos] + mono[pos + 1 :], ext))
                    nxt.append((-k_, mono, ext + (cc,)))
                terms = nxt
            for k_, mono, ext in terms:
                val = k_ * qa
                for dd in mono:
                    val = val * hy[:, dd]
                j = xid[tuple(sorted(ext))]
                col[j] = col[j] + val
        cols.append(jnp.stack(col, -1))
    wy = jnp.stack(cols, 1)  # [Q, U, X]
    return jnp.einsum("yax,ymx,y->ma", wy, gm, wq)


def _dntk_cross(act, ki, kr, g, x, w, same_i, pointwise: bool, table=_DNTK_KINDS, restrict=None):
    """Raw cross-layer moments ``E[f(X) h(Y)]`` (``[U, U]``) of the dNTK family, ``Y =
    z^(i)``, ``X = z^(r) = g Y + e`` (as :func:`_cross_layer`). A smooth activation: the
    tensor rule with the derivatives themselves; the scale-invariant class:
    :func:`_dntk_cross_kinked` (Hermite weights and integration by parts, no step or delta
    function integrated; pointwise: ``t = u = 0``). The rows
    ``z_c`` are exact in both: ``E[X_c h(Y)] = g E[Y_c h(Y)]`` (``same_i``: the same-layer
    moments at layer ``i``). ``restrict``: as for :func:`_cross_layer`."""
    m = ki.shape[0]
    n_u, mz, kinds = _dntk_members(m, table)
    live = _dntk_kinds(act, pointwise, table)
    if act.scale_invariant:
        out = _dntk_cross_kinked(act, ki, kr, g, x, w, live)
        if out.shape[0] < n_u:  # the ddNTK family: r, c vanish pointwise (no kink is read)
            pad = n_u - out.shape[0]
            out = jnp.pad(out, ((0, pad), (0, pad)))
    elif _restricts(ki, restrict):
        family = "ddntk" if table is _DDNTK_KINDS else "dntk"
        out = _restricted(
            lambda kyy, mm, sx: _dntk_cross_smooth(act, kyy, mm, sx, x, w, live, table),
            family,
            ki,
            kr,
            g,
        )
    else:
        out = _dntk_cross_smooth(act, ki, g, kr - g * g * ki, x, w, live, table)
    return out.at[jnp.asarray(mz)].set(g * same_i[jnp.asarray(mz)])


def _dntk_cross_smooth(act, kyy, mm, sx, x, w, live, table=_DNTK_KINDS):
    """:func:`_dntk_cross` for a smooth activation on the chain ``X = mm Y + e`` (as
    :func:`_cross_layer_smooth`): the tensor rule with the derivatives themselves, ``[U, U]``
    (the rows ``z_c`` by the rule as well; :func:`_dntk_cross` replaces them by their exact
    values)."""
    m = kyy.shape[0]
    wq, y, gram = _gram(act, kyy, mm, sx, x, w, order=3)  # basis (s, s', s'', s^(3), z, 1)
    # the family (one, z_c, then s^(i)_x s^(j)_y per kind) as entries of the Gram matrix
    one = 5 * m
    rows, cols, live_ = [one] + [4 * m + c for c in range(m)], [one] * (1 + m), [1.0] * (1 + m)
    for kind, (i, j) in table.items():
        for a in range(m):
            for b in range(m):
                rows.append(i * m + a)
                cols.append(j * m + b)
                live_.append(1.0 if kind in live else 0.0)
    inner = gram[:, np.array(rows), np.array(cols)] * jnp.asarray(live_, gram.dtype)[None]  # [Q, U]
    vy = _dntk_values(_derivatives3(act, y), y, live, table)  # [Q, U]
    return jnp.einsum("yf,ya,y->fa", inner, vy, wq)


def dntk_set_flow(act, pointwise, cw, gamma, xi, lam_w, k, theta, rules, cross, ddntk=False):
    """The dNTK correlators of one set of ``m`` inputs (module docstring, "The dNTK"):
    ``(P, Q)``, each ``[R, m, m, m, m]`` (PDLT's ``P_{a0 a1 a2 a3}``, ``Q_{a0 a1 a2 a3}``, not
    divided by the width), for the leading-order kernels ``k [R, m, m]``, NTKs
    ``theta [R, m, m]``, the factors ``gamma, xi [R]`` and the weights' learning-rate
    scalings ``lam_w [R]``. ``pointwise``: the kink convention of a scale-invariant activation
    (``kinks="pointwise"``; ``False``: the distributional one). ``ddntk`` (static): also the
    ddNTK (module docstring, "The ddNTK"): returns ``(P, Q, R, S, T, U)``, the last four in
    the plain engine's naming (``ddntk_t[abcd] = T_{adbc}(1, 1)``, ``ddntk_u[abcd] =
    U_{acdb}(1, 1)``), each ``[R, m, m, m, m]``."""
    n_layers, m = k.shape[0], k.shape[1]
    dtype = k.dtype
    table = _DDNTK_KINDS if ddntk else _DNTK_KINDS
    n_u, mz, kinds = _dntk_members(m, table)
    me, mt, mp, mu = (kinds[u] for u in ("e", "t", "p", "u"))
    gp = _shortcut_products(gamma)
    same, av0, av1 = jax.vmap(lambda kk: _dntk_same(act, kk, rules, pointwise, table))(k)
    pairs = np.array([(i, r) for i in range(n_layers - 1) for r in range(i + 1, n_layers)])
    xq, wq = cross
    crossed = jax.lax.map(
        lambda a: _dntk_cross(act, a[0], a[1], a[2], xq, wq, a[3], pointwise, table),
        (k[pairs[:, 0]], k[pairs[:, 1]], gp[pairs[:, 0], pairs[:, 1]], same[pairs[:, 0]]),
    )  # [P, U, U]
    raw = jnp.zeros((n_layers - 1, n_layers, n_u, n_u), dtype)
    steps = np.arange(n_layers - 1)
    raw = raw.at[steps, steps].set(same[:-1])
    raw = raw.at[pairs[:, 0], pairs[:, 1]].set(crossed)
    ar = np.arange(m)
    a3, b3, c3 = np.meshgrid(ar, ar, ar, indexing="ij")  # [m, m, m] slot indices
    a4, b4, c4, d4 = np.meshgrid(ar, ar, ar, ar, indexing="ij")

    def step(carry, inp):
        ft, bo, qh, ph = carry[:4]
        i, rawi = inp  # rawi [R, U, U]: E[f(z^(r)) h(z^(i))]
        x2 = xi[i + 1] ** 2
        g = gamma[i + 1]
        lw = lam_w[i + 1]
        th = theta[i]
        t1 = gp[i + 1][:, None, None] * av1  # [R, U, m]: <T_c P f>
        a0 = av0  # [R, U]: <T P f>
        raw_s = jnp.take(rawi, i, axis=0)  # [U, U] same-layer
        # ---- F_ab(f, g) on the whole family (the NTK side's recursion)
        f_i = jnp.take(ft, i, axis=0)  # [U, R, U, m, m]: F(i h, s g)
        f_ri = jnp.take(ft, i, axis=2)  # [R, U, U, m, m]: F(r f, i h)
        # Theta_ab <e_ca P g> + F_ab(e_ca, P g) at [s, G, c, a, b] = (a3, b3, c3), and
        # Theta_ab <e_cb P f> + F_ab(P f, e_cb) at [r, F, c, a, b]
        u_g = th[b3, c3][None, None] * rawi[:, :, me[a3, b3]] + jnp.moveaxis(
            f_i[me[a3, b3], :, :, b3, c3], (3, 4), (0, 1)
        )
        v_f = th[b3, c3][None, None] * rawi[:, :, me[a3, c3]] + f_ri[:, :, me[a3, c3], b3, c3]
        # [c, d, a, b] = (a4, b4, c4, d4): Theta_ab <e_ca e_db> + F_ab(e_ca, e_db)
        ce = (
            th[c4, d4] * raw_s[me[a4, c4], me[b4, d4]]
            + jnp.take(f_i, i, axis=1)[me[a4, c4], me[b4, d4], c4, d4]
        )
        fn = (
            g * g * ft
            + cw
            * x2
            * g
            * (jnp.einsum("rFc,sGcab->rFsGab", t1, u_g) + jnp.einsum("sGc,rFcab->rFsGab", t1, v_f))
            + cw * cw * x2 * x2 * jnp.einsum("cdab,rFc,sGd->rFsGab", ce, t1, t1)
        )
        # ---- Bo_(ab)(cd)(f, g) on the whole family (the NTK side's recursion)
        bo_i = jnp.take(bo, i, axis=0)  # [U, R, U, m, m, m, m]: Bo(i h, s g)
        bo_ri = jnp.take(bo, i, axis=2)  # [R, U, U, m, m, m, m]: Bo(r f, i h)
        tt = th[a4, b4] * th[c4, d4]  # [a, b, c, d]
        b_c = (
            tt * raw_s[mp[a4, c4], mp[b4, d4]]
            + jnp.take(bo_i, i, axis=1)[mp[a4, c4], mp[b4, d4], a4, b4, c4, d4]
        )
        u_b = tt[None, None] * rawi[:, :, mp[b4, d4]] + bo_ri[:, :, mp[b4, d4], a4, b4, c4, d4]
        w_b = tt[None, None] * rawi[:, :, mp[a4, c4]] + jnp.moveaxis(
            bo_i[mp[a4, c4], :, :, a4, b4, c4, d4], (4, 5), (0, 1)
        )
        g2 = g * g
        bn = (
            g2 * g2 * bo
            + cw * cw * x2 * x2 * jnp.einsum("rF,sG,abcd->rFsGabcd", a0, a0, b_c)
            + cw
            * x2
            * g2
            * (
                jnp.einsum("rFabcd,sG->rFsGabcd", u_b, a0)
                + jnp.einsum("rF,sGabcd->rFsGabcd", a0, w_b)
            )
        )
        # ---- Qh_abc(f, g): X_abc(s g) at [s, G, a, b, c]
        qh_i = jnp.take(qh, i, axis=0)  # [U, R, U, m, m, m]: Qh(i h, s g)
        xs = (
            lw
            * (
                th[a3, c3][None, None] * rawi[:, :, me[b3, a3]]
                + jnp.moveaxis(f_i[me[b3, a3], :, :, a3, c3], (3, 4), (0, 1))
            )
            + cw
            * th[a3, b3][None, None]
            * (
                th[a3, c3][None, None] * rawi[:, :, mt[a3, b3]]
                + jnp.moveaxis(f_i[mt[a3, b3], :, :, a3, c3], (3, 4), (0, 1))
            )
            + cw * jnp.moveaxis(qh_i[mp[a3, b3], :, :, a3, b3, c3], (3, 4), (0, 1))
        )
        # X_abc(i e_dc) at [d, a, b, c]
        # [d, a, b, c] = (a4, b4, c4, d4): X_abc(i e_dc), Qh_abc(r f, i e_dc)
        xe = jnp.take(xs, i, axis=0)[me[a4, d4], b4, c4, d4]
        qh_re = jnp.take(qh, i, axis=2)[:, :, me[a4, d4], b4, c4, d4]
        qn = (
            g * g2 * qh
            + g2 * x2 * cw * jnp.einsum("rFdabc,sGd->rFsGabc", qh_re, t1)
            + jnp.einsum(
                "rF,sGabc->rFsGabc",
                a0,
                x2 * g * xs + x2 * x2 * cw * jnp.einsum("dabc,sGd->sGabc", xe, t1),
            )
        )
        # ---- Ph_abc(f, g): Y_abc;d(s g) at [s, G, d, a, b, c]
        ph_i = jnp.take(ph, i, axis=0)  # [U, R, U, m, m, m]: Ph(i h, s g)
        # [d, a, b, c] = (a4, b4, c4, d4); u_da = s_d s''_a, e_da = s_d s'_a
        ua, ea = mu[a4, b4], me[a4, b4]
        yy = (
            jnp.moveaxis(ph_i[ea, :, :, b4, c4, d4], (4, 5), (0, 1))
            + (th[b4, c4] * th[b4, d4])[None, None] * rawi[:, :, ua]
            + jnp.moveaxis(bo_i[ua, :, :, b4, c4, b4, d4], (4, 5), (0, 1))
        )  # [R, U, d, a, b, c]
        y_p = jnp.take(yy, i, axis=0)[mp[c4, d4], a4, b4, c4, d4]
        ph_rp = jnp.take(ph, i, axis=2)[:, :, mp[b3, c3], a3, b3, c3]  # [R, U, a, b, c]
        pn = (
            g * g2 * ph
            + g * x2 * cw * jnp.einsum("rFabc,sG->rFsGabc", ph_rp, a0)
            + jnp.einsum(
                "rFd,sGdabc->rFsGabc",
                t1,
                x2 * g2 * cw * yy + x2 * x2 * cw * cw * jnp.einsum("dabc,sG->sGdabc", y_p, a0),
            )
        )
        j = i + 1
        q_out = jnp.moveaxis(jnp.take(jnp.take(qn, j, axis=0)[0], j, axis=0)[mz], 0, -1)
        p_out = jnp.moveaxis(jnp.take(jnp.take(pn, j, axis=0)[mz], j, axis=1)[:, 0], 0, -1)
        if not ddntk:
            return (fn, bn, qn, pn), (q_out, p_out)
        dd_new = _ddntk_update(
            carry, i, rawi, cw, x2, g, lw, th, av0, kinds, (a4, b4, c4, d4), raw_s
        )
        dd_out = tuple(jnp.take(jnp.take(t_, j, axis=0)[0], j, axis=0)[0] for t_ in dd_new)
        return (fn, bn, qn, pn) + dd_new, (q_out, p_out) + dd_out[:4]

    z = jnp.zeros
    init = (
        z((n_layers, n_u, n_layers, n_u, m, m), dtype),
        z((n_layers, n_u, n_layers, n_u) + (m,) * 4, dtype),
        z((n_layers, n_u, n_layers, n_u) + (m,) * 3, dtype),
        z((n_layers, n_u, n_layers, n_u) + (m,) * 3, dtype),
    )
    if ddntk:  # R, S, T, U [.., m^4] and J [.., m^5]
        init = init + tuple(z((n_layers, n_u, n_layers, n_u) + (m,) * 4, dtype) for _ in "RSTU")
        init = init + (z((n_layers, n_u, n_layers, n_u) + (m,) * 5, dtype),)
    _, outs = jax.lax.scan(step, init, (jnp.asarray(steps), raw))
    outs = [jnp.concatenate([jnp.zeros((1,) + (m,) * 4, dtype), o]) for o in outs]
    qh_out, ph_out = outs[:2]
    # P_0123 = Qh_1203 + Qh_2103, Q_0123 = Qh_1023 + Ph_2013 (Hessian form, rgnn.flow.rules)
    p = jnp.einsum("lbcad->labcd", qh_out) + jnp.einsum("lcbad->labcd", qh_out)
    q = jnp.einsum("lbacd->labcd", qh_out) + jnp.einsum("lcabd->labcd", ph_out)
    if not ddntk:
        return p, q
    r, s_, t_, u_ = outs[2:]
    # the plain engine's T_{abcd} = T_{1342}, U_{abcd} = U_{1423} (module docstring)
    return p, q, r, s_, jnp.einsum("ladbc->labcd", t_), jnp.einsum("lacdb->labcd", u_)


def _ddntk_update(carry, i, rawi, cw, x2, g, lw, th, av0, kinds, idx, raw_s):
    """One layer of the ddNTK recursions (module docstring, "The ddNTK"): the new ``R, S, T,
    U`` (``[R, U, R, U, m, m, m, m]``, inputs in the slots ``0123`` / ``1234`` of the
    docstring) and ``J`` (``[R, U, R, U, m^5]``, inputs ``x, y, 0, 1, 2``) from the layer-``i``
    tables in ``carry`` (``F, Bo, Qh, Ph, R, S, T, U, J``), the raw moments ``rawi [R, U, U]``
    (``E[f(z^(r)) h(z^(i))]``), ``raw_s`` (``rawi`` at ``r = i``), ``av0 [R, U]`` and the
    layer's scalars."""
    ft, bo, qh, ph, rt, st, tt, ut, jt = carry
    me, mt, mp, mu, mr, mc = (kinds[u] for u in ("e", "t", "p", "u", "r", "c"))
    a, b, c, d = idx
    m = a.shape[0]
    g2 = g * g
    x4 = x2 * x2
    a0 = av0  # [R, U]: <T f>

    def at_i(tab):  # tab(i h, s g): [U, R, U, ...]
        return jnp.take(tab, i, axis=0)

    def ri(tab):  # tab(r f, i h): [R, U, U, ...]
        return jnp.take(tab, i, axis=2)

    def ii(tab):  # tab(i h, i h'): [U, U, ...]
        return jnp.take(jnp.take(tab, i, axis=0), i, axis=1)

    def left(tab, mem, *ix):  # tab(i mem, s g) as [R, U, ...ix]
        out = at_i(tab)[(mem, slice(None), slice(None)) + ix]
        nd = out.ndim
        return jnp.moveaxis(out, (nd - 2, nd - 1), (0, 1))

    def right(tab, mem, *ix):  # tab(r f, i mem) as [R, U, ...ix]
        return ri(tab)[(slice(None), slice(None), mem) + ix]

    def outer(u_, v_):  # u_(r F) v_(s G) -> [R, U, R, U, ...]
        return jnp.einsum("rF...,sG->rFsG...", u_, v_)

    def outer2(u_, v_):
        return jnp.einsum("rF,sG...->rFsG...", u_, v_)

    bo_ii, f_ii = ii(bo), ii(ft)
    # ---- J_{xy;012}(v, u) (x, y, 0, 1, 2 on the five index arrays)
    ar = np.arange(m)
    a5, b5, c5, d5, e5 = np.meshgrid(ar, ar, ar, ar, ar, indexing="ij")
    j_src = (th[a5, b5] * th[d5, c5] * th[e5, c5])[None, None] * rawi[:, :, mt[c5, a5]] + left(
        jt, mp[a5, c5], a5, b5, c5, d5, e5
    )
    jn = g2 * g2 * g * jt + x2 * g2 * g * cw * outer2(a0, j_src)
    # ---- U_{1234}(f, g) (1, 2, 3, 4 = a, b, c, d)
    u_g = left(ut, mp[a, d], a, b, c, d) + right(jt, mt[a, d], c, a, b, a, d)
    u_f = right(ut, mp[b, c], a, b, c, d) + right(jt, mt[b, c], d, b, a, c, b)
    c_u = (
        th[a, b] * th[a, c] * th[b, d] * raw_s[mt[a, d], mt[b, c]]
        + ii(ut)[mp[a, d], mp[b, c], a, b, c, d]
        + ii(jt)[mp[b, c], mt[a, d], c, a, b, a, d]
        + ii(jt)[mp[a, d], mt[b, c], d, b, a, c, b]
    )
    un = (
        g2 * g2 * ut
        + x2 * g2 * cw * (outer2(a0, u_g) + outer(u_f, a0))
        + x4 * cw * cw * jnp.einsum("rF,sG,abcd->rFsGabcd", a0, a0, c_u)
    )

    # ---- S_{1234}(f, g): sigma(h) with h on unit b
    def sigma_h():  # [R, U, m^4]: sigma_1234(s G)
        return (
            lw
            * (
                (th[c, a] * th[d, b])[None, None] * rawi[:, :, mp[a, b]]
                + right(bo, mp[a, b], c, a, d, b)
            )
            + cw
            * th[a, b][None, None]
            * (
                (th[c, a] * th[d, b])[None, None] * rawi[:, :, mc[a, b]]
                + right(bo, mc[a, b], c, a, d, b)
            )
            + cw * left(st, mp[a, b], a, b, c, d)
        )

    sig = sigma_h()
    sig_p = (
        lw
        * (th[c, a] * th[d, b] * raw_s[mp[c, d], mp[a, b]] + bo_ii[mp[c, d], mp[a, b], c, a, d, b])
        + cw
        * th[a, b]
        * (th[c, a] * th[d, b] * raw_s[mp[c, d], mc[a, b]] + bo_ii[mp[c, d], mc[a, b], c, a, d, b])
        + cw * ii(st)[mp[a, b], mp[c, d], a, b, c, d]
    )
    sn = (
        g2 * g2 * st
        + g2 * x2 * cw * outer(right(st, mp[c, d], a, b, c, d), a0)
        + outer2(a0, x2 * g2 * sig + x4 * cw * jnp.einsum("abcd,sG->sGabcd", sig_p, a0))
    )

    # ---- T_{1234}(f, g): v_13 = lw e_31 + cw Theta_13 t_13, v_24 likewise
    def v_right(tab, x_, y_, *ix):  # tab(r f, i v_xy)
        return lw * right(tab, me[y_, x_], *ix) + cw * th[x_, y_][None, None] * right(
            tab, mt[x_, y_], *ix
        )

    z_f = v_right(qh, b, d, a, c, b) + cw * right(tt, mp[b, d], a, b, c, d)
    z_g = v_right(qh, a, c, b, d, a) + cw * left(tt, mp[a, c], a, b, c, d)

    def v_pair(fn_, x1, y1, x2_, y2_):  # fn_(M1, M2) bilinear on v_{x1 y1}, v_{x2 y2}
        terms = ((lw, me[y1, x1]), (cw * th[x1, y1], mt[x1, y1]))
        terms2 = ((lw, me[y2_, x2_]), (cw * th[x2_, y2_], mt[x2_, y2_]))
        return sum(c1 * c2 * fn_(m1, m2) for c1, m1 in terms for c2, m2 in terms2)

    def v_one(fn_, x_, y_):
        return lw * fn_(me[y_, x_]) + cw * th[x_, y_] * fn_(mt[x_, y_])

    c_t = (
        v_pair(lambda m1, m2: th[a, b] * raw_s[m1, m2] + f_ii[m1, m2, a, b], a, c, b, d)
        + cw * v_one(lambda mm: ii(qh)[mp[b, d], mm, b, d, a], a, c)
        + cw * v_one(lambda mm: ii(qh)[mp[a, c], mm, a, c, b], b, d)
        + cw * cw * ii(tt)[mp[a, c], mp[b, d], a, b, c, d]
    )
    tn = (
        g2 * g2 * tt
        + x2 * g2 * (outer(z_f, a0) + outer2(a0, z_g))
        + x4 * jnp.einsum("rF,sG,abcd->rFsGabcd", a0, a0, c_t)
    )

    # ---- R_{0123}(f, g) (0, 1, 2, 3 = a, b, c, d): rho(h) with h on unit b
    def bf02(mem):  # Bf_(02)(03)(i mem, s G) as [R, U, m^4]
        return (th[a, c] * th[a, d])[None, None] * rawi[:, :, mem] + left(bo, mem, a, c, a, d)

    rho = (
        lw * (bf02(mu[b, a]) + left(ph, me[b, a], a, c, d))
        + cw * th[a, b][None, None] * (bf02(mr[a, b]) + left(ph, mt[a, b], a, c, d))
        + cw * left(rt, mp[a, b], a, b, c, d)
    )

    def bf02_p(mem):
        return th[a, c] * th[a, d] * raw_s[mem, mp[c, d]] + bo_ii[mem, mp[c, d], a, c, a, d]

    rho_p = (
        lw * (bf02_p(mu[b, a]) + ii(ph)[me[b, a], mp[c, d], a, c, d])
        + cw * th[a, b] * (bf02_p(mr[a, b]) + ii(ph)[mt[a, b], mp[c, d], a, c, d])
        + cw * ii(rt)[mp[a, b], mp[c, d], a, b, c, d]
    )
    rn = (
        g2 * g2 * rt
        + g2 * x2 * cw * outer(right(rt, mp[c, d], a, b, c, d), a0)
        + outer2(a0, x2 * g2 * rho + x4 * cw * jnp.einsum("abcd,sG->sGabcd", rho_p, a0))
    )
    return rn, sn, tn, un, jn


@partial(jax.jit, static_argnames=("act", "pointwise", "ddntk"))
def dntk_sets_flow(act, pointwise, cw, gamma, xi, lam_w, ks, thetas, rules, cross, ddntk=False):
    """:func:`dntk_set_flow` on every set's kernels and NTKs ``ks, thetas [S, R, m, m]``
    (one compilation per number of sets): ``(P, Q)``, each ``[R, S, m, m, m, m]`` (with
    ``ddntk``: ``(P, Q, R, S, T, U)``)."""

    def one(a):
        return dntk_set_flow(
            act, pointwise, cw, gamma, xi, lam_w, a[0], a[1], rules, cross, ddntk=ddntk
        )

    out = jax.lax.map(one, (ks, thetas), batch_size=min(8, ks.shape[0]))
    return tuple(jnp.moveaxis(v, 0, 1) for v in out)


# ----------------------------------------------------------------------------- sets of 3, 4
def _set_pairs(m: int):
    """The pairs ``(a, b)``, ``a < b``, of a set of ``m >= 2`` inputs."""
    return list(itertools.combinations(range(m), 2))


def _placements(support, m: int):
    """``{pair index: {input: 0 or 1}}``: every pair of :func:`_set_pairs` holding the inputs
    ``support`` (at most two), with the local index of each of its inputs."""
    return {i: {p[0]: 0, p[1]: 1} for i, p in enumerate(_set_pairs(m)) if set(support) <= set(p)}


def _family_maps(family: str, m: int):
    """The rows (members) and columns (anchors) of a cross-layer table of a set of ``m >= 3``
    inputs as entries of its pairs' tables (:func:`_restricted`): for each, ``None``
    (identically zero) or ``(support, {pair index: index in that pair's table})`` over every
    pair holding its inputs. Every member and anchor of the three families is supported on at
    most two inputs: ``q_w``, ``P_u q_w`` (zero unless ``u`` lies in ``w``), ``d_D phi_w``
    (zero unless ``D`` lies in ``w``), ``e_xy``, the two-factor kinds ``s^(i)_x s^(j)_y`` of
    the dNTK and ``z_c``. ``family``: ``"kernel"`` (:func:`_cross_layer`), ``"ntk"``
    (:func:`_ntk_cross`), ``"dntk"``, ``"ddntk"`` (:func:`_dntk_cross`)."""

    def local(t, loc):
        return tuple(loc[c] for c in t)

    def place(support, index):  # index(loc) -> the entry in a pair's table
        return (
            tuple(sorted(set(support))),
            {i: index(loc) for i, loc in _placements(support, m).items()},
        )

    rows, cols = [], []
    if family == "kernel":
        units = _units(m)
        u2 = {w: i for i, w in enumerate(_units(2))}
        rows = [place(w, lambda loc, w=w: u2[local(w, loc)]) for w in units]
        for u in units:
            for w in units:
                rows.append(
                    place(w, lambda loc, u=u, w=w: 3 + 3 * u2[local(u, loc)] + u2[local(w, loc)])
                    if set(u) <= set(w)
                    else None
                )
        cols = [place(v, lambda loc, v=v: u2[local(v, loc)]) for v in units]
    elif family == "ntk":
        members, _ = _ntk_members(m)
        _, index2 = _ntk_members(2)
        for kind, w, d in members:
            key = lambda loc, kind=kind, w=w, d=d: index2[(kind, local(w, loc), local(d, loc))]  # noqa: E731
            rows.append(place(w, key) if set(d) <= set(w) else None)
        anchors, *_ = _anchors(m)
        anchors2, *_ = _anchors(2)
        aidx2 = {a: j for j, a in enumerate(anchors2)}
        cols = [place(w, lambda loc, k=k, w=w: aidx2[(k, local(w, loc))]) for k, w in anchors]
    else:
        table = _DDNTK_KINDS if family == "ddntk" else _DNTK_KINDS
        n_u, mz, kinds = _dntk_members(m, table)
        _, mz2, kinds2 = _dntk_members(2, table)
        rows = [place((), lambda loc: 0)] + [None] * (n_u - 1)
        for c in range(m):
            rows[mz[c]] = place((c,), lambda loc, c=c: int(mz2[loc[c]]))
        for kind in table:
            for x_ in range(m):
                for y_ in range(m):
                    rows[kinds[kind][x_, y_]] = place(
                        (x_, y_),
                        lambda loc, k=kind, x_=x_, y_=y_: int(kinds2[k][loc[x_], loc[y_]]),
                    )
        cols = rows
    return rows, cols


def _restricted(core, family: str, ki, kr, g):
    """A cross-layer table of a set of ``m >= 3`` inputs from 4-variable integrals only
    (module docstring, "Sets of three and four inputs"): every entry is ``E[f(X_w) h(Y_v)]``
    with the member ``f`` on a pair ``w`` and the anchor ``h`` on a pair ``v`` of the set
    (:func:`_family_maps`), and ``(X_w, Y_v)`` is Gaussian: ``Y_v ~ N(0, K^(i)_vv)``,
    ``X_w = M Y_v + e``, ``M = g K^(i)_wv (K^(i)_vv)^-1``, ``e ~ N(0, S')`` independent of
    ``Y_v``, ``S' = K^(r)_ww - g^2 K^(i)_wv (K^(i)_vv)^-1 K^(i)_vw`` (the regression of
    ``X_w = g Y_w + e_w`` on ``Y_v``). ``core(kyy, mm, sx)``: the pair routine on that chain
    (``[F2, A2]``, the pair's own table); ``w = v`` gives ``M = g``, ``S' = S``: one unit's
    chain on the pair, the computation of the pair layout (the scalar path, to the bit). Each
    ordered combination of pairs is one 4-variable rule (36 on four inputs), evaluated one at a
    time (``lax.map``); the ``[F, A]`` table is gathered by the static maps."""
    m = ki.shape[0]
    pairs = np.array(_set_pairs(m), np.int32)
    n_p = len(pairs)
    rows, cols = _family_maps(family, m)

    def same(p):
        kyy = ki[p[:, None], p[None, :]]
        return core(kyy, g, kr[p[:, None], p[None, :]] - g * g * kyy)

    def other(pq):
        px, py = pq[0], pq[1]
        kyy = ki[py[:, None], py[None, :]]
        kxy = g * ki[px[:, None], py[None, :]]
        mm = jnp.linalg.solve(kyy, kxy.T).T  # kyy symmetric: kxy kyy^-1
        sx = kr[px[:, None], px[None, :]] - mm @ kxy.T
        return core(kyy, mm, 0.5 * (sx + sx.T))

    combos = np.array([(a, b) for a in range(n_p) for b in range(n_p) if a != b], np.int32)
    diag = jax.lax.map(same, jnp.asarray(pairs))  # [P, F2, A2]
    off = jax.lax.map(other, jnp.asarray(pairs[combos]))  # [P (P - 1), F2, A2]
    where = np.zeros((n_p, n_p), np.int32)
    where[np.arange(n_p), np.arange(n_p)] = np.arange(n_p)
    where[combos[:, 0], combos[:, 1]] = n_p + np.arange(len(combos))
    n_f2, n_a2 = diag.shape[1], diag.shape[2]
    # each entry from one pair when its member and anchor fit in one (the pair layout's own
    # computation), else from the first pairs holding each
    idx = np.zeros((len(rows), len(cols)), np.int64)
    zero = np.zeros((len(rows), len(cols)), bool)
    for f, row in enumerate(rows):
        for a, col in enumerate(cols):
            if row is None or col is None:
                zero[f, a] = True
                continue
            both = set(row[1]) & set(col[1])
            px = py = min(both) if both else None
            if px is None:
                px, py = min(row[1]), min(col[1])
            idx[f, a] = (where[px, py] * n_f2 + row[1][px]) * n_a2 + col[1][py]
    tab = jnp.concatenate([diag, off])  # [P^2, F2, A2]
    if family != "kernel":
        # raw moments: each entry as its combination's covariance plus the product of the
        # means, each mean from the pair holding its own function, so that the flow's C_0
        # (raw less the product of the means) is the combination's own: exactly zero for
        # independent X and Y (gamma = 0), as on one pair
        cov = tab - tab[:, :, :1] * tab[:, :1, :]
        r_mean = np.array([0 if r is None else r[1][min(r[1])] for r in rows], np.int32)
        r_home = np.array([0 if r is None else min(r[1]) for r in rows], np.int32)
        c_mean = np.array([0 if c is None else c[1][min(c[1])] for c in cols], np.int32)
        c_home = np.array([0 if c is None else min(c[1]) for c in cols], np.int32)
        ef = tab[jnp.asarray(r_home), jnp.asarray(r_mean), 0]  # [F]: E f(X), diagonal combos
        eh = tab[jnp.asarray(c_home), 0, jnp.asarray(c_mean)]  # [A]: E h(Y)
        out = cov.reshape(-1)[jnp.asarray(idx)] + ef[:, None] * eh[None, :]
    else:  # the kernel side's table is already the covariance C_0 of each combination
        out = tab.reshape(-1)[jnp.asarray(idx)]
    return jnp.where(jnp.asarray(zero), 0.0, out)
