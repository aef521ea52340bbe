"""The statistics of the flow and their layer-to-layer updates, each written once.

Every statistic is a tensor over the inputs of one set (``[m, m]`` or ``[m, m, m, m]``), zero
on the first layer, and has one update rule ``X^{(l+1)} = rule(statistics of layer l)`` written
in index notation (:mod:`rgnn.flow.tensor`) with the Gaussian moments of layer ``l``
(:class:`rgnn.flow.moments.Moments`). Notation: ``n = n_l``, ``r = n_l / n_{l-1}``,
``inv = 1 / n_{l-1}``, ``K, Theta`` the layer's leading-order kernels, ``<.>`` the Gaussian
average under ``K``, ``s_a = sigma(z_a)``, primes derivatives, ``D_c(f) = <d_c f>``,
``lambda_W`` the weights' learning-rate scaling of layer ``l + 1``. Sources: PDLT ch. 4
(``V``, ``Delta``), ch. 8 (``A, B, D, F`` and the NTK mean shift), ch. 11 (``P, Q``), ch. infinity
(``R, S, T, U``), written with derivatives instead of inverse kernels; the derivations by
conditional averages are in :mod:`rgnn.perturbative` and below.

================  ============================================================  ==============
statistic         meaning (all ``n_{l-1}`` times a covariance or mean)            needs
================  ============================================================  ==============
``V``             four-point vertex, ``Cov(G_ab, G_cd)``                          V
``DG``            mean-kernel shift ``E z_a z_b - K_ab`` (``n`` times)             V, DG
``D``             NNGP-NTK cross vertex ``Cov(G_ab, H~_cd)``                      V, D
``A``             NTK vertex ``Cov(H~_ab, H~_cd)``                                V, D, A
``DH``            NTK mean shift ``E H_ab - Theta_ab``                            V, D, DG, F, DH
``F``             ``E[H_{12;ab} z_{1c} z_{2d}]``                                  F
``B``             ``E[H_{12;ab} H_{12;cd}]`` as ``B_{acbd}``                      B
``P, Q``          dNTK-preactivation correlators (PDLT eq. 11.?)                 F, B, P / Q
``PH, QH``        the same for the Hessian-form dNTK                              B, F, PH / QH
``R, S, T, U``    the ddNTK means                                                 B, F, PH, QH
================  ============================================================  ==============

The tensors' index layouts follow the docstrings of :class:`rgnn.Perturbative`. The NTK side's
derivation (``A, B, D, F`` and the mean shift) is in :mod:`rgnn.perturbative`; the dNTK side's
follows.

The dNTK and ddNTK statistics
-----------------------------

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

Derivation (conditional averages, as in :mod:`rgnn.perturbative`; ``n = n_l``, ``m = n_{l-1}``,
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
<d_c f><d_d g>`` (``F`` of :mod:`rgnn.perturbative`), ``E[H_{jk;x_1y_1} H_{jk;x_2y_2} f g] =
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
+ r C_W^2 <s'_x s'_y><s'_z s'_w> B_{xyzw}`` (as in :mod:`rgnn.perturbative`).

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

Residual layers
---------------

A residual layer (PDLT appendix B, :mod:`rgnn.architecture`) is ``z'_i = gamma z_i + xi h_i``
with ``h`` a plain dense layer's preactivation, ``h_i = b_i + sum_j W_ij s_j``: given layer
``l``, ``h`` is Gaussian with mean 0 and covariance ``delta_ij G_ab`` (the plain metric), rows
independent, and ``E[z h | z] = 0``. Hence, for two different units ``i != j``,

.. math::

    E[z'_{ia} z'_{ib} z'_{jc} z'_{jd} | z] = (\\gamma^2 z_{ia} z_{ib} + \\xi^2 G_{ab})
        (\\gamma^2 z_{jc} z_{jd} + \\xi^2 G_{cd}),

and the connected four-point function ``V'/n_l`` is the covariance of the two factors:

.. math::

    V'_{(ab)(cd)} = \\xi^4 V'^{\\rm plain}_{(ab)(cd)} + \\gamma^4 r V_{(ab)(cd)}
      + \\gamma^2 \\xi^2 n_l \\big[\\mathrm{Cov}(z_{ia} z_{ib}, G_{cd})
        + \\mathrm{Cov}(G_{ab}, z_{jc} z_{jd})\\big],

``V'^plain`` the plain rule. The cross term is O(1/n) and new: ``G_{cd}`` contains unit ``i``
itself, ``(C_W/n_l) [<z_a z_b s_c s_d> - K_ab <s_c s_d>] = (C_W/n_l) sum_{gh} K_{ag} K_{bh}
<d_g d_h (s_c s_d)>`` (Stein), and the ``n_l - 1`` other units, correlated with unit ``i``
through ``V`` (``Cov(f(z_i), g(z_k)) = (1/4n_{l-1}) sum V_{(ef)(gh)} <d_e d_f f><d_g d_h g>``):

.. math::

    n_l \\mathrm{Cov}(z_{ia} z_{ib}, G_{cd}) = C_W \\sum_{gh} \\tfrac12
        \\langle \\partial_g \\partial_h (s_c s_d)\\rangle
        \\big(r V_{(ab)(gh)} + K_{ag} K_{bh} + K_{ah} K_{bg}\\big) + O(1/n).

The mean kernel: ``E[z'_a z'_b] = gamma^2 E[z_a z_b] + xi^2 E[G_ab]`` exactly, so
``DG' = xi^2 DG'^plain + gamma^2 DG``. With ``gamma = 0, xi = 1`` both reduce to the plain
rules.

**Where this closes: linear activations only.** The step "correlated with unit ``i`` through
``V``" assumes that every O(1/n) correlation between two units is carried by the vertex,
``Cov(f(z_i), g(z_k)) = (1/4n) sum V <d d f><d d g>``. In a plain MLP that holds because the
layer's weights, hence its preactivations, are invariant under rotations of the units. A
residual layer adds ``z`` itself, which rotates with the units while ``sigma(z)`` does not:
only permutations remain, and the correlation of two units is a general bilinear form in the
two functions (e.g. ``n Cov(F(z_i), G)`` picks up ``Cov_0(F, sigma^2)``, all Hermite orders of
``F``, not only ``<F''>``). For a linear activation every function involved is quadratic and
the rotation symmetry survives (``O W O^T ~ W``), so these rules are exact there (tests: the
closed form ``V' = s^2 V + (s^2 - gamma^4)(K K + K K)``, ``s = xi^2 C_W + gamma^2``, and Monte
Carlo). For a nonlinear activation they are wrong from the second residual layer on
(Monte Carlo: 5 to 14 standard errors off for relu and gelu at 4096 networks), so
:func:`rgnn.perturbative` uses them for ``activation="linear"`` only and runs the single-input
flow of :mod:`rgnn._residual_single`, which carries the whole two-unit bilinear form, for the
others.

**The NTK side of residual layers** (derived here; PDLT appendix B gives the residual kernel
recursions at leading order, not these). The parameters of layer ``l + 1`` enter through the
branch only, the lower ones through ``dz'_i = sum_j M_ij dz_j`` with
``M_ij = xi W_ij s'_j + gamma delta_ij`` (the backward signal
``delta^{(l)} = s' * (xi W^T delta^{(l+1)}) + gamma delta^{(l+1)}``), so

.. math::

    H'_{ij;ab} = \\xi^2 \\big[\\delta_{ij} (\\lambda_b + \\tfrac{\\lambda_W}{n_l} \\textstyle\\sum_k
        s_{ka} s_{kb}) + \\sum_{kl} W_{ik} W_{jl} s'_{ka} s'_{lb} H_{kl;ab}\\big]
      + \\xi\\gamma \\textstyle\\sum_k \\big(W_{ik} s'_{ka} H_{kj;ab}
        + W_{jk} s'_{kb} H_{ik;ab}\\big)
      + \\gamma^2 H_{ij;ab},

the bracket being the plain layer's NTK. Definitions as for ``V`` (for two different units
``i != j``, all ``n`` times): ``A = n Cov(H_ii, H_jj)``, ``D_{(ab)(cd)} = n Cov(z_ia z_ib,
H_jj;cd)``, ``B_{xyzw} = n E[H_ij;xz H_ij;yw]``, ``F_{xy;cd} = n E[H_ij;xy z_ic z_jd]``,
``DH = n (E H_ii - Theta)``. Given layer ``l``, units ``i != j`` use different rows of ``W``,
so ``(z'_i, H'_ii)`` and ``(z'_j, H'_jj)`` are independent, and every covariance is that of
the conditional means ``E[H'_ii | l] = xi^2 H~ + gamma^2 H_ii`` (``H~`` the plain NTK metric;
the cross term is linear in ``W``) and ``E[z'_ia z'_ib | l] = xi^2 G_ab + gamma^2 z_ia z_ib``.
For ``B`` and ``F``, average the products of the four terms over the two rows (only pairings
with an even number of entries of each row survive). With ``r``, ``K``, ``Theta``,
``D_e(f) = <d_e f>`` as above, ``J_cd(X) = sum_gh (dH~_cd / dG_gh) X_gh`` (``_jhk``:
``lambda_W`` times Price's derivative of ``<s s>`` plus ``C_W Theta`` times that of
``<s' s'>``) and ``X_{abgh} = r V_{(ab)(gh)} + K_ag K_bh + K_ah K_bg`` (``n_l`` times the
covariance of one unit's ``z_a z_b`` with the layer's ``(1/n_l) sum_j z_jg z_jh``, by Stein's
lemma and ``V``):

.. math::

    D' &= \\xi^4 D'^{\\rm plain} + \\gamma^4 r D + \\gamma^2\\xi^2 \\big[
        r C_W \\textstyle\\sum_{ef} \\tfrac12 \\langle \\partial_e \\partial_f (s_a s_b)\\rangle
        D_{(ef)(cd)} + J_{cd}(X_{ab\\cdot\\cdot})
        + r C_W \\langle s'_c s'_d\\rangle D_{(ab)(cd)}\\big], \\\\
    A' &= \\xi^4 A'^{\\rm plain} + \\gamma^4 r A + \\gamma^2\\xi^2 (Y_{abcd} + Y_{cdab}),
        \\qquad Y_{abcd} = r \\big[J_{cd}(D_{\\cdot\\cdot(ab)})
        + C_W \\langle s'_c s'_d\\rangle A_{(ab)(cd)}\\big]
        = n\\,\\mathrm{Cov}(H_{ii;ab}, \\tilde H'_{cd}), \\\\
    B'_{xyzw} &= \\xi^4 B'^{\\rm plain} + \\gamma^4 r B + \\gamma^2\\xi^2 C_W
        \\big(\\langle s'_x s'_y\\rangle + \\langle s'_z s'_w\\rangle\\big)
        \\big(\\Theta_{xz}\\Theta_{yw} + r B_{xyzw}\\big), \\\\
    F'_{xy;cd} &= \\xi^4 F'^{\\rm plain} + \\gamma^4 r F + \\gamma^2\\xi^2 C_W \\big[
        \\textstyle\\sum_e D_e(s'_x s_c) (\\Theta_{xy} K_{ed} + r F_{xy;ed})
        + \\sum_f D_f(s'_y s_d) (\\Theta_{xy} K_{cf} + r F_{xy;cf})\\big], \\\\
    DH' &= \\xi^2 DH'^{\\rm plain} + \\gamma^2 DH .

The unit ``i``'s own share of ``H~`` or ``G`` in the cross terms is ``O(1/n^2)`` (its NTK is
``Theta`` up to ``O(1/sqrt n)`` and correlates with its own ``z`` at ``O(1/n)``), unlike
``V``'s, where ``Cov(z_i z_i, s_i s_i)`` is ``O(1)``. The NTK variance of one unit is again
``(A_{(ab)(ab)} + B_{aabb} + B_{abba}) / n``: with the rotation symmetry the connected
``E[H_{i1i2} H_{i3i4}]`` has only the three pairings. As for ``V``, the cross-unit steps use
the rotation symmetry, so these rules are exact for ``activation="linear"`` and used only
there; the tests check them against an exact finite-width Wick recursion of deep linear
residual networks (their 1/n coefficients, to roundoff, on three inputs) and against Monte
Carlo. A nonlinear activation on one input has the NTK side in the single-input flow of
:mod:`rgnn._residual_single` (which reduces to these rules for a linear one: tests); there
these rules would be far off (relu, depth 3, gamma 0.8, xi 0.6: ``n Var(H)`` on the output
layer 183 against 270 from the single-input flow and 278 +- 10 from Monte Carlo).

**The dNTK of linear residual layers** (derived here, for ``activation="linear"`` only). With
``s = z`` a residual layer is a linear layer ``z' = xi b + M z`` with ``M = xi W + gamma``, and
the dNTK of layer ``l + 1`` (module docstring above, the Hessian of ``z'`` coupling ``W`` to
the lower parameters through ``dz'/dW_pk = xi delta_{ip} z_k``) is

.. math::

    \\widehat{dH}'_{i_0 i_1 i_2} = \\frac{\\xi^2 \\lambda_W}{n_l} \\Big[\\delta_{i_0 i_1}
        \\textstyle\\sum_{kl} z_{k0} M_{i_2 l} H_{kl;12} + \\delta_{i_0 i_2} \\sum_{kl} z_{k0}
        M_{i_1 l} H_{lk;12} + \\delta_{i_1 i_2} \\sum_{kj} M_{i_0 k} (z_{j1} H_{kj;02}
        + z_{j2} H_{kj;01})\\Big] + \\sum M_{i_0 k_0} M_{i_1 k_1} M_{i_2 k_2}
        \\widehat{dH}_{k_0 k_1 k_2} .

Multiply by ``z'_{i_3; 3} = xi b_{i_3} + sum_m M_{i_3 m} z_{m3}`` and average over ``M``
(mean ``gamma delta``, two or four entries of ``W`` paired; ``E[M M] = gamma^2 + xi^2 C_W / n``
on matching indices, ``chi = gamma^2 + xi^2 C_W``): at O(1/n), with ``r, K, Theta, F`` as
above,

.. math::

    P'_{0123} &= \\chi^2 r P_{0123} + \\xi^2 \\lambda_W \\chi \\big[\\Theta_{01} K_{23}
        + \\Theta_{02} K_{13} + r F_{01;32} + r F_{02;31}\\big], \\\\
    Q'_{0123} &= \\chi^2 r Q_{0123} + \\xi^2 \\lambda_W \\chi \\big[\\Theta_{12} K_{03}
        + r F_{12;03}\\big]

(``gamma = 0, xi = 1`` is the plain rule at ``s = z``; the terms of ``P, Q`` with two
different units' dNTK enter at O(1/n^2)). Checked, like the NTK side, against the exact Wick
recursion (to roundoff) and Monte Carlo.

The ddNTKs likewise (linear only). ``z'`` is linear in ``W`` and in ``z``, so
``Hess(z'_i)[u, v] = xi sum_k (u_{W_ik} v.grad z_k + v_{W_ik} u.grad z_k)
+ sum_k M_ik Hess(z_k)[u, v]`` (lower components of ``u, v``), the third derivative has only
the terms ``xi u_{W_ik} Hess(z_k)[v, w]`` (and permutations) and ``sum_k M_ik D^3 z_k``, and
the layer's weight part of a gradient is ``g'_i|_{W_pk} = (lambda_W / n) xi delta_ip z_k``.
Inserting, and averaging over ``M`` as for ``P, Q``:

.. math::

    \\hat Q'_{0123} &= \\chi^2 r \\hat Q_{0123} + \\xi^2 \\lambda_W \\chi \\big[\\Theta_{02}
        K_{13} + r F_{02;13}\\big], \\qquad \\hat P' = \\chi^2 r \\hat P, \\quad
        R' = \\chi^2 r R, \\quad U' = \\chi^2 r U, \\\\
    S'_{1234} &= \\chi^2 r S_{1234} + \\xi^2 \\lambda_W \\chi \\big[\\Theta_{13}\\Theta_{24}
        + r B_{1234}\\big], \\\\
    T'_{1342} &= \\chi^2 r T_{1342} + \\xi^4 \\lambda_W^2 \\big[\\Theta_{12} K_{34}
        + r F_{12;34}\\big] + \\xi^2 \\lambda_W \\chi\\, r \\big[\\hat Q_{2413}
        + \\hat Q_{1324}\\big]

(``P^, R, U`` have no source in a linear network and stay zero; the ``xi^4 lambda_W^2`` term
pairs the layer's weight part of both gradients, the ``xi^2 lambda_W chi`` terms one of them
with the Hessian of the lower layers, whose weight ``M`` averages to ``chi``). Checked by
Monte Carlo (``rgnn.measure`` differentiates the residual network), and ``gamma = 0, xi = 1``
against the plain rules. For a nonlinear activation these rules would miss the ``sigma''``
terms and the broken rotation symmetry: there :func:`rgnn.perturbative` takes the dNTK on one
input from the single-input flow of :mod:`rgnn._residual_single` and on several from the pair
flow of :mod:`rgnn._residual_multi` (both reduce to these rules for a linear activation:
tests), and the ddNTK on one input from :mod:`rgnn._residual_single` and on several from the
pair flow of :mod:`rgnn._residual_multi`.
"""

