"""How far training carries finite networks from the Gaussian fixed point, layer by layer.

:func:`compare` takes an architecture, its inputs and a :class:`~rgnn.Training` (or a bare
:class:`~rgnn.Ensemble`, which is step 0 only) and measures, per recorded step ``t`` and layer
``l``, the quantities below. ``G`` is a network's empirical NNGP (the stochastic metric),
``Theta`` its empirical NTK (:func:`rgnn.ensemble_kernels`), ``K`` and ``Theta^inf`` the
reference kernels (:func:`rgnn.fixed_point`; for muP the width-``n`` Gaussian kernels, see
:func:`gaussian_reference`), ``||.||`` the Frobenius norm over the ``N x N`` inputs, and
``<.>`` the mean over the ``M`` networks.

**Per-network measures** (each network's value, then ``<.>`` with standard error
``std / sqrt(M)``):

* ``nngp_distance = ||G_t - K|| / ||K||``, ``ntk_distance = ||Theta_t - Theta^inf|| /
  ||Theta^inf||``;
* ``nngp_cka``, ``ntk_cka``: centered kernel alignment (Cortes, Mohri & Rostamizadeh 2012,
  eq. 1; Kornblith et al. 2019, eq. 3 with Gram matrices)
  ``CKA(A, B) = <HAH, HBH> / (||HAH|| ||HBH||)``, ``H = I - 11^T / N``: 1 when the two kernels
  agree up to scale and a constant shift, blind to the overall scale;
* ``ntk_movement = ||Theta_t - Theta_0|| / ||Theta_0||`` (Lee et al. 2019, Fig. 1);
* ``gap = rms(f_t - f^lin_t)``: the root mean square over the ``N x C`` outputs of the
  difference between the trained network and the *infinite-width* linearized prediction from
  the same initial outputs (:func:`linearized_prediction` with the reference output NTK
  ``Theta^inf``), and ``test_gap`` the same on the test inputs.

**Ensemble-mean measures** (``mean_*``): the same norms of ensemble averages,
``mean_nngp_distance = ||<G_t> - K|| / ||K||``, ``mean_ntk_distance``,
``mean_ntk_movement = ||<Theta_t - Theta_0>|| / ||<Theta_0>||`` and
``mean_gap = rms(<f_t - f^lin_t>)``. A norm of a noisy average is biased upwards by the noise
(``E||<X>||^2 = ||E X||^2 + tr Cov X / M``); these use the delete-one jackknife over networks
for the bias-corrected value and its standard error (``_se``), so they estimate the norm of the
*expectation*, which may come out below zero when the noise dominates.

**Which scale with which power of the width** (NTK or standard parameterization, fixed
learning rate and training time; PDLT ch. 8-11; Lee et al. 2019). At initialization a network's
empirical kernels fluctuate around the fixed point by ``O(n^{-1/2})`` (their variance is
``V / n``, PDLT ch. 4 and 8) while their means shift by ``O(1/n)``. Hence:

* ``nngp_distance``, ``ntk_distance``: ``n^{-1/2}`` per network; ``mean_*_distance``: ``n^{-1}``.
* ``gap``: ``n^{-1/2}`` per network, because ``f^lin_t`` evolves the network's own ``f_0`` with
  ``Theta^inf`` while the network evolves it with its own ``Theta_0``, which differs by the
  ``n^{-1/2}`` fluctuation. Its mean over networks, ``mean_gap``, is ``n^{-1}``: the fluctuation
  averages out (``E[B(Theta_0) f_0] = 0``, as flipping the sign of the output layer flips ``f_0``
  and leaves ``Theta_0`` unchanged) and what remains is the ``1/n`` mean shift of the NTK and
  its evolution. Measuring it needs ``M >> n`` networks: the average of ``n^{-1/2}``
  fluctuations is ``(n M)^{-1/2}``.
* ``ntk_movement``: ``n^{-1}`` *per network*, not ``n^{-1/2}``. The NTK moves through the
  dNTK, ``Theta_{t+1} - Theta_t = -(eta / N) dH (f_t - y) + O(eta^2)`` (PDLT ch. 11). For one
  network the dNTK is a sum over ``n`` neurons of terms ``O(n^{-3/2})`` whose signs are set by
  the random downstream weights (it is odd under flipping the output layer), so it is
  ``O(n^{-1})``, not ``O(n^{-1/2})``: the weights of the first and last layers do move by a
  relative ``n^{-1/2}``, but the NTK is a sum over neurons of quadratic forms in them, and
  those changes add up incoherently. ``mean_ntk_movement``:
  ``n^{-1}`` too (PDLT ch. 11: ``E[dH z] = O(1/n)``).
* ``linearization_gap``: ``n^{-1}`` per network and in the mean: it is the output of the NTK's
  movement, ``sum_s (Theta_s - Theta_0) (f_s - y)``.

Measured (tanh, depth 2, ``C_W = 1``, ``N = 8``, 20 steps of gradient descent at
``eta = 0.5``; log-log slope fitted over widths 16-128 with 1024 networks each):
``nngp_distance`` -0.50, ``ntk_distance`` -0.49 / -0.50 (layers 2, 3), ``gap`` -0.50,
``ntk_movement`` -0.96 / -0.93, ``mean_ntk_movement`` -0.99 / -0.96, ``linearization_gap``
-0.89, ``mean_linearization_gap`` -0.85, ``mean_gap`` -0.92 +- 0.06, ``mean_ntk_distance``
-0.94 / -1.04 (standard errors 0.01-0.03 unless given). The departures from -1 shrink when
the narrowest width is dropped (widths 32-256, 64 networks: ``ntk_movement`` -0.97 +- 0.04 /
-0.98 +- 0.03, ``linearization_gap`` -1.01 +- 0.06), as ``1/n^2`` corrections would.
``tests/test_compare.py`` checks
``nngp_distance``, ``ntk_distance``, ``gap``, ``ntk_movement``, ``mean_ntk_movement`` and
``linearization_gap`` (depth 1, 64 networks, widths 32-256); ``mean_gap`` needs ``M >> n``
networks and is not in the suite. Under muP (same learning rate) neither the movement nor the
gaps fall with width: features learn.

**Prediction vs measurement at initialization.** ``kurtosis`` (the excess kurtosis of
``z^{(l)}_a``, Rao-Blackwellized through ``G`` as in :func:`rgnn.measure`) and
``nngp_variance`` (the variance of ``G^{(l)}_{ab}`` over networks) of the initial ensemble,
with standard errors, beside ``kurtosis_predicted`` and ``nngp_variance_predicted`` from
:func:`rgnn.perturbative` (for muP, from its NTK-parameterized twin, which has the same hidden
layers, with the output layer rescaled by ``C_W^{(L+1)} / C_W``).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from functools import partial
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from rgnn._validate import check_pair
from rgnn.architecture import MLP
from rgnn.fixed_point import fixed_point, pair_maps
from rgnn.networks import Ensemble
from rgnn.training import LOSSES, Training, batch_indices, ensemble_kernels

if TYPE_CHECKING:
    from rgnn.perturbative import Perturbative

__all__ = [
    "Comparison",
    "compare",
    "cka",
    "gaussian_reference",
    "linearized_prediction",
]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Comparison:
    """Distances of finite networks from the Gaussian fixed point (module docstring).

    ``T`` recorded steps, ``L + 1`` layers (layer ``l`` at index ``l - 1``), ``N`` inputs,
    ``M`` networks; ``<field>_se`` is the standard error of ``<field>`` (NaN for ``M = 1``).

    Attributes:
      steps: ``[T]`` the recorded steps.
      nngp_distance, ntk_distance: ``[T, L+1]`` mean over networks of the relative Frobenius
        distance of each network's kernel from the reference.
      nngp_cka, ntk_cka: ``[T, L+1]`` mean over networks of the CKA with the reference.
      ntk_movement: ``[T, L+1]`` mean over networks of ``||Theta_t - Theta_0|| / ||Theta_0||``.
      mean_nngp_distance, mean_ntk_distance, mean_ntk_movement: ``[T, L+1]`` the same
        distances of the ensemble-mean kernels (jackknife bias-corrected).
      gap: ``[T]`` mean over networks of ``rms(f_t - f^lin_t)`` on the training inputs.
      mean_gap: ``[T]`` ``rms(<f_t - f^lin_t>)`` (jackknife bias-corrected).
      linearization_gap: ``[T]`` mean over networks of ``rms(f_t - f^emp_t)``, the gap to each
        network's *own* linearization (its empirical NTK at initialization): the part of the
        gap that the NTK's evolution makes.
      mean_linearization_gap: ``[T]`` ``rms(<f_t - f^emp_t>)`` (jackknife bias-corrected).
      test_gap, mean_test_gap: ``[T]`` the same on the test inputs, or ``None``.
      linearized: ``[T, M, N, C]`` the infinite-width linearized prediction ``f^lin_t`` of each
        network, or ``None`` when the training has no kernel description (Adam).
      kurtosis: ``[L+1, N]`` measured excess kurtosis of ``z^{(l)}_a`` at initialization.
      kurtosis_predicted: ``[L+1, N]`` its O(1/n) prediction (NaN if not computed).
      nngp_variance: ``[L+1, N, N]`` measured variance of ``G^{(l)}_{ab}`` at initialization.
      nngp_variance_predicted: ``[L+1, N, N]`` its O(1/n) prediction.
      reference_nngp, reference_ntk: ``[L+1, N, N]`` the reference kernels ``K``,
        ``Theta^inf``.
      n_networks: ``M`` (static).
    """

    steps: jax.Array
    nngp_distance: jax.Array
    nngp_distance_se: jax.Array
    ntk_distance: jax.Array
    ntk_distance_se: jax.Array
    nngp_cka: jax.Array
    nngp_cka_se: jax.Array
    ntk_cka: jax.Array
    ntk_cka_se: jax.Array
    ntk_movement: jax.Array
    ntk_movement_se: jax.Array
    mean_nngp_distance: jax.Array
    mean_nngp_distance_se: jax.Array
    mean_ntk_distance: jax.Array
    mean_ntk_distance_se: jax.Array
    mean_ntk_movement: jax.Array
    mean_ntk_movement_se: jax.Array
    gap: jax.Array
    gap_se: jax.Array
    mean_gap: jax.Array
    mean_gap_se: jax.Array
    linearization_gap: jax.Array
    linearization_gap_se: jax.Array
    mean_linearization_gap: jax.Array
    mean_linearization_gap_se: jax.Array
    test_gap: jax.Array | None
    test_gap_se: jax.Array | None
    mean_test_gap: jax.Array | None
    mean_test_gap_se: jax.Array | None
    linearized: jax.Array | None
    kurtosis: jax.Array
    kurtosis_se: jax.Array
    kurtosis_predicted: jax.Array
    nngp_variance: jax.Array
    nngp_variance_se: jax.Array
    nngp_variance_predicted: jax.Array
    reference_nngp: jax.Array
    reference_ntk: jax.Array
    n_networks: int = dataclasses.field(default=1, metadata=dict(static=True))


# ----------------------------------------------------------------------------- kernels
def gaussian_reference(arch: MLP, x1, x2=None, *, quadrature_order: int = 96):
    """Leading-order (Gaussian) per-layer NNGP and NTK of ``arch`` at its finite widths.

    The fixed-point recursion with per-layer constants from :meth:`rgnn.MLP.scales`:

    .. math::

        K^{(1)} = C_b^{(1)} + C_W^{(1)} \\frac{x \\cdot x'}{n_0},\\quad
        \\Theta^{(1)} = \\lambda_b^{(1)} + \\lambda_W^{(1)} \\frac{x \\cdot x'}{n_0},\\\\
        K^{(l+1)} = C_b^{(l+1)} + C_W^{(l+1)} \\langle\\sigma\\sigma\\rangle_{K^{(l)}},\\quad
        \\Theta^{(l+1)} = \\lambda_b^{(l+1)} + \\lambda_W^{(l+1)}
            \\langle\\sigma\\sigma\\rangle_{K^{(l)}}
            + C_W^{(l+1)} \\langle\\sigma'\\sigma'\\rangle_{K^{(l)}} \\Theta^{(l)} .

    For ``"ntk"`` and ``"standard"`` the constants do not depend on the width beyond
    ``lambda_W = n_{l-1}`` (standard) and this is :func:`rgnn.fixed_point`; for ``"mup"`` the
    output layer has ``C_W^{(L+1)} = C_W / n_L`` and the hidden NTKs carry ``lambda``'s growing
    with the width (:mod:`rgnn.architecture`), so these are the kernels of the muP network *of
    these widths* at initialization, to leading order in ``1/n``.

    Returns:
      ``(nngp, ntk)``, each ``[L+1, N1, N2]``.
    """
    if not isinstance(arch, MLP):
        raise ValueError(f"arch: expected an rgnn.MLP, got {type(arch).__name__}")
    x1, x2 = check_pair(x1, x2)
    same = x2 is None
    x2 = x1 if same else x2
    n0 = x1.shape[1]
    sc = arch.scales(n0)
    act = arch.act
    order = 0 if act.closed_form else quadrature_order
    cw, cb, lw, lb = sc.weight_var, sc.bias_var, sc.lambda_w, sc.lambda_b
    dot = x1 @ x2.T / n0
    d1 = jnp.sum(x1 * x1, axis=1) / n0
    d2 = jnp.sum(x2 * x2, axis=1) / n0
    k12, k11, k22 = cb[0] + cw[0] * dot, cb[0] + cw[0] * d1, cb[0] + cw[0] * d2
    theta = lb[0] + lw[0] * dot
    nngps, ntks = [k12], [theta]
    for layer in range(1, arch.n_layers):
        f, df = pair_maps(act, k11[:, None], k22[None, :], k12, order=order)
        f11 = pair_maps(act, k11, k11, k11, order=order)[0]
        f22 = f11 if same else pair_maps(act, k22, k22, k22, order=order)[0]
        c_w, c_b = cw[layer], cb[layer]
        theta = lb[layer] + lw[layer] * f + c_w * df * theta
        k12, k11, k22 = c_b + c_w * f, c_b + c_w * f11, c_b + c_w * f22
        nngps.append(k12)
        ntks.append(theta)
    return jnp.stack(nngps), jnp.stack(ntks)


def _model_reference(model, x, x_test):
    """A :class:`rgnn.models.Model`'s output-layer reference, ``[1, N, N]`` each (the NNGP NaN
    where the model has none; without an NTK there is nothing to compare: ``ValueError``)."""
    nan = jnp.full((x.shape[0], x.shape[0]), jnp.nan, x.dtype)
    k, t = model.reference(x)
    if t is None:
        how = (
            "its kernel_fn computes no NTK"
            if model.kind == "stax"
            else "no reference=(x1, x2) -> (nngp, ntk) was given"
        )
        raise ValueError(
            f"arch: the {model.kind} model {model.name!r} has no infinite-width NTK ({how}); "
            "rgnn.compare needs it for ntk_distance and the linearized prediction"
        )
    t_test = None
    if x_test is not None:
        t_test = model.reference(x_test, x)[1]
        if t_test is None:
            t_test = jnp.full((x_test.shape[0], x.shape[0]), jnp.nan, x.dtype)
    k = nan if k is None else k
    t = nan if t is None else t
    return k[None], t[None], t_test


def _reference(arch: MLP, x, x_test, order: int):
    """``(K [L+1,N,N], Theta [L+1,N,N], Theta_out(x_test, x) [N*,N] or None)``."""
    if not isinstance(arch, MLP):
        return _model_reference(arch, x, x_test)
    if arch.parameterization == "mup":
        k, t = gaussian_reference(arch, x, quadrature_order=order)
        t_test = None
        if x_test is not None:
            t_test = gaussian_reference(arch, x_test, x, quadrature_order=order)[1][-1]
        return k, t, t_test
    fp = fixed_point(arch, x, quadrature_order=order)
    t_test = (
        None if x_test is None else fixed_point(arch, x_test, x, quadrature_order=order).ntk[-1]
    )
    return fp.nngp, fp.ntk, t_test


def cka(a, b) -> jax.Array:
    """Centered kernel alignment of Gram matrices ``a, b`` (``[..., N, N]``, batched):
    ``<HaH, HbH>_F / (||HaH||_F ||HbH||_F)`` with ``H = I - 11^T / N``."""
    a, b = jnp.broadcast_arrays(jnp.asarray(a), jnp.asarray(b))

    def center(k):
        k = k - k.mean(axis=-1, keepdims=True)
        return k - k.mean(axis=-2, keepdims=True)

    ca, cb = center(a), center(b)
    num = jnp.sum(ca * cb, axis=(-2, -1))
    return num / jnp.sqrt(jnp.sum(ca * ca, axis=(-2, -1)) * jnp.sum(cb * cb, axis=(-2, -1)))


def _fro(a):
    return jnp.sqrt(jnp.sum(a * a, axis=(-2, -1)))


# ----------------------------------------------------------------------------- statistics
def _mean_se(samples):
    """Mean over axis 0 and its standard error (NaN for one sample)."""
    m = samples.shape[0]
    mean = samples.mean(0)
    if m < 2:
        return mean, jnp.full_like(mean, jnp.nan)
    return mean, samples.std(0, ddof=1) / math.sqrt(m)


def _jackknife(samples, stat):
    """Delete-one jackknife of ``stat(mean over axis 0)``: bias-corrected value and its SE.

    ``stat`` maps an average ``[...]`` to an array; with one sample the plain value and NaN.
    """
    m = samples.shape[0]
    mean = samples.mean(0)
    full = stat(mean)
    if m < 2:
        return full, jnp.full_like(full, jnp.nan)
    loo = (m * mean[None] - samples) / (m - 1)  # the M leave-one-out means
    vals = jax.vmap(stat)(loo)
    vbar = vals.mean(0, keepdims=True)
    se = jnp.sqrt((m - 1) / m * jnp.sum((vals - vbar) ** 2, axis=0))
    value = m * full - (m - 1) * vbar[0]
    return value, se


def _var_se(samples):
    """Unbiased variance over axis 0 and its standard error
    ``sqrt((mu4 - var^2 (M - 3) / (M - 1)) / M)``."""
    m = samples.shape[0]
    c = samples - samples.mean(0, keepdims=True)
    var = jnp.sum(c**2, axis=0) / (m - 1)
    mu4 = jnp.mean(c**4, axis=0)
    return var, jnp.sqrt(jnp.maximum(mu4 - var**2 * (m - 3) / (m - 1), 0.0) / m)


def _kurtosis_se(g):
    """Excess kurtosis ``3 <G_aa^2> / <G_aa>^2 - 3`` from metrics ``g [M, L+1, N, N]`` and its
    delta-method standard error (as in :func:`rgnn.measure`)."""
    m2 = jnp.diagonal(g, axis1=-2, axis2=-1)
    m4 = m2**2
    a, b = m4.mean(0, keepdims=True), m2.mean(0, keepdims=True)
    infl = 3 * (m4 / b**2 - 2 * a * m2 / b**3)
    a, b = a[0], b[0]
    return 3 * a / b**2 - 3, infl.std(0, ddof=1) / math.sqrt(g.shape[0])


# ----------------------------------------------------------------------------- linearized
def _targets_and_grad(y, loss: str, n_out: int, dtype):
    if loss == "mse":
        y = jnp.asarray(y, dtype)
        y = y[:, None] if y.ndim == 1 else y

        def dloss(f, idx):  # d(0.5 mean (f - y)^2)/df times the batch size: (f - y) / C
            return (f - y[idx].reshape((1,) * (f.ndim - 2) + (-1, n_out))) / n_out

        return y, dloss
    labels = jnp.asarray(y, jnp.int32)
    onehot = jax.nn.one_hot(labels, n_out, dtype=dtype)

    def dloss(f, idx):  # d(mean CE)/df times the batch size
        return jax.nn.softmax(f, axis=-1) - onehot[idx].reshape((1,) * (f.ndim - 2) + (-1, n_out))

    return labels, dloss


def linearized_prediction(
    ntk,
    y,
    f0,
    steps,
    *,
    learning_rate: float,
    loss: str = "mse",
    ntk_test=None,
    f0_test=None,
    continuous: bool = False,
    batch_size: int | None = None,
    batch_key=None,
):
    """Outputs of the network linearized around initialization, trained with kernel ``ntk``.

    Linearizing ``f`` in the parameters turns gradient descent on the loss of
    :mod:`rgnn.training` into kernel gradient descent in function space (Jacot et al. 2018;
    Lee et al. 2019, eq. 8); with the infinite-width NTK ``Theta`` (block-diagonal in the ``C``
    outputs) and learning rate ``eta``, one step on the batch ``B`` is

    .. math::

        f_{s+1}(x) = f_s(x) - \\frac{\\eta}{|B|} \\sum_{a \\in B} \\Theta(x, x_a)
            \\frac{\\partial \\ell}{\\partial f}(f_s(x_a), y_a),
        \\qquad \\frac{\\partial \\ell}{\\partial f} = \\frac{f - y}{C}\\ \\text{(mse)},\\quad
        \\mathrm{softmax}(f) - e_y\\ \\text{(cross-entropy)} .

    For the mean squared error on the full batch it is solved in closed form with
    ``Theta = U diag(lambda) U^T`` and ``r = eta lambda / (N C)``:

    .. math::

        f_t - y = U (1 - r)^t U^T (f_0 - y), \\qquad
        f_t(x_*) = f_0(x_*) - \\Theta(x_*, X) U \\,\\mathrm{diag}\\Big(
            \\frac{1 - (1 - r)^t}{\\lambda}\\Big) U^T (f_0 - y),

    and ``(1 - r)^t -> exp(-r t)`` for gradient flow (``continuous=True``, neural-tangents'
    ``predict.gradient_descent_mse`` with the same ``learning_rate``). Otherwise (cross-entropy,
    minibatches drawn as :func:`rgnn.batch_indices` does) the step above is iterated.

    Args:
      ntk: ``[N, N]`` the NTK on the training inputs.
      y: ``[N, C]`` targets (mse; ``[N]`` for ``C = 1``) or ``[N]`` integer labels.
      f0: ``[..., N, C]`` initial outputs (any leading batch axes, e.g. networks).
      steps: ``[T]`` non-negative steps (or times, with ``continuous``) to report.
      learning_rate: ``eta``.
      loss: ``"mse"`` or ``"cross_entropy"``.
      ntk_test: ``[N*, N]`` the NTK between test and training inputs, with ``f0_test``
        ``[..., N*, C]``.
      continuous: gradient flow instead of discrete steps (mse, full batch only).
      batch_size, batch_key: minibatches of SGD (iterated; ``None`` is full batch).

    Returns:
      ``(f [T, ..., N, C], f_test [T, ..., N*, C] or None)``.
    """
    if loss not in LOSSES:
        raise ValueError(f"loss: expected one of {LOSSES}, got {loss!r}")
    ntk = jnp.asarray(ntk)
    full = ntk.ndim == 4
    if not (ntk.ndim == 2 and ntk.shape[0] == ntk.shape[1]) and not (
        full and ntk.shape[:2] == ntk.shape[2:]
    ):
        raise ValueError(f"ntk: expected a [N, N] or [N, C, N, C] kernel, got shape {ntk.shape}")
    n = ntk.shape[0]
    f0 = jnp.asarray(f0, ntk.dtype)
    if f0.ndim < 2 or f0.shape[-2] != n or (full and f0.shape[-1] != ntk.shape[1]):
        raise ValueError(f"f0: expected shape [..., {n}, C], got {f0.shape}")
    n_out = f0.shape[-1]
    steps_arr = np.atleast_1d(np.asarray(steps))
    if steps_arr.ndim != 1 or np.any(steps_arr < 0):
        raise ValueError(f"steps: expected non-negative steps, got {steps!r}")
    if (ntk_test is None) != (f0_test is None):
        raise ValueError("ntk_test: expected ntk_test and f0_test together")
    if ntk_test is not None and full:
        raise ValueError("ntk_test: test predictions take a [N, N] training kernel")
    if ntk_test is not None:
        ntk_test = jnp.asarray(ntk_test, ntk.dtype)
        f0_test = jnp.asarray(f0_test, ntk.dtype)
        if ntk_test.ndim != 2 or ntk_test.shape[1] != n or f0_test.shape[-2] != ntk_test.shape[0]:
            raise ValueError(
                f"ntk_test: expected [N*, {n}] with f0_test [..., N*, C], got "
                f"{ntk_test.shape} and {f0_test.shape}"
            )
    yv, dloss = _targets_and_grad(y, loss, n_out, ntk.dtype)
    if yv.shape[0] != n or (loss == "mse" and yv.shape[1] != n_out):
        raise ValueError(f"y: expected {n} targets with {n_out} outputs, got shape {yv.shape}")
    eta = float(learning_rate)
    if full:  # the kernel of one network, with its cross-output blocks
        if loss == "mse" and batch_size is None:
            shape = f0.shape
            flat = ntk.reshape(n * n_out, n * n_out)
            f, _ = _mse_closed_form(
                flat,
                yv.reshape(n * n_out, 1),
                f0.reshape(*shape[:-2], n * n_out, 1),
                steps_arr,
                eta,  # flattened: N C entries with one output each, the same 1 / (N C)
                None,
                None,
                continuous,
            )
            return f.reshape(len(steps_arr), *shape), None
        if continuous:
            raise ValueError("continuous: gradient flow is available for full-batch mse only")
        return _iterate(ntk, dloss, f0, steps_arr, eta, None, None, batch_size, batch_key)
    if loss == "mse" and batch_size is None:
        return _mse_closed_form(ntk, yv, f0, steps_arr, eta, ntk_test, f0_test, continuous)
    if continuous:
        raise ValueError("continuous: gradient flow is available for full-batch mse only")
    return _iterate(ntk, dloss, f0, steps_arr, eta, ntk_test, f0_test, batch_size, batch_key)


def _mse_closed_form(ntk, y, f0, steps, eta, ntk_test, f0_test, continuous):
    n, n_out = y.shape
    lam, u = jnp.linalg.eigh(ntk)
    lam = jnp.maximum(lam, 0.0)[None, :]  # [1, N]
    t = jnp.asarray(steps, ntk.dtype)[:, None]  # [T, 1]
    rate = eta * lam / (n * n_out)
    decay = jnp.exp(-rate * t) if continuous else (1.0 - rate) ** t  # [T, N]
    y_b = y.reshape((1,) * (f0.ndim - 2) + y.shape)
    coef = jnp.einsum("ae,...ac->...ec", u, f0 - y_b)  # eigen-components of f0 - y
    fshape = (-1,) + (1,) * (f0.ndim - 2) + (n, 1)
    f = y_b[None] + jnp.einsum("ae,t...ec->t...ac", u, decay.reshape(fshape) * coef[None])
    if ntk_test is None:
        return f, None
    tiny = jnp.finfo(ntk.dtype).eps * jnp.max(lam) * n
    safe = jnp.where(lam > tiny, lam, 1.0)
    g = jnp.where(lam > tiny, (1.0 - decay) / safe, t * eta / (n * n_out))  # [T, N]
    proj = jnp.einsum("ba,ae->be", ntk_test, u)
    df = jnp.einsum("be,t...ec->t...bc", proj, g.reshape(fshape) * coef[None])
    return f, f0_test[None] - df


def _iterate(ntk, dloss, f0, steps, eta, ntk_test, f0_test, batch_size, batch_key):
    n = ntk.shape[0]
    has_test = ntk_test is not None

    @jax.jit
    def advance(carry, start, stop):
        def body(s, carry):
            f, ft = carry
            if batch_size is None:
                idx = jnp.arange(n)
            else:
                idx = batch_indices(batch_key, s, n, batch_size)
            g = dloss(f[..., idx, :], idx)  # [..., B, C]
            scale = eta / idx.shape[0]
            if ntk.ndim == 4:
                f = f - scale * jnp.einsum("aibj,...bj->...ai", ntk[:, :, idx], g)
            else:
                f = f - scale * jnp.einsum("ab,...bc->...ac", ntk[:, idx], g)
            if has_test:
                ft = ft - scale * jnp.einsum("ab,...bc->...ac", ntk_test[:, idx], g)
            return f, ft

        return jax.lax.fori_loop(start, stop, body, carry)

    carry = (f0, f0_test if has_test else jnp.zeros(()))
    out, out_test, last = [], [], 0
    order = np.argsort(steps, kind="stable")
    results = [None] * len(steps)
    for i in order:
        s = int(steps[i])
        if s > last:
            carry = advance(carry, last, s)
            last = s
        results[i] = carry
    out = jnp.stack([r[0] for r in results])
    out_test = jnp.stack([r[1] for r in results]) if has_test else None
    return out, out_test


# ----------------------------------------------------------------------------- compare
def _perturbative_predictions(arch: MLP, x, order: int, given=None):
    """The predicted kurtosis and kernel variance, from ``given`` (an :class:`rgnn.Perturbative`
    of ``arch``'s twin on ``x``, checked by :func:`_check_given`) or computed here (the kernel
    side only: ``ntk=False``)."""
    from rgnn.perturbative import perturbative

    twin = (
        dataclasses.replace(arch, parameterization="ntk")
        if arch.parameterization == "mup"
        else arch
    )
    p = given
    if p is None:
        p = perturbative(twin, x, quadrature_order=order, ntk=False, warn=False)
    kurt, var = p.kurtosis, p.nngp_variance
    if arch.parameterization == "mup":
        sc = arch.scales(x.shape[1])
        ratio = sc.weight_var[-1] / arch.weight_var
        cb = arch.effective_bias_var
        k_out = cb + (jnp.diagonal(p.nngp[-1]) - cb) * ratio
        var = var.at[-1].multiply(ratio**2)
        kurt = kurt.at[-1].set(3 * jnp.diagonal(var[-1]) / k_out**2)
    return kurt, var


def compare(
    arch: MLP,
    x,
    training,
    *,
    y=None,
    x_test=None,
    perturbative: bool | Perturbative = True,
    quadrature_order: int = 96,
    perturbative_order: int = 48,
) -> Comparison:
    """Measure a trained ensemble (or a bare ensemble) against the Gaussian fixed point.

    Args:
      arch: the :class:`~rgnn.MLP` the networks were drawn from, or the model
        (:func:`rgnn.models.as_model`: a stax triple, a flax nnx module, a
        :class:`rgnn.models.Model`). For a model every layer field has one layer, the output
        (``[T, 1]``); its reference kernels are the model's own (a triple's ``kernel_fn``, a
        flax model's user-supplied reference; NaN fields where it has none); the predicted
        kurtosis and kernel variance are NaN (no 1/n rules exist for it). A flax model's
        empirical NNGP needs its readout named (:class:`rgnn.models.FlaxModel` ``readout``):
        without it every NNGP field is NaN, and ``compare`` warns.
      x: ``[N, n_0]`` the training inputs the record was taken on.
      training: a :class:`~rgnn.Training`, or an :class:`~rgnn.Ensemble` (step 0 only).
      y: targets (default: those stored in the training). A bare ensemble has no gaps (NaN).
      x_test: test inputs (default: those stored in the training).
      perturbative: compute the O(1/n) predictions at initialization (:func:`rgnn.perturbative`,
        which costs ``O(N^2 L)`` quadratures); ``False`` leaves them NaN. Or an
        :class:`rgnn.Perturbative` already computed for ``arch`` on ``x`` (under muP, for its
        NTK-parameterized twin), with any statistics: its ``kurtosis`` and ``nngp_variance``
        are used as they are (``perturbative_order`` is then not used). A result of another
        depth, input count or kernel gets a ``ValueError``.
      quadrature_order: for the reference kernels of activations without a closed form.
      perturbative_order: quadrature order of :func:`rgnn.perturbative`.

    Returns:
      A :class:`Comparison` (formulas in the module docstring).
    """
    if not isinstance(arch, MLP):
        from rgnn.models import FlaxModel, as_model

        arch = as_model(arch)
        if isinstance(arch, FlaxModel) and arch.readout is None:
            warnings.warn(
                f"arch: the flax model {arch.name!r} names no readout, so its output layer has "
                "no empirical NNGP and every NNGP field (nngp_distance, mean_nngp_distance, "
                "nngp_cka, kurtosis, nngp_variance) is NaN; name the submodule that computes "
                "the output: rgnn.models.FlaxModel(..., readout='out')",
                UserWarning,
                stacklevel=2,
            )
    x, _ = check_pair(x, None, ("x", "x2"))
    if isinstance(training, Ensemble):
        ens = training
        if ens.arch != arch:
            raise ValueError("training: expected an ensemble of arch, got another architecture")
        if x.shape[1] != ens.in_dim:
            raise ValueError(f"x: expected {ens.in_dim} features, got {x.shape[1]}")
        x = x.astype(jax.tree_util.tree_leaves(ens.state)[0].dtype)
        nngp, ntk = ensemble_kernels(ens, x)
        nngp, ntk = nngp[None], ntk[None]
        steps = jnp.zeros((1,), jnp.int32)
        outputs = jax.vmap(lambda s: _apply(ens, s, x))(ens.state)[None]
        test_outputs, optimizer, loss_kind = None, "gd", "mse"
        eta, batch_size, batch_key, targets = 0.0, None, None, None
    elif isinstance(training, Training):
        if training.initial.arch != arch:
            raise ValueError("training: expected a training record of arch, got another one")
        if training.ntk is None:
            raise ValueError("training: expected a record with kernels (record_kernels=True)")
        n_rec = training.outputs.shape[2]
        if x.shape != (n_rec, training.initial.in_dim):
            raise ValueError(
                f"x: expected the training inputs, shape ({n_rec}, {training.initial.in_dim}), "
                f"got {x.shape}"
            )
        x = x.astype(training.outputs.dtype)
        nngp, ntk, steps = training.nngp, training.ntk, training.steps
        outputs, test_outputs = training.outputs, training.test_outputs
        optimizer, loss_kind = training.optimizer, training.loss_kind
        eta, batch_size, batch_key = training.learning_rate, training.batch_size, training.batch_key
        targets = training.targets if y is None else y
        if x_test is None:
            x_test = training.test_inputs
        elif test_outputs is None:
            raise ValueError("x_test: the training recorded no test outputs to compare")
    else:
        raise ValueError(
            f"training: expected an rgnn.Training or rgnn.Ensemble, got {type(training).__name__}"
        )
    if x_test is not None:
        x, x_test = check_pair(x, x_test, ("x", "x_test"))
    k_ref, t_ref, t_test = _reference(arch, x, x_test, quadrature_order)
    fields = _kernel_measures(nngp, ntk, k_ref, t_ref)
    if isinstance(arch, MLP) and arch.is_residual:
        # hidden residual layers: z is not a zero-mean Gaussian of covariance G given the layer
        # below, so the metric-based kurtosis and variance do not apply there (rgnn.measure
        # estimates them from the preactivations)
        hidden = slice(1, arch.n_layers - 1)
        for name in ("kurtosis", "kurtosis_se", "nngp_variance", "nngp_variance_se"):
            fields[name] = fields[name].at[hidden].set(jnp.nan)
    n_t = nngp.shape[0]
    nan_t = jnp.full((n_t,), jnp.nan, x.dtype)
    gaps, linearized = {}, None
    if optimizer == "adam" or targets is None:
        # Adam has no kernel description; a bare ensemble without targets sits at f_0
        for name in _GAP_NAMES:
            gaps[name] = gaps[name + "_se"] = nan_t
        for name in ("test_gap", "mean_test_gap"):
            value = None if test_outputs is None else nan_t
            gaps[name] = gaps[name + "_se"] = value
    else:
        own = _output_ntk(training if isinstance(training, Ensemble) else training.initial, x, ntk)
        gaps, linearized = _gap_measures(
            outputs,
            test_outputs,
            targets,
            t_ref[-1],
            t_test,
            own,
            batch_key,
            steps=tuple(int(s) for s in np.asarray(steps)),
            eta=float(eta),
            loss_kind=loss_kind,
            batch_size=batch_size,
        )
    # a model has no 1/n rules at all (a residual MLP has its kernel side on several inputs:
    # rgnn.perturbative)
    predictable = isinstance(arch, MLP)
    given = None
    if not isinstance(perturbative, bool):
        given = _check_given(perturbative, arch, k_ref)
    if perturbative is not False and nngp.shape[1] >= 2 and predictable:
        kurt_p, var_p = _perturbative_predictions(arch, x, perturbative_order, given)
    else:
        kurt_p = jnp.full_like(fields["kurtosis"], jnp.nan)
        var_p = jnp.full_like(fields["nngp_variance"], jnp.nan)
    return Comparison(
        steps=steps,
        **fields,
        **gaps,
        linearized=linearized,
        kurtosis_predicted=kurt_p,
        nngp_variance_predicted=var_p,
        reference_nngp=k_ref,
        reference_ntk=t_ref,
        n_networks=int(nngp.shape[1]),
    )


_GAP_NAMES = ("gap", "mean_gap", "linearization_gap", "mean_linearization_gap")


def _check_given(p, arch, k_ref):
    """``p`` if it is an :class:`rgnn.Perturbative` of ``arch`` (its twin under muP) on the
    compared inputs, else a ``ValueError``: same layers and inputs, and kernels equal to the
    reference kernels ``k_ref`` to ``1e-3`` relative (the hidden layers' under muP): a guard
    against a result of other inputs or another architecture, far above any quadrature
    difference."""
    from rgnn.perturbative import Perturbative

    if not isinstance(p, Perturbative):
        raise ValueError(
            f"perturbative: expected True, False or an rgnn.Perturbative, got {type(p).__name__}"
        )
    if not isinstance(arch, MLP):
        raise ValueError("perturbative: a Perturbative result applies to an rgnn.MLP only")
    if tuple(p.nngp.shape) != tuple(k_ref.shape):
        raise ValueError(
            f"perturbative: expected a result on these inputs, nngp of shape "
            f"{tuple(k_ref.shape)}, got {tuple(p.nngp.shape)}"
        )
    top = p.nngp.shape[0] - (arch.parameterization == "mup")  # muP: the twin's output differs
    hid, ref = np.asarray(p.nngp[:top], float), np.asarray(k_ref[:top], float)
    gap = float(np.max(np.abs(hid - ref)) / max(float(np.max(np.abs(ref))), 1e-300))
    if not gap <= 1e-3:
        raise ValueError(
            "perturbative: expected the result of rgnn.perturbative for arch on x, but its "
            f"kernels differ from arch's fixed point on x by {gap:.2g} (relative)"
        )
    return p


def _rms(a):
    return jnp.sqrt(jnp.mean(a**2, axis=(-2, -1)))


@jax.jit
def _kernel_measures(nngp, ntk, k_ref, t_ref):
    """The kernel fields of :class:`Comparison` from ``[T, M, L+1, N, N]`` records."""
    n_layers = nngp.shape[2]

    def rel(a, ref):  # [T, M, L+1, N, N] -> [T, M, L+1]
        return _fro(a - ref[None, None]) / _fro(ref)[None, None]

    per_net = {
        "nngp_distance": rel(nngp, k_ref),
        "ntk_distance": rel(ntk, t_ref),
        "nngp_cka": cka(nngp, jnp.broadcast_to(k_ref, nngp.shape)),
        "ntk_cka": cka(ntk, jnp.broadcast_to(t_ref, ntk.shape)),
        "ntk_movement": _fro(ntk - ntk[:1]) / _fro(ntk[:1]),
    }
    fields = {}
    for name, val in per_net.items():
        fields[name], fields[name + "_se"] = _mean_se(jnp.moveaxis(val, 1, 0))
    for name, kern, ref in (("nngp", nngp, k_ref), ("ntk", ntk, t_ref)):
        v, se = _jackknife(
            jnp.moveaxis(kern, 1, 0), lambda avg, r=ref: _fro(avg - r[None]) / _fro(r)[None]
        )
        fields[f"mean_{name}_distance"], fields[f"mean_{name}_distance_se"] = v, se
    both = jnp.concatenate([ntk - ntk[:1], jnp.broadcast_to(ntk[:1], ntk.shape)], axis=2)
    v, se = _jackknife(
        jnp.moveaxis(both, 1, 0),
        lambda avg: _fro(avg[:, :n_layers]) / _fro(avg[:, n_layers:]),
    )
    fields["mean_ntk_movement"], fields["mean_ntk_movement_se"] = v, se
    g0 = nngp[0]
    if g0.shape[0] >= 2:
        fields["kurtosis"], fields["kurtosis_se"] = _kurtosis_se(g0)
        fields["nngp_variance"], fields["nngp_variance_se"] = _var_se(g0)
    else:
        nan = jnp.full(g0.shape[1:3], jnp.nan, g0.dtype)
        fields["kurtosis"] = fields["kurtosis_se"] = nan
        fields["nngp_variance"] = fields["nngp_variance_se"] = jnp.full_like(g0[0], jnp.nan)
    return fields


@partial(jax.jit, static_argnames=("steps", "eta", "loss_kind", "batch_size"))
def _gap_measures(
    outputs,
    test_outputs,
    targets,
    t_out,
    t_test,
    own,
    batch_key,
    *,
    steps,
    eta,
    loss_kind,
    batch_size,
):
    """The function-space gaps of :class:`Comparison` and the linearized predictions."""
    kw = dict(learning_rate=eta, loss=loss_kind, batch_size=batch_size, batch_key=batch_key)
    lin, lin_test = linearized_prediction(
        t_out,
        targets,
        outputs[0],
        np.asarray(steps),
        ntk_test=t_test,
        f0_test=None if t_test is None else test_outputs[0],
        **kw,
    )

    def own_one(kernel, f0):
        return linearized_prediction(kernel, targets, f0, np.asarray(steps), **kw)[0]

    lin_own = jnp.moveaxis(jax.vmap(own_one)(own, outputs[0]), 0, 1)
    gaps = {}
    pairs = [("gap", outputs, lin), ("linearization_gap", outputs, lin_own)]
    if test_outputs is not None:
        pairs.append(("test_gap", test_outputs, lin_test))
    else:
        gaps["test_gap"] = gaps["test_gap_se"] = None
        gaps["mean_test_gap"] = gaps["mean_test_gap_se"] = None
    for name, out, pred in pairs:
        diff = out - pred  # [T, M, N, C]
        gaps[name], gaps[name + "_se"] = _mean_se(jnp.moveaxis(_rms(diff), 1, 0))
        gaps["mean_" + name], gaps["mean_" + name + "_se"] = _jackknife(
            jnp.moveaxis(diff, 1, 0), _rms
        )
    return gaps, lin


def _output_ntk(ens: Ensemble, x, ntk) -> jax.Array:
    """Each network's empirical NTK of the outputs at initialization, ``[M, N, C, N, C]``.

    With one output it is the recorded output-layer NTK; with ``C > 1`` the cross-output blocks
    are needed too (they are ``O(n^{-1/2})`` at finite width), from the Jacobian of the outputs
    with respect to all parameters, ``J J^T`` (gradient-descent learning-rate factors are 1),
    one network at a time.
    """
    m, n = ntk.shape[1], x.shape[0]
    first = jax.tree_util.tree_map(lambda a: a[0], ens.state)
    out_dim = jax.eval_shape(lambda s: _apply(ens, s, x), first).shape[-1]
    if out_dim == 1:
        return ntk[0, :, -1].reshape(m, n, 1, n, 1)

    def one(state):
        jac = jax.jacrev(lambda s: _apply(ens, s, x))(state)
        blocks = [j.reshape(n, out_dim, -1) for j in jax.tree_util.tree_leaves(jac)]
        return sum(jnp.einsum("aip,bjp->aibj", j, j) for j in blocks)

    return jax.lax.map(one, ens.state)


def _apply(ens: Ensemble, state, x):
    from flax import nnx

    if ens.graphdef is None:
        return ens.arch.apply(state, x)
    return nnx.merge(ens.graphdef, state)(x)
