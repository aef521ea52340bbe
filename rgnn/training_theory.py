"""The end of training at O(1/n): the mean output of trained networks of width n.

:func:`end_of_training` predicts the ensemble mean of networks trained as :func:`rgnn.train`
trains them with ``loss="mse"``, ``optimizer="gd"`` (full batch, one learning rate ``eta``, NTK
parameterization), after ``steps`` steps or at convergence, to first order in ``1/n``; and the
expected change of the output NTK over training. PDLT ch. infinity ("the end of training")
gives the gradient-flow-like closed form with its "algorithm tensors"; the derivation below is
written out independently for the exact discrete steps, and goes beyond the book in three
places, said where they occur: the finite-step (``steps=``) prediction, any number of output
units ``C`` with per-unit targets, and the time-ordered sums in the NTK's eigenbasis.

Setting. ``N`` training inputs ``alpha``, any input ``delta``; ``C`` output units ``i``;
``theta`` the raw parameters (their gradient-descent factors are 1 in the NTK
parameterization, so the learning-rate-weighted gradient is ``g_{i delta} = grad z_{i delta}``
and the NTK ``H = g^T g`` has the width-independent mean ``Theta``). :func:`rgnn.train`'s loss
``(1 / 2NC) sum (z - y)^2`` makes one step ``Delta theta = -e sum_A g_A eps_A`` with
``e = eta / (N C)``, ``eps_A = z_A - y_A`` on training inputs ``A = (i, alpha)``. The exact
Taylor expansion of one step (as in PDLT ch. infinity, written out here for the discrete step):

.. math::

    z_\\Delta(t+1) - z_\\Delta(t) = -e H_{\\Delta A} \\epsilon_A
        + \\frac{e^2}{2} \\widehat{dH}_{\\Delta;AB} \\epsilon_A \\epsilon_B
        - \\frac{e^3}{6} ddI_{\\Delta;ABC} \\epsilon_A \\epsilon_B \\epsilon_C ,

with ``dH^_{0;12} = Hess z_0[g_1, g_2]`` (the Hessian-form dNTK) and
``ddI_{0;123} = D^3 z_0[g_1, g_2, g_3]``, all at ``theta(t)``. Their own drift along the path,
``H(t) = H(0) + sum_{s<t} [-e dH_{C;..}(s) eps_C(s) + (e^2/2) D^2H[g_C, g_D] eps_C eps_D]``,
``dH_C(s) = dH_C(0) - e sum_{r<s} D(dH_C)[g_E] eps_E(r)`` and
``dH^(t) = dH^(0) - e sum_{s<t} D(dH^)[g_E] eps_E(s)``, is written with the two ddNTKs of
:class:`rgnn.Perturbative` (``ddII_{12;34} = g_3^T Hess z_1 Hess z_2 g_4``):
``D(dH_{C;12})[g_E] = ddI_{1;C2E} + ddII_{1C;2E} + ddII_{12;CE} + (1 <-> 2)``,
``D^2 H_{12}[g_C, g_D] = ddI_{1;CD2} + ddI_{2;CD1} + ddII_{12;CD} + ddII_{12;DC}``,
``D(dH^_{0;12})[g_E] = ddI_{0;12E} + ddII_{01;2E} + ddII_{02;1E}``.

Orders. At infinite width ``H = Theta`` and the outputs follow the kernel dynamics
``eps(t) = M_t (z(0) - y)``, ``M_t = (1 - e Theta~)^t`` (``Theta~`` the training block): its
mean is the ``mean`` field. At O(1/n) (counting as PDLT: ``z`` and ``H`` O(1); the NTK
fluctuation ``O(1/sqrt n)`` with covariances ``A, B`` over ``n``; the dNTK O(1/n) in size but
correlated with ``z`` through ``P, Q``; the ddNTKs' means ``R, S, T, U`` over ``n``;
correlations of three of these are O(1/n^2)), ``z = z^0 + z^1`` where ``z^1`` follows the
same linear dynamics driven by the mean source ``s(t) = E[S(t)]``:

1. NTK mean shift: ``s = -e dTheta_{delta alpha} u_alpha(t)``, ``u(t) = -M_t y``.
2. NTK fluctuations (``eps^1`` linear in ``dH = H(0) - Theta``):
   ``s = e^2/n sum_{s<t} (M_{t-1-s})_{alpha alpha'} [A_{(delta alpha)(alpha' gamma)}
   + B_{delta alpha' alpha gamma} + C B_{delta gamma alpha alpha'}] u_gamma(s)``.
3. dNTK (``P, Q``; ``dH^``'s correlators ``P^, Q^`` follow from
   ``dH^_{0;12} = (dH_{1;02} + dH_{2;01} - dH_{0;12}) / 2``), from ``-e (H(t) - H(0)) eps(t)``
   and ``(e^2/2) dH^(0) eps eps``, each one ``E[dH z(0)]`` times one ``u``.
4. ddNTKs: the ``e^3`` terms (the drifts above and the last Taylor term) times
   ``E[eps_A eps_B eps_E]``, a Gaussian third moment: with ``w = z(0) - y``,
   ``E[w_{a x} w_{b y} w_{c z}] = -(y_a y_b y_c + d_ab K_xy y_c + d_ac K_xz y_b
   + d_bc K_yz y_a)``. Every unit index is paired by the statistics' Kronecker deltas; the
   pairing of the free unit with one slot gives ``u W + 2 K u + C K u`` structures with
   ``W_yz = sum_j y_jy y_jz`` (the number of output units ``C`` enters here and in item 2:
   beyond the book, which has ``C``-independent targets per unit).

Time sums (beyond the book's gradient-flow-like closed forms). In the eigenbasis of
``Theta~ = V diag(lambda) V^T`` every ``M_t`` is ``diag(rho^t)``, ``rho = 1 - e lambda``, so each
term is a static tensor (the statistic contracted with targets and kernels, every training
slot projected on ``V``) times a time kernel ``sum_{t_1 < ... < t_k} prod_j x_j^{t_j}``.
Written over the gaps ``g_0 = t_1``, ``g_i = t_{i+1} - t_i - 1`` each gap carries the product
of the factors alive in it, ``P_i``; at convergence the kernel is
``const * prod_i 1 / (1 - P_i)`` (the "algorithm tensors" of PDLT ch. infinity, e.g.
``X_II`` is ``1 / (1 - rho_a rho_b)`` up to ``e``'s), and after ``T`` steps it is the complete
homogeneous polynomial ``h_{T-k}(P_0, .., P_{k-1}, P_final)`` evaluated by its recursion (no
differences of eigenvalues appear: stable for degenerate spectra). The test-set shift is the
accumulated source propagated by the kernel-regression map,
``z^1_beta(T) = sum_t s_beta(t) - Theta_{beta alpha} Theta~^{-1} (sum_t s_alpha(t)
- z^1_alpha(T))``, and ``z^1_alpha(T) = sum_t M_{T-1-t} s_alpha(t) -> 0`` at convergence
(every network reaches its targets).

NTK change. ``E[H_ii(T) - H_ii(0)]`` at O(1/n): the first two sums of ``H(t)`` above, with
``E[dH z(0)]`` (``P, Q``) and the ddNTK means times the Gaussian second moment of ``eps``.

Checked against trained networks (tools/end_of_training_mc.py: 4 training and 2 test inputs,
50 steps, widths 32-256, antithetic pairs and two control variates, fit ``n * departure =
c + d / n``; fitted ``c`` vs predicted ``n * correction``): tanh depth 2 (``e lambda_max = 1``,
1024 networks per width): test outputs ``-1.350 +- 0.108`` vs ``-1.377`` and ``-0.604 +- 0.109``
vs ``-0.630``, the 21 NTK-change entries within 3.0 SE (largest ``-4.52 +- 0.10`` vs ``-4.74``);
gelu depth 2 (``e lambda_max = 0.5``, 512): ``-1.13 +- 0.21`` vs ``-1.27``, ``-0.81 +- 0.14`` vs
``-0.76``, NTK change within 1.5 SE (``13.67 +- 0.22`` vs ``13.48``); tanh depth 3
(``e lambda_max = 0.5``, 512): ``-2.14 +- 0.18`` vs ``-2.12``, ``-0.63 +- 0.12`` vs ``-0.73``, NTK
change within 2.8 SE (the largest diagonal entries measured 5-10% below the prediction in
magnitude, as for tanh depth 2: an O(1/n^2) remainder or a small missing term, unresolved);
gelu depth 1 within 1.8 SE;
two steps, two output units (tests and a script): within 1.7 SE.
Linear residual MLPs (PDLT appendix B; their full statistics are exact, the NTK mean shift and
the first ddNTK vanish), depth 3, 20 steps at ``e lambda_max = 0.5``, 4 training inputs of
dimension 6 and 2 test inputs (``n_0 > N``: with ``N >= n_0 + 1`` the trained affine map, hence
the test output, is fixed by the targets at every width), widths 32-128, 2048 networks per
width: ``gamma = 0.8, xi = 0.6``: test outputs ``+0.07 +- 0.17`` vs ``+0.01`` and
``-1.73 +- 0.14`` vs ``-1.56``, the 21 NTK-change entries within 1.4 SE (largest
``-5.86 +- 0.28`` vs ``-5.82``); per layer ``gamma = (0.5, 1), xi = (1, 0.5)``: ``-0.03 +- 0.17``
vs ``+0.03``, ``-1.79 +- 0.14`` vs ``-1.66``, NTK change within 1.4 SE (``-11.98 +- 0.45`` vs
``-11.89``). Smooth residual MLPs (the set flows of :mod:`rgnn._residual_multi` in
:func:`rgnn.perturbative`'s full layout): tanh depth 2, ``gamma = 0.8, xi = 0.6``, 4 + 2
inputs, 50 steps at ``e lambda_max = 1``, widths 32-256, 2048 networks per width: test outputs
``-1.00 +- 0.10`` vs ``-0.96`` and ``-0.55 +- 0.08`` vs ``-0.51``, the 21 NTK-change entries
within 2.3 SE (largest ``-3.64 +- 0.07`` vs ``-3.71``); ``gamma = 0.5, xi = 1`` (other inputs):
``+0.07 +- 0.11`` vs ``-0.09``, ``+1.16 +- 0.14`` vs ``+1.35``, NTK change within 1.9 SE
(``-3.48 +- 0.09`` vs ``-3.59``); gelu depth 2, ``gamma = 0.8, xi = 0.6``,
``e lambda_max = 0.5``: ``-1.03 +- 0.14`` vs ``-0.78``, ``-0.46 +- 0.10`` vs ``-0.39``, NTK change
within 2.9 SE (three entries of the first two training inputs 2.3-2.8 SE below the prediction,
``-0.57 +- 0.12`` vs ``-0.23`` the largest departure: an O(1/n^2) remainder or a small missing
term, unresolved).

Scale-invariant activations (relu, leaky relu). Their ddNTK exists only pointwise
(:func:`rgnn.perturbative`'s ``kinks``); a finite step moves a unit across the kink with
probability O(step), which the Taylor expansion does not see. Measured (tools/
end_of_training_mc.py, relu, depth 2, 50 steps at ``e lambda_max = 1``, widths 64 to 256, 512
networks each): the trained mean departs from ``mean`` by ``-0.069, -0.047, -0.036`` (SE
``0.005, 0.003, 0.002``), about ``n^-1/2``, while the pointwise 1/n correction is ``+0.11 / n``.
So for relu and leaky relu ``scaling`` says "not 1/n", :attr:`EndOfTraining.valid` is False and
a warning is issued; the pointwise correction is returned only for reference. ``linear`` has
no kink and follows the derivation.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from rgnn._validate import check_learning_rate, check_pair
from rgnn.architecture import MLP
from rgnn.fixed_point import fixed_point
from rgnn.perturbative import Perturbative, _check_multi_order, perturbative

__all__ = ["EndOfTraining", "end_of_training"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class EndOfTraining:
    """The O(1/n) prediction for trained networks: ``N`` training inputs, ``N*`` test inputs,
    ``C = out_dim`` outputs (module docstring for the derivation).

    Attributes:
      mean: ``[N*, C]`` the infinite-width mean output on the test inputs after ``steps``
        steps (kernel regression ``Theta_{beta alpha} Theta~^{-1} (1 - M_T) y`` at convergence
        ``Theta_{beta alpha} Theta~^{-1} y``).
      correction: ``[N*, C]`` the O(1/n) shift of the ensemble mean, already divided by the
        width: ``mean + correction`` predicts ``E[f_T(x_test)]`` for networks of this width.
        The sum of the five parts below.
      correction_ntk_mean: ``[N*, C]`` the part from the NTK's mean shift.
      correction_ntk_fluctuation: ``[N*, C]`` the part from the NTK's fluctuations (``A, B``).
      correction_dntk: ``[N*, C]`` the part from the dNTK (``P, Q``).
      correction_ddntk1: ``[N*, C]`` the part from the first ddNTK (``R``).
      correction_ddntk2: ``[N*, C]`` the part from the second ddNTK (``S, T, U``).
      train_mean: ``[N, C]`` the infinite-width mean on the training inputs (``y`` at
        convergence).
      train_correction: ``[N, C]`` its O(1/n) shift (zero at convergence).
      ntk_change: ``[N + N*, N + N*]`` ``E[Theta_T - Theta_0]`` at O(1/n) on ``[x_train; x_test]``,
        the output NTK of one unit (``H_ii``, averaged over the ``C`` units), divided by the
        width.
      ntk: ``[N + N*, N + N*]`` the infinite-width output NTK ``Theta``.
      width: ``n_L``, the last hidden width that normalizes the statistics (static).
      learning_rate: ``eta`` (static).
      steps: the number of steps, or ``None`` for convergence (static).
      stability: ``e lambda_max`` with ``e = eta / (N C)``; gradient descent converges for
        values below 2 (static).
      quadrature_error: the statistics' estimated relative quadrature error (static).
      scaling: ``"1/n"`` where the derivation holds (smooth activations, linear), or a
        sentence saying why not (static).
    """

    mean: jax.Array
    correction: jax.Array
    correction_ntk_mean: jax.Array
    correction_ntk_fluctuation: jax.Array
    correction_dntk: jax.Array
    correction_ddntk1: jax.Array
    correction_ddntk2: jax.Array
    train_mean: jax.Array
    train_correction: jax.Array
    ntk_change: jax.Array
    ntk: jax.Array
    width: int = dataclasses.field(metadata=dict(static=True))
    learning_rate: float = dataclasses.field(metadata=dict(static=True))
    steps: int | None = dataclasses.field(metadata=dict(static=True))
    stability: float = dataclasses.field(metadata=dict(static=True))
    quadrature_error: float = dataclasses.field(metadata=dict(static=True))
    scaling: str = dataclasses.field(metadata=dict(static=True))

    @property
    def valid(self) -> bool:
        """Whether the 1/n derivation describes these networks (``scaling == "1/n"``)."""
        return self.scaling == "1/n"


# ----------------------------------------------------------------------------- time kernels
def _kernel(gaps, const, steps, final=None):
    """``sum_{0 <= t_1 < .. < t_k} prod x_j^{t_j}`` from its gap factors ``gaps = [P_0, ..,
    P_{k-1}]`` (module docstring): at convergence (``steps is None``)
    ``const prod 1 / (1 - P_i)``; after ``steps`` steps, with the last gap
    ``T - 1 - t_k`` weighted by ``final`` (1 when ``None``), ``const h_{T-k}(P_0, .., final)``
    by the recursion ``c_i(m) = P_i c_i(m-1) + c_{i-1}(m)``."""
    k = len(gaps)
    if steps is None:
        out = const
        for p in gaps:
            out = out / (1 - p)
        return out
    allp = list(gaps) + [jnp.ones_like(gaps[0]) if final is None else final]
    shape = jnp.broadcast_shapes(*(jnp.shape(p) for p in allp), jnp.shape(const))
    allp = [jnp.broadcast_to(p, shape) for p in allp]
    m = steps - k
    if m < 0:
        return jnp.zeros(shape, allp[0].dtype)

    def body(_, c):
        new = [allp[0] * c[0]]
        for i in range(1, k + 1):
            new.append(allp[i] * c[i] + new[i - 1])
        return tuple(new)

    c0 = tuple(jnp.ones(shape, allp[0].dtype) for _ in allp)
    c = jax.lax.fori_loop(0, m, body, c0)
    return const * c[k]


# ----------------------------------------------------------------------------- statistics
_PAIRINGS = ((0, 1, 2, 3), (0, 2, 3, 1), (0, 3, 1, 2))  # the slot order of R/S, R/T, R/U


def _three_eps(stats, pieces, m3, ntr):
    """``sum_{pieces, pairings} stat[d, x, y, z] * M3_role[i, x, y, z]`` in the eigenbasis:
    ``[N_all, C, ntr, ntr, ntr]``. ``pieces``: ``(kind, labels)`` with ``kind`` ``"I"`` or
    ``"II"`` and ``labels`` the slot labels (``d`` free, ``x y z`` the three epsilons) of the
    statistic's four unit/slot positions; ``m3[role]`` the projected third moment with the free
    unit paired to ``role``."""
    out = {"I": 0.0, "II": 0.0}
    for kind, labels in pieces:
        tens = (stats["R"],) * 3 if kind == "I" else (stats["S"], stats["T"], stats["U"])
        for order, tensor in zip(_PAIRINGS, tens, strict=True):
            axes = "".join(labels[p] for p in order)  # the labels of the tensor's axes
            # the free label d pairs with the label sharing its Kronecker delta
            pairs = [(order[0], order[1]), (order[2], order[3])]
            pairs = [(labels[a], labels[b]) for a, b in pairs]
            (pair_d,) = [p for p in pairs if "d" in p]
            partner = pair_d[0] if pair_d[1] == "d" else pair_d[1]
            g = jnp.einsum(f"{axes}->dxyz", _slice(tensor, axes, stats, ntr))
            out[kind] = out[kind] + g[:, None] * m3[partner][None]
    return out["I"], out["II"]


def _slice(tensor, axes, stats, ntr):
    """The statistic with its training-slot axes restricted to training inputs and projected
    on the eigenvectors (the free axes ``d``, ``e`` keep every input)."""
    v = stats["V"]
    for pos, lab in enumerate(axes):
        if lab not in "de":
            tensor = jnp.moveaxis(
                jnp.tensordot(jnp.moveaxis(tensor, pos, -1)[..., :ntr], v, axes=1), -1, pos
            )
    return tensor


def _two_eps(stats, pieces, m2, ntr):
    """``sum stat[d, e, y, z] * M2_pairing[i, y, z]`` for the NTK change: ``[N_all, N_all, C,
    ntr, ntr]`` (``d, e`` the two free slots of one unit, ``y, z`` the two epsilons)."""
    out = {"I": 0.0, "II": 0.0}
    for kind, labels in pieces:
        tens = (stats["R"],) * 3 if kind == "I" else (stats["S"], stats["T"], stats["U"])
        for order, tensor in zip(_PAIRINGS, tens, strict=True):
            axes = "".join(labels[p] for p in order)
            pairs = {
                frozenset((labels[order[0]], labels[order[1]])),
                frozenset((labels[order[2]], labels[order[3]])),
            }
            key = "free" if frozenset("de") in pairs else "cross"
            g = jnp.einsum(f"{axes}->deyz", _slice(tensor, axes, stats, ntr))
            out[kind] = out[kind] + g[:, :, None] * m2[key][None, None]
    return out["I"], out["II"]


# ----------------------------------------------------------------------------- the prediction
def _full_statistics_missing(arch: MLP) -> str | None:
    """Why :func:`rgnn.perturbative` cannot give ``arch``'s statistics in the full four-index
    layout with the ddNTK (``full=True, ddntk=True``, what :func:`end_of_training` contracts on
    every tuple of the training and test inputs), or ``None`` where it can.

    The one place where :func:`end_of_training` and the sweep's prediction
    (``rgnn.study._end_of_training``) learn that capability, before any costly work. It follows
    :func:`rgnn.perturbative`'s own refusal of ``full=True``: a residual MLP with a kinked
    activation (relu, leaky relu), whose statistics exist in the pair layout only (linear
    residual MLPs are exact in full, :mod:`rgnn.flow.rules`; smooth ones have the set flows of
    :mod:`rgnn._residual_multi`). ``tests/test_end_of_training.py`` checks the two agree.
    """
    act = arch.act
    if arch.is_residual and act.scale_invariant and act.negative_slope not in (None, 1.0):
        return (
            f"a residual MLP with the kinked activation {act.name!r}: rgnn.perturbative gives "
            "its statistics in the pair layout only (full=True is implemented for smooth and "
            "linear activations), and the end-of-training prediction contracts them on every "
            "tuple of the training and test inputs"
        )
    return None


def end_of_training(
    arch: MLP,
    x_train,
    y_train,
    x_test,
    *,
    learning_rate: float,
    steps: int | None = None,
    quadrature_order: int = 48,
    memory_limit: float = 8 * 2**30,
    statistics: Perturbative | None = None,
    quadrature_order_multi: int | None = None,
) -> EndOfTraining:
    """The mean output of trained networks of ``arch``'s widths, to O(1/n).

    Networks trained as :func:`rgnn.train` trains them with ``loss="mse"``, ``optimizer="gd"``
    (loss ``(1/2NC) sum (f - y)^2``, one learning rate), NTK parameterization. Derivation,
    sources and the orders kept: the module docstring.

    Args:
      arch: the :class:`~rgnn.MLP` (``parameterization="ntk"``); a residual one where
        :func:`rgnn.perturbative` gives its statistics with ``full=True`` (a smooth or linear
        activation; a ``ValueError`` for relu and leaky relu, naming what is missing).
      x_train: ``[N, n_0]`` training inputs (distinct: the NTK on them must be invertible).
      y_train: ``[N, out_dim]`` (or ``[N]`` when ``out_dim == 1``) targets.
      x_test: ``[N*, n_0]`` test inputs.
      learning_rate: ``eta``; full-batch gradient descent is stable for
        ``eta lambda_max(Theta~) / (N out_dim) < 2`` at infinite width (a ``ValueError``
        above). Finite networks' NTKs fluctuate around ``Theta``: near that limit and at small
        width some of them diverge (measured: relu depth 2 and gelu depth 3 at width 32 with
        ``stability = 1``), and the ensemble mean has no 1/n expansion there.
      steps: the number of gradient-descent steps, or ``None`` (default) for convergence.
      quadrature_order: passed to :func:`rgnn.perturbative`.
      memory_limit: bytes the statistics may use (:func:`rgnn.perturbative`).
      statistics: the statistics, if already computed: ``rgnn.perturbative(arch,
        concatenate([x_train, x_test]), full=True, ddntk=True)`` (with ``kinks="pointwise"``
        for relu and leaky relu); several learning rates or step counts then share one
        computation of the costly part.
      quadrature_order_multi: nodes per dimension of the rule on three and four distinct
        inputs (:func:`rgnn.perturbative`; ``None``: its node budget, 12 from 13 inputs on).

    Returns:
      An :class:`EndOfTraining`. The statistics are ``rgnn.perturbative(arch, [x_train;
      x_test], full=True, ddntk=True)``; their time is the Gaussian moments on every four
      distinct inputs, ``C(N + N*, 4)`` tensor-product quadratures per layer step (their
      einsums grow like ``(N + N*)^5``, their memory like ``(N + N*)^4``). From 13 inputs on
      that rule has 12 nodes per dimension by default (its time grows like the fourth power
      of ``quadrature_order_multi``). Measured, 12 + 2 inputs, depth 3, 200 steps, against
      24 nodes: tanh at 12 nodes, one test output's correction 7.7% and an NTK-change entry
      0.3% off (``quadrature_error`` 0.028), at 16 nodes 1.3% and 0.04% (0.0046; first call
      94 s instead of 74 s on a loaded machine); gelu at 12 nodes 0.04% (0.10: pessimistic
      there; depth 1 on 6 + 2 inputs 3.1% with 0.094). ``quadrature_error`` bounds the
      statistics' relative error, not always the correction's, a difference of larger terms
      (:data:`rgnn.perturbative.TRUST_QUADRATURE_ERROR`: the calibration and the warning).
    """
    if not isinstance(arch, MLP):
        raise ValueError(f"arch: expected an rgnn.MLP, got {type(arch).__name__}")
    if arch.parameterization != "ntk":
        raise ValueError(
            "arch: expected parameterization='ntk' (the only one here whose NTK and learning "
            f"rate are width independent), got {arch.parameterization!r}"
        )
    missing = _full_statistics_missing(arch)
    if missing is not None:
        raise ValueError(f"arch: {missing}")
    eta = check_learning_rate(learning_rate)
    _check_multi_order(quadrature_order_multi)
    if steps is not None and (
        isinstance(steps, bool) or not isinstance(steps, int | np.integer) or steps < 0
    ):
        raise ValueError(f"steps: expected None (convergence) or an integer >= 0, got {steps!r}")
    steps = None if steps is None else int(steps)
    x_train, x_test = check_pair(x_train, x_test, ("x_train", "x_test"))
    dtype = x_train.dtype
    ntr = x_train.shape[0]
    c_out = arch.out_dim
    try:
        y = np.asarray(y_train, dtype=float)
    except (TypeError, ValueError):
        raise ValueError("y_train: expected an array of real targets") from None
    if y.ndim == 1 and c_out == 1:
        y = y[:, None]
    if y.shape != (ntr, c_out):
        raise ValueError(
            f"y_train: expected shape [{ntr}, {c_out}] (one row per training input, "
            f"arch.out_dim outputs), got {y.shape}"
        )
    if not np.all(np.isfinite(y)):
        raise ValueError("y_train: expected finite values, found NaN or inf")
    y = jnp.asarray(y, dtype)

    act = arch.act
    kinked = act.scale_invariant and act.negative_slope not in (None, 1.0)
    x_all = jnp.concatenate([x_train, x_test], axis=0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="fixed_point:", category=UserWarning)
        theta = fixed_point(arch, x_all, quadrature_order=quadrature_order).ntk[-1]
    lam, vec = jnp.linalg.eigh(theta[:ntr, :ntr])
    if not bool(lam[0] > 1e3 * jnp.finfo(dtype).eps * lam[-1]):
        raise ValueError(
            "x_train: the infinite-width NTK on the training inputs is singular (duplicate or "
            "parallel inputs?); gradient descent does not converge to the targets"
        )
    e = eta / (ntr * c_out)
    stability = float(e * lam[-1])
    if not stability < 2:
        raise ValueError(
            f"learning_rate: expected below the stability limit 2 N C / lambda_max = "
            f"{2 * ntr * c_out / float(lam[-1]):.6g} of full-batch gradient descent "
            f"(lambda_max = {float(lam[-1]):.6g}), got {eta!r}"
        )
    if statistics is None:
        p = perturbative(
            arch,
            x_all,
            full=True,
            ddntk=True,
            kinks="pointwise" if kinked else "distributional",
            quadrature_order=quadrature_order,
            quadrature_order_multi=quadrature_order_multi,
            memory_limit=memory_limit,
        )
    else:
        p = statistics
        n_all = x_all.shape[0]
        if not isinstance(p, Perturbative) or p.ddntk_u is None:
            raise ValueError(
                "statistics: expected an rgnn.Perturbative with the ddNTK fields "
                "(perturbative(..., full=True, ddntk=True))"
            )
        if p.ddntk_u.shape != (arch.n_layers, n_all, n_all, n_all, n_all):
            raise ValueError(
                f"statistics: expected full fields [L+1, N, N, N, N] on the {n_all} inputs "
                f"[x_train; x_test] of this {arch.n_layers}-layer architecture, got "
                f"ddntk_u of shape {tuple(p.ddntk_u.shape)}"
            )
        if not np.allclose(np.asarray(p.ntk[-1]), np.asarray(theta), rtol=1e-6, atol=1e-9):
            raise ValueError(
                "statistics: its NTK differs from this architecture's on [x_train; x_test] "
                "(computed for other inputs or another architecture?)"
            )
    theta = p.ntk[-1]
    if kinked:
        scaling = (
            f"not 1/n: {act.name} has a kink, and a finite step moves units across it, which the "
            "Taylor expansion of training does not see; Monte Carlo (relu, depth 2, 50 steps at "
            "e lambda_max = 1, widths 64-256) measured the trained mean's departure falling like "
            "n^-0.4 to n^-0.55, not 1/n, and of the other sign than this pointwise 1/n "
            "correction, which therefore does not describe these networks"
        )
        warnings.warn(f"end_of_training: scaling {scaling}", UserWarning, stacklevel=2)
    else:
        scaling = "1/n"
    width = int(arch.widths[-1])
    out = _predict(
        theta,
        p.nngp[-1],
        p.ntk_correction[-1],
        dict(
            A=p.ntk_vertex[-1],
            B=p.ntk_b[-1],
            P=p.dntk_p[-1],
            Q=p.dntk_q[-1],
            R=p.ddntk_r[-1],
            S=p.ddntk_s[-1],
            T=p.ddntk_t[-1],
            U=p.ddntk_u[-1],
        ),
        y,
        lam,
        vec,
        e=e,
        n=float(p.widths[-1]),
        steps=steps,
    )
    return EndOfTraining(
        **out,
        ntk=theta,
        width=width,
        learning_rate=eta,
        steps=steps,
        stability=stability,
        quadrature_error=float(p.quadrature_error),
        scaling=scaling,
    )


@functools.partial(jax.jit, static_argnames=("steps",))
def _predict(theta, k_all, dtheta, raw, y, lam, v, *, e, n, steps):
    """Every field of :class:`EndOfTraining` from the output layer's statistics (one jitted
    program: op by op, its hundred small einsums each compiled on their own)."""
    ntr, c_out = y.shape
    rho = 1 - e * lam
    yh = v.T @ y  # [ntr, C]
    kh = v.T @ k_all[:ntr, :ntr] @ v
    wh = yh @ yh.T
    c = float(c_out)
    stats = dict(raw, V=v)
    ra, rb, rc = rho[:, None, None], rho[None, :, None], rho[None, None, :]
    rd = rho[:, None, None, None]  # the propagated free index, for finite steps

    def add(f, gaps, const):
        """One term: ``f [N_all, C, e...]`` the static tensor on ``len(gaps)`` time variables.
        Returns (accumulated source on all inputs, training state after ``steps``)."""
        axes = "abc"[: f.ndim - 2]
        kern = _kernel(gaps, const, steps)
        total = jnp.einsum(f"di{axes},{axes}->di", f, kern)
        if steps is None:
            return total, jnp.zeros((ntr, c_out), f.dtype)
        fh = jnp.einsum("dp,di...->pi...", v, f[:ntr])
        g = [jnp.expand_dims(q, 0) for q in gaps]
        fin = rd if f.ndim == 5 else (rho[:, None, None] if f.ndim == 4 else rho[:, None])
        kern_d = _kernel(g, jnp.expand_dims(const, 0), steps, final=fin)
        return total, jnp.einsum(f"pi{axes},p{axes}->pi", fh, kern_d)

    def vproj(t, axes_to_project):
        for ax in axes_to_project:
            t = jnp.moveaxis(jnp.tensordot(jnp.moveaxis(t, ax, -1)[..., :ntr], v, axes=1), -1, ax)
        return t

    one = jnp.ones_like(rho)
    parts = {}
    # 1. NTK mean shift
    f = e * vproj(dtheta, [1])[:, None, :] * yh.T[None]  # [d, i, a]
    parts["ntk_mean"] = [add(f, [rho], one)]
    # 2. NTK fluctuations
    a_, b_ = raw["A"], raw["B"]
    ab = a_ + jnp.einsum("dbag->dabg", b_) + c * jnp.einsum("dgab->dabg", b_)
    ab = vproj(ab, [1, 2, 3])
    db = jnp.einsum("dbbc->dbc", ab)
    f = -(e**2 / n) * db[:, None] * yh.T[None, :, None, :]  # [d, i, b, c]
    parts["ntk_fluctuation"] = [add(f, [rho[None, :], rho[:, None]], jnp.ones((ntr, ntr)))]
    # 3. dNTK
    p_, q_ = raw["P"], raw["Q"]
    ph = 0.5 * (jnp.einsum("bcad->abcd", q_) + jnp.einsum("cbad->abcd", q_) - p_)
    qh = 0.5 * (jnp.einsum("bacd->abcd", q_) + jnp.einsum("cabd->abcd", p_) - q_)
    dnt = []
    # c1a: G1[d, g, a, g'] = C P[g,d,a,g'] + Q[g,d,a,g'] + Q[g,a,d,g']; s@gamma (p), t@alpha (q)
    g1 = c * jnp.einsum("gdaq->dgaq", p_) + jnp.einsum("gdaq->dgaq", q_)
    g1 = g1 + jnp.einsum("gadq->dgaq", q_)
    d1 = jnp.einsum("dpqp->dpq", vproj(g1, [1, 2, 3]))
    f = -(e**2 / n) * d1[:, None] * yh.T[None, :, None, :]  # [d, i, p, q]
    pp, qq = rho[:, None], rho[None, :]
    dnt.append(add(f, [pp * qq, qq * jnp.ones_like(pp)], qq * jnp.ones_like(pp)))
    # c1b: G2[d, g, a, a'] = P[g,d,a,a'] + C Q[g,d,a,a'] + Q[g,a,d,a']; s@gamma (q), t@alpha (p)
    g2 = jnp.einsum("gdab->dgab", p_) + c * jnp.einsum("gdab->dgab", q_)
    g2 = g2 + jnp.einsum("gadb->dgab", q_)
    d2 = jnp.einsum("dqpp->dqp", vproj(g2, [1, 2, 3]))
    f = -(e**2 / n) * d2[:, None] * yh.T[None, :, :, None]  # [d, i, q, p]
    qq, pp = rho[:, None], rho[None, :]
    dnt.append(add(f, [pp * qq, pp * jnp.ones_like(qq)], pp * jnp.ones_like(qq)))
    # d1: G3[d, a, b, a'] = P^[d,a,b,a'] + Q^[d,a,b,a'] + C Q^[d,b,a,a']; t@alpha (p), t@beta (q)
    g3 = ph + qh + c * jnp.einsum("dbaq->dabq", qh)
    d3 = jnp.einsum("dpqp->dpq", vproj(g3, [1, 2, 3]))
    f = -(e**2 / n) * d3[:, None] * yh.T[None, :, None, :]
    dnt.append(add(f, [rho[:, None] * rho[None, :]], jnp.ones((ntr, ntr))))
    parts["dntk"] = dnt
    # 4. ddNTKs: the projected third moments, free unit paired with slot x, y or z
    yt = yh.T  # [C, ntr]
    m3 = {
        "x": -(
            yt[:, :, None, None] * wh[None, None]
            + kh[None, :, :, None] * yt[:, None, None, :]
            + kh[None, :, None, :] * yt[:, None, :, None]
            + c * kh[None, None] * yt[:, :, None, None]
        ),
    }
    m3["y"] = jnp.einsum("iyxz->ixyz", m3["x"])
    m3["z"] = jnp.einsum("izyx->ixyz", m3["x"])
    ones3 = jnp.ones((ntr, ntr, ntr))
    patterns = [
        # X: x = tau@t, y = sigma@s, z = rho@r (r < s < t)
        (
            -(e**3) / n,
            [
                ("I", "dyxz"),
                ("II", "dyxz"),
                ("II", "dxyz"),
                ("I", "xydz"),
                ("II", "xydz"),
                ("II", "xdyz"),
            ],
            [ra * rb * rc, ra * rb * ones3, ra * ones3],
            ra**2 * rb * ones3,
        ),
        # Y: x = tau@t, y = sigma@s, z = kappa@s (s < t)
        (
            -(e**3) / (2 * n),
            [("I", "dyzx"), ("I", "xyzd"), ("II", "dxyz"), ("II", "dxzy")],
            [ra * rb * rc, ra * ones3],
            ra * ones3,
        ),
        # Z: x = alpha@t, y = beta@t, z = sigma@s (s < t)
        (
            -(e**3) / (2 * n),
            [("I", "dxyz"), ("II", "dxyz"), ("II", "dyxz")],
            [ra * rb * rc, ra * rb * ones3],
            ra * rb * ones3,
        ),
        # the last Taylor term: all at t
        (-(e**3) / (6 * n), [("I", "dxyz")], [ra * rb * rc], ones3),
    ]
    parts["ddntk1"], parts["ddntk2"] = [], []
    for coef, pieces, gaps, const in patterns:
        f1, f2 = _three_eps(stats, pieces, m3, ntr)
        for name, f in (("ddntk1", f1), ("ddntk2", f2)):
            if not isinstance(f, float):  # the last Taylor term has no second ddNTK
                parts[name].append(add(coef * f, gaps, const))

    # propagate: test shift = sum s_beta - Theta_{beta alpha} Theta~^{-1} (sum s_alpha - z_alpha(T))
    tv = theta[ntr:, :ntr] @ v / lam[None, :]  # [N*, ntr]
    fields = {}
    total_test = 0.0
    total_train = 0.0
    for name, terms in parts.items():
        s_all = sum(t[0] for t in terms)
        z_tr = sum(t[1] for t in terms)  # eigenbasis
        test = s_all[ntr:] - tv @ (v.T @ s_all[:ntr] - z_tr)
        fields["correction_" + name] = test
        total_test = total_test + test
        total_train = total_train + v @ z_tr
    fields["correction"] = total_test
    fields["train_correction"] = total_train
    # infinite-width means
    if steps is None:
        done = jnp.ones_like(rho)
    else:
        done = 1 - rho**steps
    fields["mean"] = tv @ (done[:, None] * yh)
    fields["train_mean"] = v @ (done[:, None] * yh)

    # NTK change: E[H_ii(T) - H_ii(0)], averaged over units
    # dNTK: -(e/n) sum_{s<T} (M_s)_{g g'} [C P[g,d,e,g'] + Q[g,d,e,g'] + Q[g,e,d,g']]
    gn = c * jnp.einsum("gdeq->degq", p_) + jnp.einsum("gdeq->degq", q_)
    gn = gn + jnp.einsum("gedq->degq", q_)
    dn = jnp.einsum("depp->dep", vproj(gn, [2, 3]))
    kern = _kernel([rho], one, steps)
    change = -(e / n) * jnp.einsum("dep,p->de", dn, kern)
    m2 = {
        "free": jnp.broadcast_to(wh + c * kh, (c_out, ntr, ntr)),
        "cross": yt[:, :, None] * yt[:, None, :] + kh[None],
    }
    ones2 = jnp.ones((ntr, ntr))
    rb2, rc2 = rho[:, None], rho[None, :]
    pat2 = [
        # X: y = sigma@s, z = rho@r (r < s < T)
        (
            e**2 / n,
            [
                ("I", "dyez"),
                ("II", "dyez"),
                ("II", "deyz"),
                ("I", "eydz"),
                ("II", "eydz"),
                ("II", "edyz"),
            ],
            [rb2 * rc2, rb2 * ones2],
            rb2 * ones2,
        ),
        # Y: y = sigma@s, z = kappa@s
        (
            e**2 / (2 * n),
            [("I", "dyze"), ("I", "eyzd"), ("II", "deyz"), ("II", "dezy")],
            [rb2 * rc2],
            ones2,
        ),
    ]
    for coef, pieces, gaps, const in pat2:
        f1, f2 = _two_eps(stats, pieces, m2, ntr)
        kern = _kernel(gaps, const, steps)
        change = change + coef * jnp.einsum("deiyz,yz->de", f1 + f2, kern) / c
    fields["ntk_change"] = change
    return fields