from __future__ import annotations

from rgnn.flow.tensor import L, ein, extract

DEPENDS = {
    "V": ("V",),
    "DG": ("V", "DG"),
    "D": ("V", "D"),
    "A": ("V", "D", "A"),
    "DH": ("V", "D", "DG", "F", "DH"),
    "F": ("F",),
    "B": ("B",),
    "P": ("F", "P"),
    "Q": ("F", "B", "Q"),
    "PH": ("B", "PH"),
    "QH": ("F", "QH"),
    "R": ("B", "PH", "R"),
    "S": ("B", "S"),
    "T": ("F", "QH", "T"),
    "U": ("U",),
}
RANK = {"DG": 2, "DH": 2}  # every other statistic has four indices
KMAX = {  # the highest derivative of sigma each update's moments need
    "V": 2,
    "DG": 4,
    "D": 3,
    "A": 3,
    "DH": 5,
    "F": 2,
    "B": 1,
    "P": 3,
    "Q": 3,
    "PH": 2,
    "QH": 3,
    "R": 3,
    "S": 2,
    "T": 3,
    "U": 2,
}


def closure(names) -> tuple[str, ...]:
    """``names`` with everything their updates need, in a fixed order."""
    need = set()
    todo = list(names)
    while todo:
        n = todo.pop()
        if n not in need:
            need.add(n)
            todo.extend(DEPENDS[n])
    return tuple(n for n in DEPENDS if n in need)


