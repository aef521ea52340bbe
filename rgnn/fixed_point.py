"""The Gaussian (UV) fixed point: per-layer infinite-width NNGP and NTK kernels.

.. math::

    K^{(1)}_{ab} &= C_b + C_W \\frac{1}{n_0} \\sum_j x_{ja} x_{jb}, \\qquad
    \\Theta^{(1)}_{ab} = \\lambda_b^{(1)}
        + \\lambda_W^{(1)} \\frac{1}{n_0} \\sum_j x_{ja} x_{jb},\\\\
    K^{(l+1)}_{ab} &= C_b + C_W \\langle \\sigma(z_a) \\sigma(z_b) \\rangle_{K^{(l)}},\\\\
    \\Theta^{(l+1)}_{ab} &= \\lambda_b^{(l+1)} + \\lambda_W^{(l+1)}
        \\langle \\sigma(z_a) \\sigma(z_b) \\rangle_{K^{(l)}}
        + C_W \\langle \\sigma'(z_a) \\sigma'(z_b) \\rangle_{K^{(l)}} \\Theta^{(l)}_{ab}

(PDLT eq. 4.118 for K, eq. 9.4 for Theta; the learning-rate scalings ``lambda`` depend on the
parameterization, see :mod:`rgnn.architecture`). The expectation over the 2x2 Gaussian with
covariance ``[[K_aa, K_ab], [K_ab, K_bb]]`` uses the activation's closed form where one exists
(:mod:`rgnn.activations`) and Gauss-Hermite quadrature otherwise (:mod:`rgnn.gaussian`).

Two backends compute the same numbers: ``"native"`` (one jitted pass through the layers, all
layers at once) and ``"neural_tangents"`` (``stax`` kernel functions, one per prefix of the
network, run under :mod:`rgnn._compat`).
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp

from rgnn import _pair_table, gaussian
from rgnn._validate import check_pair
from rgnn.architecture import MLP, Recursion

__all__ = ["FixedPoint", "fixed_point", "pair_maps", "BACKENDS"]

BACKENDS = ("native", "neural_tangents")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FixedPoint:
    """Per-layer infinite-width kernels; layer ``l`` (1-based) at index ``l - 1``.

    Attributes:
      nngp: ``[L+1, N1, N2]`` the NNGP kernel ``K^{(l)}(x1_a, x2_b)``.
      ntk: ``[L+1, N1, N2]`` the NTK ``Theta^{(l)}(x1_a, x2_b)`` of one unit of layer ``l``.
      nngp_diag1: ``[L+1, N1]`` the variances ``K^{(l)}(x1_a, x1_a)``.
      nngp_diag2: ``[L+1, N2]`` the variances ``K^{(l)}(x2_b, x2_b)`` (equal to ``nngp_diag1``
        when ``x2`` is ``None``).
      backend: which backend computed it.
      quadrature_order: quadrature nodes per dimension (``0`` when closed forms were used).
    """

    nngp: jax.Array
    ntk: jax.Array
    nngp_diag1: jax.Array
    nngp_diag2: jax.Array
    backend: str = dataclasses.field(default="native", metadata=dict(static=True))
    quadrature_order: int = dataclasses.field(default=0, metadata=dict(static=True))

    @property
    def n_layers(self) -> int:
        """``L + 1``."""
        return self.nngp.shape[0]


def pair_maps(rec_or_act, k11, k22, k12, *, order: int = 96, rule: str = "trapezoid"):
    """``(<sigma sigma>, <sigma' sigma'>)`` under ``N(0, [[k11, k12], [k12, k22]])``, elementwise.

    Uses the activation's closed forms when it has them, else quadrature with ``order`` nodes
    per dimension (:mod:`rgnn.gaussian`).
    """
    act = rec_or_act.activation if isinstance(rec_or_act, Recursion) else rec_or_act
    if act.closed_form:
        return act.maps(k11, k22, k12)
    return gaussian.expect_pairs(
        [(act.fn, act.fn), (act.derivative, act.derivative)], k11, k22, k12, order=order, rule=rule
    )


@partial(jax.jit, static_argnames=("rec", "order", "rule", "same", "tabulate"))
def _native(rec: Recursion, x1, x2, *, order: int, rule: str, same: bool, tabulate: bool = False):
    """The recursion on all layers; with ``tabulate`` (``same`` inputs, quadrature activations)
    a layer whose inputs share one norm takes its off-diagonal maps from a table in the
    correlation (:mod:`rgnn._pair_table`), and a fifth output is the tables' largest measured
    relative error."""
    n0 = x1.shape[1]
    cw, cb = rec.weight_var, rec.bias_var
    lam_b = jnp.asarray(rec.lambda_b, x1.dtype)
    lam_w = jnp.asarray(rec.lambda_w, x1.dtype)
    dot = x1 @ x2.T / n0
    d1 = jnp.sum(x1 * x1, axis=1) / n0
    d2 = d1 if same else jnp.sum(x2 * x2, axis=1) / n0
    k12 = cb + cw * dot
    k11 = cb + cw * d1
    k22 = k11 if same else cb + cw * d2
    theta = lam_b[0] + lam_w[0] * dot

    def layer(carry, lams):
        k12, k11, k22, theta = carry
        lb, lw = lams
        kw = dict(order=order, rule=rule)
        if tabulate:
            n = k11.shape[0]
            (f, df), err = _pair_table.tabulated(
                lambda a, c, b: pair_maps(rec, a, b, c, **kw),
                jnp.broadcast_to(k11[:, None], (n, n)).ravel(),
                k12.ravel(),
                jnp.broadcast_to(k22[None, :], (n, n)).ravel(),
            )
            f, df = f.reshape(n, n), df.reshape(n, n)
        else:
            f, df = pair_maps(rec, k11[:, None], k22[None, :], k12, **kw)
            err = jnp.zeros((), k12.dtype)
        f11, _ = pair_maps(rec, k11, k11, k11, **kw)
        f22 = f11 if same else pair_maps(rec, k22, k22, k22, **kw)[0]
        new = (cb + cw * f, cb + cw * f11, cb + cw * f22, lb + lw * f + cw * df * theta)
        return new, (new, err)

    first = (k12, k11, k22, theta)
    _, (rest, errs) = jax.lax.scan(layer, first, (lam_b[1:], lam_w[1:]))
    stack = [jnp.concatenate([a[None], b], axis=0) for a, b in zip(first, rest, strict=True)]
    k12s, k11s, k22s, thetas = stack
    if tabulate:
        return k12s, thetas, k11s, k22s, jnp.max(errs, initial=0.0)
    return k12s, thetas, k11s, k22s


def _neural_tangents(arch: MLP, x1, x2, *, order: int):
    """All layers in one pass: ``Dense, FanOut(2), parallel(Identity, rest)`` at every layer,
    so the kernel function returns the nested tuple ``(K1, (K2, (..., K_{L+1})))``."""
    from rgnn._compat import import_neural_tangents

    stax = import_neural_tangents().stax
    layers = arch.stax_layers(quadrature_order=order)
    net = layers[-1]
    for i in range(len(layers) - 3, -1, -2):  # Dense layers below the output, top down
        dense, act = layers[i], layers[i + 1]
        net = stax.serial(
            dense, stax.FanOut(2), stax.parallel(stax.Identity(), stax.serial(act, net))
        )
    out, kernels = net[2](x1, x2, None), []
    while isinstance(out, tuple | list):
        kernels.append(out[0])
        out = out[1]
    kernels.append(out)
    nngp = jnp.stack([k.nngp for k in kernels])
    ntk = jnp.stack([k.ntk for k in kernels])
    d1 = jnp.stack([k.cov1 for k in kernels])
    d2 = d1 if x2 is None else jnp.stack([k.cov2 for k in kernels])
    return nngp, ntk, d1, d2


def fixed_point(
    arch: MLP,
    x1,
    x2=None,
    *,
    backend: str = "native",
    quadrature_order: int = 96,
    quadrature_rule: str = "trapezoid",
) -> FixedPoint:
    """Per-layer infinite-width NNGP and NTK of ``arch`` on ``x1`` (and ``x2``).

    Args:
      arch: the :class:`~rgnn.MLP`.
      x1: ``[N1, n_0]`` inputs.
      x2: ``[N2, n_0]`` inputs, or ``None`` for ``x2 = x1``.
      backend: ``"native"`` (rgnn's jitted recursion) or ``"neural_tangents"``.
      quadrature_order: nodes per dimension for activations without a closed form (the cost
        is ``order**2`` per kernel entry and layer).
      quadrature_rule: ``"trapezoid"`` (default; exponentially convergent for analytic
        activations, see :mod:`rgnn.gaussian`) or ``"hermite"``, for the native backend. The
        ``neural_tangents`` backend always uses its own Gauss-Hermite rule
        (``stax.ElementwiseNumerical(deg=quadrature_order)``), which converges more slowly:
        give it a higher order for the same accuracy.

    Returns:
      A :class:`FixedPoint` with ``nngp`` and ``ntk`` of shape ``[L+1, N1, N2]``. The dtype
      follows the inputs (float64 inputs under ``jax.enable_x64`` give float64 kernels).

    Example:
      >>> import numpy as np, rgnn
      >>> fp = rgnn.fixed_point(rgnn.MLP(3, 512, "relu", weight_var=2.0), np.eye(4))
      >>> fp.nngp.shape
      (4, 4, 4)
    """
    if not isinstance(arch, MLP):
        raise ValueError(f"arch: expected an rgnn.MLP, got {type(arch).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if isinstance(quadrature_order, bool) or not isinstance(quadrature_order, int):
        raise ValueError(f"quadrature_order: expected an integer >= 1, got {quadrature_order!r}")
    if quadrature_order < 1:
        raise ValueError(f"quadrature_order: expected an integer >= 1, got {quadrature_order!r}")
    from rgnn.gaussian import RULES

    if quadrature_rule not in RULES:
        raise ValueError(f"quadrature_rule: expected one of {RULES}, got {quadrature_rule!r}")
    x1, x2 = check_pair(x1, x2)
    order = 0 if arch.act.closed_form else quadrature_order
    if backend == "native":
        rec = arch.recursion(x1.shape[1])
        same = x2 is None
        nngp, ntk, d1, d2 = _native(
            rec, x1, x1 if same else x2, order=order, rule=quadrature_rule, same=same
        )
    else:
        nngp, ntk, d1, d2 = _neural_tangents(arch, x1, x2, order=quadrature_order)
    return FixedPoint(nngp, ntk, d1, d2, backend=backend, quadrature_order=order)


def _fixed_point_tabulated(arch: MLP, x, *, quadrature_order: int) -> tuple[FixedPoint, float]:
    """:func:`fixed_point` of ``x`` with itself (native backend, trapezoid rule) and the
    off-diagonal maps of one-norm layers from the correlation table of
    :mod:`rgnn._pair_table` when that is cheaper; also returns the tables' largest measured
    relative error (``0.0`` without tables). For :func:`rgnn.perturbative`."""
    n = x.shape[0]
    if arch.act.closed_form or not _pair_table.worth_it(n * n // 2):
        return fixed_point(arch, x, quadrature_order=quadrature_order), 0.0
    x, _ = check_pair(x, None)
    rec = arch.recursion(x.shape[1])
    nngp, ntk, d1, d2, err = _native(
        rec, x, x, order=quadrature_order, rule="trapezoid", same=True, tabulate=True
    )
    fp = FixedPoint(nngp, ntk, d1, d2, backend="native", quadrature_order=quadrature_order)
    return fp, float(err)