class Layer:
    """What one layer's updates read: moments ``M``, the statistics ``old``, constants."""

    def __init__(self, m, old, theta, *, cw, lw, r, inv):
        self.M = m
        self.old = old
        self.theta = theta
        self.cw, self.lw, self.r, self.inv = cw, lw, r, inv

    def S(self, name, ix):
        return L(self.old[name], ix)

    def T(self, ix):
        return L(self.theta, ix)

    def diag(self, name, sel, ix):
        """``old[name]`` with repeated letters (``sel``, e.g. ``"aacd"``) labelled ``ix``."""
        return extract(self.old[name], sel).to(ix)


def _v(c: Layer):
    M, cw = c.M, c.cw
    cov = M.e((0, 0, 0, 0), "abcd") - M.e((0, 0), "ab") * M.e((0, 0), "cd")
    prop = M.price1(0, M.price1(0, c.S("V", "efgh"), "gh", "cd"), "ef", "ab")
    return (cw * cw * cov + c.r * cw * cw * prop).to("abcd")


def _dg(c: Layer):
    M, cw = c.M, c.cw
    return (
        cw * M.price1(0, c.S("DG", "ef"), "ef", "ab")
        + 0.5 * c.inv * cw * M.price2(0, c.S("V", "efgh"))
    ).to("ab")


def _jhk(c: Layer, x: L, pair: str, out: str) -> L:
    """``sum_ef (d H~'_out / d G_ef) X_ef``: ``lambda_W dphi + C_W Theta dpsi``."""
    M = c.M
    return c.lw * M.price1(0, x, pair, out) + c.cw * c.T(out) * M.price1(1, x, pair, out)


def _cov_ss_dd(c: Layer):
    M = c.M
    css = M.e((0, 0, 0, 0), "abcd") - M.e((0, 0), "ab") * M.e((0, 0), "cd")
    csd = M.e((0, 0, 1, 1), "abcd") - M.e((0, 0), "ab") * M.e((1, 1), "cd")
    cdd = M.e((1, 1, 1, 1), "abcd") - M.e((1, 1), "ab") * M.e((1, 1), "cd")
    return css, csd, cdd


def _d(c: Layer):
    M, cw, lw = c.M, c.cw, c.lw
    css, csd, _ = _cov_ss_dd(c)
    src = cw * (lw * css + cw * csd * c.T("cd"))
    jht = cw * M.e((1, 1), "cd")
    prop = cw * M.price1(0, _jhk(c, c.S("V", "efgh"), "gh", "cd"), "ef", "ab")
    prop = prop + cw * M.price1(0, c.S("D", "efcd"), "ef", "ab") * jht
    return (src + c.r * prop).to("abcd")


def _a(c: Layer):
    M, cw, lw = c.M, c.cw, c.lw
    css, csd, cdd = _cov_ss_dd(c)
    sd = csd * c.T("cd")
    src = (
        lw * lw * css
        + lw * cw * (sd + sd.to("abcd").rename("cdab"))
        + cw * cw * cdd * c.T("ab") * c.T("cd")
    )
    jab, jcd = cw * M.e((1, 1), "ab"), cw * M.e((1, 1), "cd")
    vv = _jhk(c, _jhk(c, c.S("V", "efgh"), "gh", "cd"), "ef", "ab")
    x = _jhk(c, c.S("D", "efcd"), "ef", "ab") * jcd
    prop = vv + x + x.to("abcd").rename("cdab") + jab * jcd * c.S("A", "abcd")
    return (src + c.r * prop).to("abcd")


def _dh(c: Layer):
    M, cw, lw = c.M, c.cw, c.lw
    jht = cw * M.e((1, 1), "ab")
    v = c.S("V", "efgh")
    hess = 0.5 * (lw * M.price2(0, v) + cw * c.T("ab") * M.price2(1, v))
    cross = cw * M.price1_own(1, c.S("D", "efab").to("abef"))
    xi = 2.0 * cw * M.price1_own(1, c.S("F", "abef"))
    return (
        _jhk(c, c.S("DG", "ef"), "ef", "ab") + jht * c.S("DH", "ab") + c.inv * (hess + cross + xi)
    ).to("ab")


def _f(c: Layer):
    M, cw = c.M, c.cw
    src = M.e((1, 0, 1, 0), "acbd") * c.T("ab")
    prop = ein("abcd", M.d((1, 0), "eac"), c.S("F", "abef"), M.d((1, 0), "fbd"))
    return (cw * cw * (src + c.r * prop)).to("abcd")


def _b(c: Layer):
    M, cw = c.M, c.cw
    src = M.e((1, 1, 1, 1), "abcd") * c.T("ac") * c.T("bd")
    prop = M.e((1, 1), "ab") * M.e((1, 1), "cd") * c.S("B", "abcd")
    return (cw * cw * (src + c.r * prop)).to("abcd")


def _p(c: Layer):
    M, cw, lw, T = c.M, c.cw, c.lw, c.T
    e, d = M.e, M.d
    src = lw * cw * (e((1, 0, 1, 0), "adbc") * T("ab") + e((1, 0, 0, 1), "adbc") * T("ac"))
    src = src + cw * cw * T("bc") * (
        e((1, 0, 2, 1), "adbc") * T("ab") + e((1, 0, 1, 2), "adbc") * T("ac")
    )
    lead = d((1, 0), "ead")
    g1 = lw * cw * d((1, 0), "fbc") + cw * cw * T("bc") * d((2, 1), "fbc")
    g2 = lw * cw * d((0, 1), "fbc") + cw * cw * T("bc") * d((1, 2), "fbc")
    prop = (
        ein("abcd", lead, c.S("F", "abef"), g1)
        + ein("abcd", lead, c.S("F", "acef"), g2)
        + cw * cw * ein("abcd", e((1, 1), "bc"), c.S("P", "abce"), lead)
    )
    return (src + c.r * prop).to("abcd")


def _q(c: Layer):
    M, cw, lw, T = c.M, c.cw, c.lw, c.T
    e, d = M.e, M.d
    src = lw * cw * e((0, 1, 1, 0), "abcd") * T("bc") + cw * cw * T("bc") * (
        e((1, 2, 1, 0), "abcd") * T("ab") + e((1, 1, 2, 0), "abcd") * T("ac")
    )
    s01 = e((1, 1), "ab")
    tail = d((1, 0), "ecd")
    head = lw * cw * d((0, 1), "fab") + cw * cw * T("ab") * d((1, 2), "fab")
    prop = (
        cw * cw * s01 * c.diag("B", "abcc", "abc") * e((2, 0), "cd")
        + cw * cw * ein("abcd", s01, c.S("Q", "abce"), tail)
        + ein("abcd", c.S("F", "bcfe"), head, tail)
    )
    return (src + c.r * prop).to("abcd")


def _ph(c: Layer):
    M, cw, T = c.M, c.cw, c.T
    e, d = M.e, M.d
    src = e((2, 0, 1, 1), "adbc") * T("ab") * T("ac")
    prop = c.diag("B", "aabc", "abc") * e((2, 0), "ad") * e((1, 1), "bc") + ein(
        "abcd", e((1, 1), "bc"), c.S("PH", "abcg"), d((1, 0), "gad")
    )
    return (cw * cw * (src + c.r * prop)).to("abcd")


def _qh(c: Layer):
    M, cw, lw, T = c.M, c.cw, c.lw, c.T
    e, d = M.e, M.d
    dcd = d((1, 0), "hcd")
    ff = ein("abcd", c.S("F", "acgh"), d((1, 0), "gab"), dcd)
    ff2 = ein("abcd", c.S("F", "acgh"), d((2, 1), "gab"), dcd)
    qq = ein("abcd", c.S("QH", "abcg"), d((1, 0), "gcd"))
    out = lw * cw * (e((1, 0, 1, 0), "abcd") * T("ac") + c.r * ff) + cw * cw * (
        e((2, 1, 1, 0), "abcd") * T("ab") * T("ac") + c.r * (T("ab") * ff2 + e((1, 1), "ab") * qq)
    )
    return out.to("abcd")


def _r(c: Layer):
    M, cw, lw, T = c.M, c.cw, c.lw, c.T
    e, d = M.e, M.d
    scd = e((1, 1), "cd")
    baacd = c.diag("B", "aacd", "acd")
    pp1 = ein("abcd", c.S("PH", "acdg"), d((1, 0), "gab"))
    pp2 = ein("abcd", c.S("PH", "acdg"), d((2, 1), "gab"))
    lam = e((2, 0, 1, 1), "abcd") * T("ac") * T("ad") + c.r * scd * (baacd * e((2, 0), "ab") + pp1)
    cc = e((3, 1, 1, 1), "abcd") * T("ab") * T("ac") * T("ad") + c.r * scd * (
        T("ab") * baacd * e((3, 1), "ab") + T("ab") * pp2 + e((1, 1), "ab") * c.S("R", "abcd")
    )
    return (lw * cw * lam + cw * cw * cc).to("abcd")


def _s(c: Layer):
    M, cw, lw, T = c.M, c.cw, c.lw, c.T
    e = M.e
    sab, scd = e((1, 1), "ab"), e((1, 1), "cd")
    b = c.S("B", "abcd")
    lam = e((1, 1, 1, 1), "abcd") * T("ac") * T("bd") + c.r * b * sab * scd
    cc = e((2, 2, 1, 1), "abcd") * T("ab") * T("ac") * T("bd") + c.r * (
        T("ab") * b * e((2, 2), "ab") * scd + sab * scd * c.S("S", "abcd")
    )
    return (lw * cw * lam + cw * cw * cc).to("abcd")


def _t(c: Layer):
    # T_{abcd} = T_{1342}: inputs 1 = a, 3 = b, 4 = c, 2 = d
    M, cw, lw, T = c.M, c.cw, c.lw, c.T
    e, d = M.e, M.d

    def fsum(s1, s2):
        return ein("abcd", c.S("F", "adgh"), d(s1, "gab"), d(s2, "hdc"))

    sab, sdc = e((1, 1), "ab"), e((1, 1), "dc")
    q1 = ein("abcd", c.S("QH", "dcag"), d((1, 0), "gab"))
    q2 = ein("abcd", c.S("QH", "abdg"), d((1, 0), "gdc"))
    q1b = ein("abcd", c.S("QH", "dcag"), d((2, 1), "gab"))
    q2b = ein("abcd", c.S("QH", "abdg"), d((2, 1), "gdc"))
    ll = e((1, 0, 1, 0), "abdc") * T("ad") + c.r * fsum((1, 0), (1, 0))
    lc = (
        e((1, 0, 2, 1), "abdc") * T("ad") * T("dc")
        + e((2, 1, 1, 0), "abdc") * T("ad") * T("ab")
        + c.r
        * (T("dc") * fsum((1, 0), (2, 1)) + T("ab") * fsum((2, 1), (1, 0)) + sdc * q1 + sab * q2)
    )
    cc = e((2, 1, 2, 1), "abdc") * T("ad") * T("ab") * T("dc") + c.r * (
        T("ab") * T("dc") * fsum((2, 1), (2, 1))
        + T("ab") * sdc * q1b
        + T("dc") * sab * q2b
        + sab * sdc * c.S("T", "abcd")
    )
    return (lw * lw * ll + lw * cw * lc + cw * cw * cc).to("abcd")


def _u(c: Layer):
    # U_{abcd} = U_{1423}: inputs 1 = a, 4 = b, 2 = c, 3 = d
    M, cw, T = c.M, c.cw, c.T
    e = M.e
    src = e((2, 2, 1, 1), "acdb") * T("ac") * T("ad") * T("cb")
    prop = e((1, 1), "ab") * e((1, 1), "cd") * c.S("U", "abcd")
    return (cw * cw * (src + c.r * prop)).to("abcd")


# ----------------------------------------------------------------------------- residual layers
def _res_stein(c: Layer) -> L:
    """``X_{abgh} = r V_{(ab)(gh)} + K_ag K_bh + K_ah K_bg``: ``n_l`` times the covariance of
    ``z_{ka} z_{kb}`` with ``z_{jg} z_{jh}`` summed over the units ``j`` of the layer (the unit
    ``k`` itself by Stein's lemma, the others through ``V``)."""
    k = c.M.k
    return c.r * c.S("V", "abgh") + L(k, "ag") * L(k, "bh") + L(k, "ah") * L(k, "bg")


def _res_v(c: Layer, plain: L, gamma, xi) -> L:
    """``V`` after a residual layer ``z' = gamma z + xi h`` (module docstring)."""
    M, cw, r = c.M, c.cw, c.r
    one = M.price1(0, _res_stein(c), "gh", "cd").to("abcd")
    cross = one + one.rename("cdab").to("abcd")
    g2, x2 = gamma * gamma, xi * xi
    return (x2 * x2 * plain + g2 * g2 * r * c.S("V", "abcd") + g2 * x2 * cw * cross).to("abcd")


def _res_dg(c: Layer, plain: L, gamma, xi) -> L:
    """The mean-kernel shift after a residual layer: ``xi^2 DG'_plain + gamma^2 DG``."""
    return (xi * xi * plain + gamma * gamma * c.S("DG", "ab")).to("ab")


def _res_d(c: Layer, plain: L, gamma, xi) -> L:
    """``D`` after a residual layer (module docstring, "NTK side of residual layers")."""
    M, cw, r = c.M, c.cw, c.r
    jcd = cw * M.e((1, 1), "cd")
    cross = (
        r * cw * M.price1(0, c.S("D", "efcd"), "ef", "ab")
        + _jhk(c, _res_stein(c), "gh", "cd")
        + r * jcd * c.S("D", "abcd")
    )
    g2, x2 = gamma * gamma, xi * xi
    return (x2 * x2 * plain + g2 * g2 * r * c.S("D", "abcd") + g2 * x2 * cross).to("abcd")


def _res_a(c: Layer, plain: L, gamma, xi) -> L:
    """``A`` after a residual layer (module docstring)."""
    M, cw, r = c.M, c.cw, c.r
    y = r * (_jhk(c, c.S("D", "efab"), "ef", "cd") + cw * M.e((1, 1), "cd") * c.S("A", "abcd"))
    y = y.to("abcd")
    cross = y + y.rename("cdab").to("abcd")
    g2, x2 = gamma * gamma, xi * xi
    return (x2 * x2 * plain + g2 * g2 * r * c.S("A", "abcd") + g2 * x2 * cross).to("abcd")


def _res_b(c: Layer, plain: L, gamma, xi) -> L:
    """``B`` after a residual layer (module docstring)."""
    M, cw, r = c.M, c.cw, c.r
    own = M.e((1, 1), "ab") + M.e((1, 1), "cd")
    cross = cw * own * (c.T("ac") * c.T("bd") + r * c.S("B", "abcd"))
    g2, x2 = gamma * gamma, xi * xi
    return (x2 * x2 * plain + g2 * g2 * r * c.S("B", "abcd") + g2 * x2 * cross).to("abcd")


def _res_f(c: Layer, plain: L, gamma, xi) -> L:
    """``F`` after a residual layer (module docstring)."""
    M, cw, r = c.M, c.cw, c.r
    k = L(M.k, "ed")
    one = ein("abcd", M.d((1, 0), "eac"), c.T("ab") * k + r * c.S("F", "abed"))
    two = ein("abcd", M.d((1, 0), "fbd"), c.T("ab") * k.rename("cf") + r * c.S("F", "abcf"))
    g2, x2 = gamma * gamma, xi * xi
    return (x2 * x2 * plain + g2 * g2 * r * c.S("F", "abcd") + g2 * x2 * cw * (one + two)).to(
        "abcd"
    )


def _res_dh(c: Layer, plain: L, gamma, xi) -> L:
    """The NTK mean shift after a residual layer: ``xi^2 DH'_plain + gamma^2 DH``."""
    return (xi * xi * plain + gamma * gamma * c.S("DH", "ab")).to("ab")


def _res_pq_factors(c: Layer, gamma, xi):
    """``(chi^2 r, xi^2 lambda_W chi)`` with ``chi = gamma^2 + xi^2 C_W``."""
    chi = gamma * gamma + xi * xi * c.cw
    return chi * chi * c.r, xi * xi * c.lw * chi


def _res_p(c: Layer, plain: L, gamma, xi) -> L:
    """``P`` after a residual layer, linear activation only (module docstring)."""
    prop, src = _res_pq_factors(c, gamma, xi)
    k, r = c.M.k, c.r
    out = prop * c.S("P", "abcd") + src * (
        c.T("ab") * L(k, "cd")
        + c.T("ac") * L(k, "bd")
        + r * c.S("F", "abdc")
        + r * c.S("F", "acdb")
    )
    return out.to("abcd")


def _res_q(c: Layer, plain: L, gamma, xi) -> L:
    """``Q`` after a residual layer, linear activation only (module docstring)."""
    prop, src = _res_pq_factors(c, gamma, xi)
    k = c.M.k
    out = prop * c.S("Q", "abcd") + src * (c.T("bc") * L(k, "ad") + c.r * c.S("F", "bcad"))
    return out.to("abcd")


def _res_propagated(name):
    """``chi^2 r X``: the residual rule of a linear layer for the ddNTK statistics that have no
    source there (``PH, R, U``: zero for a linear network)."""

    def rule(c: Layer, plain: L, gamma, xi) -> L:
        prop, _ = _res_pq_factors(c, gamma, xi)
        return (prop * c.S(name, "abcd")).to("abcd")

    rule.__doc__ = f"``{name}`` after a residual layer, linear activation only: ``chi^2 r {name}``."
    return rule


def _res_qh(c: Layer, plain: L, gamma, xi) -> L:
    """``Q^`` after a residual layer, linear activation only (module docstring)."""
    prop, src = _res_pq_factors(c, gamma, xi)
    k = c.M.k
    out = prop * c.S("QH", "abcd") + src * (c.T("ac") * L(k, "bd") + c.r * c.S("F", "acbd"))
    return out.to("abcd")


def _res_s(c: Layer, plain: L, gamma, xi) -> L:
    """``S`` after a residual layer, linear activation only (module docstring)."""
    prop, src = _res_pq_factors(c, gamma, xi)
    out = prop * c.S("S", "abcd") + src * (c.T("ac") * c.T("bd") + c.r * c.S("B", "abcd"))
    return out.to("abcd")


def _res_t(c: Layer, plain: L, gamma, xi) -> L:
    """``T`` after a residual layer, linear activation only (module docstring); ``T_{abcd}``
    is ``T_{1342}`` (inputs 1 = a, 3 = b, 4 = c, 2 = d), as in the plain rule."""
    prop, src = _res_pq_factors(c, gamma, xi)
    k, r, lw = c.M.k, c.r, c.lw
    x2 = xi * xi
    out = (
        prop * c.S("T", "abcd")
        + x2 * x2 * lw * lw * (c.T("ad") * L(k, "bc") + r * c.S("F", "adbc"))
        + src * r * (c.S("QH", "dcab") + c.S("QH", "abdc"))
    )
    return out.to("abcd")


RESIDUAL = {
    "V": _res_v,
    "DG": _res_dg,
    "D": _res_d,
    "A": _res_a,
    "B": _res_b,
    "F": _res_f,
    "DH": _res_dh,
    "P": _res_p,
    "Q": _res_q,
    "PH": _res_propagated("PH"),
    "QH": _res_qh,
    "R": _res_propagated("R"),
    "S": _res_s,
    "T": _res_t,
    "U": _res_propagated("U"),
}
"""The residual-layer form of each statistic (module docstring): ``V`` and ``DG`` written for
any activation but exact only for a linear one (the rotation symmetry), the NTK side, the dNTK
and the ddNTK derived for the linear activation; :func:`rgnn.perturbative` uses them only
there (a nonlinear residual MLP has the single-input flow of :mod:`rgnn._residual_single`)."""


RULES = {
    "V": _v,
    "DG": _dg,
    "D": _d,
    "A": _a,
    "DH": _dh,
    "F": _f,
    "B": _b,
    "P": _p,
    "Q": _q,
    "PH": _ph,
    "QH": _qh,
    "R": _r,
    "S": _s,
    "T": _t,
    "U": _u,
}
