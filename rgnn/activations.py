"""The activation registry: elementwise functions and their Gaussian kernel maps.

An infinite-width layer maps the 2x2 covariance ``(k11, k22, k12)`` of two preactivations
``(u, v) ~ N(0, [[k11, k12], [k12, k22]])`` to two Gaussian expectations:

.. math::

    F(k_{11}, k_{22}, k_{12}) = \\langle \\sigma(u)\\, \\sigma(v) \\rangle, \\qquad
    \\dot F(k_{11}, k_{22}, k_{12}) = \\langle \\sigma'(u)\\, \\sigma'(v) \\rangle .

``F`` drives the NNGP recursion and ``dF`` the NTK recursion (PDLT eq. 4.118 and 9.4; THEORY.md).
By Price's theorem :math:`\\dot F = \\partial F / \\partial k_{12}`.

Closed forms (``rho = k12 / sqrt(k11 k22)``, ``theta = arccos(rho)``):

* ``relu`` (arc-cosine kernel, Cho & Saul 2009):
  ``F = sqrt(k11 k22) (sin theta + (pi - theta) cos theta) / (2 pi)``,
  ``dF = (pi - theta) / (2 pi)``.
* ``leaky_relu`` with slope ``a`` on the negative side, ``sigma = relu(x) - a relu(-x)``:
  ``F = (1 + a^2) J(theta) - 2 a J(pi - theta)`` with ``J`` the relu ``F`` above written in
  ``theta``, and ``dF = ((1 + a^2)(pi - theta) + 2 a theta) / (2 pi)``. With
  ``sqrt(k11 k22) sin theta = sqrt(det)``, ``det = k11 k22 - k12^2``, this is
  ``F = (1 - a)^2 sqrt(det) / (2 pi) + dF k12``, ``dF = a + (1 - a)^2 (pi - theta) / (2 pi)``
  with ``pi - theta = atan2(sqrt(det), -k12)``: one square root and one arctangent per entry
  (the roots of the variances are per input), the arctangent a polynomial that XLA
  vectorizes (:mod:`rgnn._arctan`), and ``theta = 0`` or ``pi`` exactly for (anti)parallel
  inputs (:func:`_leaky_relu_maps`). On one input the maps are
  ``(A_2 k, A_2)``, ``A_2 = (1 + a^2) / 2`` (``Activation.diag_maps``), never the pair map.
* ``erf`` (arcsine kernel, Williams 1997):
  ``F = (2/pi) arcsin(2 k12 / sqrt((1 + 2 k11)(1 + 2 k22)))``,
  ``dF = (4/pi) / sqrt((1 + 2 k11)(1 + 2 k22) - 4 k12^2)``.
* ``sin``: ``F = exp(-(k11 + k22)/2) sinh(k12)``, ``dF = exp(-(k11 + k22)/2) cosh(k12)``.
* ``linear``: ``F = k12``, ``dF = 1``.
* ``gelu`` (exact, ``x Phi(x)``): see :mod:`rgnn._gelu`.

Every other activation (``tanh``, ``sigmoid``, ``softplus``, ``swish``/``silu`` and any
JAX-traceable callable) is integrated by Gauss-Hermite quadrature (:mod:`rgnn.gaussian`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from rgnn._arctan import arctan2

__all__ = ["Activation", "get_activation", "KNOWN_ACTIVATIONS"]

KernelMap = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class Activation:
    """An elementwise activation and what the infinite-width recursions need of it.

    Attributes:
      name: registry name (or ``"custom:<repr>"`` for a user callable).
      fn: the elementwise function ``sigma``.
      nngp_map: closed form ``F(k11, k22, k12) = <sigma(u) sigma(v)>``, or ``None`` when the
        expectation is computed by quadrature.
      ntk_map: closed form ``dF(k11, k22, k12) = <sigma'(u) sigma'(v)>``, or ``None``.
      joint_map: optional ``(k11, k22, k12) -> (F, dF)`` sharing work between the two.
      scale_invariant: ``sigma(lambda x) = lambda sigma(x)`` for ``lambda > 0`` (relu, leaky relu,
        linear); such activations form the scale-invariant universality class (PDLT ch. 5.2).
      negative_slope: the leaky-relu slope ``a`` (0 for relu); ``None`` for the others.
      diag_map: optional exact ``k -> (F(k, k, k), dF(k, k, k))``, the maps on one input
        (``k11 = k22 = k12 = k``), for activations where it is simpler than the pair map
        (the relu family: ``(A_2 k, A_2)``, ``A_2 = (1 + a^2) / 2``).
    """

    name: str
    fn: Callable[[jax.Array], jax.Array]
    nngp_map: KernelMap | None = None
    ntk_map: KernelMap | None = None
    scale_invariant: bool = False
    negative_slope: float | None = None
    joint_map: Callable | None = None
    diag_map: Callable | None = None

    def maps(self, k11, k22, k12):
        """``(F, dF)`` from the closed forms (the activation must have them)."""
        if self.joint_map is not None:
            return self.joint_map(k11, k22, k12)
        return self.nngp_map(k11, k22, k12), self.ntk_map(k11, k22, k12)

    def diag_maps(self, k):
        """``(F(k, k, k), dF(k, k, k))``, the maps on one input, from the closed forms (the
        activation must have them): its exact ``diag_map`` when it has one."""
        if self.diag_map is not None:
            return self.diag_map(k)
        return self.maps(k, k, k)

    @property
    def closed_form(self) -> bool:
        """Whether both Gaussian maps are known in closed form."""
        return self.nngp_map is not None and self.ntk_map is not None

    def derivative(self, x: jax.Array) -> jax.Array:
        """``sigma'(x)`` elementwise (automatic differentiation of ``fn``)."""
        return jnp.vectorize(jax.grad(self.fn))(x)


_RHO_SNAP_EPS = 32
"""A correlation within ``_RHO_SNAP_EPS`` machine epsilons of ``+-1`` is taken as exactly
``+-1`` by the relu-family maps (see :func:`_leaky_relu_maps`)."""


def _leaky_relu_maps(slope: float) -> tuple[KernelMap, KernelMap, Callable, Callable]:
    """``(nngp_map, ntk_map, joint_map, diag_map)`` of ``max(x, slope x)``.

    Written so that the exact cases are exact in floating point:

    * ``dF = a + (1 - a)^2 (pi - theta) / (2 pi)`` (``= A_2 - ((1 - a)^2 / 2) (theta / pi)``,
      ``A_2 = (1 + a^2) / 2``) and ``F = dF k12 + (1 - a)^2 sqrt(det) / (2 pi)``, with
      ``pi - theta = atan2(sqrt(det), -k12)`` taken directly (so that ``dF`` keeps its
      relative accuracy near ``theta = pi``, where it is small) by the vectorized
      :func:`rgnn._arctan.arctan2`, and ``dF`` set to its exact values
      ``A_2`` at ``rho = 1`` and ``a`` at ``rho = -1``, where ``sqrt(det) = 0``: there
      ``(F, dF)`` is ``(A_2 k12, A_2)`` to the last bit, the values of the diagonal map
      ``(A_2 k, A_2)``, and ``(a k12, a)`` (``(0, 0)`` for relu);
    * ``sqrt(det) = sqrt(k11) sqrt(k22) sqrt((1 - rho)(1 + rho))``. Near ``rho = +-1`` the angle is
      ill-conditioned (``theta ~ sqrt(2 (1 - rho))``: one ulp of ``rho`` is ``2e-8`` of ``theta`` in
      float64), so ``rho`` within ``32 eps`` of ``+-1`` is snapped to ``+-1`` (``_RHO_SNAP_EPS``).
      That covers the rounding of ``rho`` itself: the dot product of two (anti)parallel inputs and
      their norms are sums over the input features, computed apart (measured: ``|rho|`` of exactly
      (anti)parallel inputs is up to ``7.5 eps`` from 1 on digits and on Gaussian inputs of 3 to 784
      features, and stays there over 200 layers; the old threshold of ``4 eps`` missed it, and the
      diagonal of a depth-10 relu NTK was off by ``8.6e-8``). Such a pair then has ``theta = 0`` or
      ``pi`` exactly, as its inputs do. A pair whose true ``1 - |rho|`` is below ``32 eps`` is
      treated as (anti)parallel: its ``dF`` changes by at most ``(1 - a)^2 sqrt(64 eps) / (2 pi)``
      (``1.9e-8`` in float64, ``4.4e-4`` in float32): 16 times the ``1.2e-9`` (``2.7e-5``) that 4
      eps of rounding in its ``rho`` already put into ``dF`` there, a price paid only by pairs
      that close to parallel.
    """
    a = float(slope)
    a2 = (1 + a * a) / 2
    kink = (1 - a) ** 2

    def diag(k):
        k = jnp.asarray(k)
        return a2 * k, jnp.full_like(k, a2)

    def joint(k11, k22, k12):
        # the square roots of the variances are taken before broadcasting (N, not N^2, of them)
        k11, k22, k12 = (jnp.asarray(k) for k in (k11, k22, k12))
        s1, s2 = jnp.sqrt(k11), jnp.sqrt(k22)
        i1 = jnp.where(s1 > 0, 1 / jnp.where(s1 > 0, s1, 1.0), 0.0)
        i2 = jnp.where(s2 > 0, 1 / jnp.where(s2 > 0, s2, 1.0), 0.0)
        rho = jnp.clip(k12 * i1 * i2, -1.0, 1.0)
        snap = 1 - _RHO_SNAP_EPS * jnp.finfo(rho.dtype).eps
        rho = jnp.where(jnp.abs(rho) >= snap, jnp.sign(rho), rho)
        root = (s1 * s2) * jnp.sqrt((1 - rho) * (1 + rho))
        phi = arctan2(root, -k12)  # pi - theta: relative accuracy where dF is small
        # (anti)parallel: the exact values, selected (a product with 1 / pi would leave dF one
        # rounding off its exact value)
        dF = jnp.where(rho == 1.0, a2, jnp.where(rho == -1.0, a, a + kink * phi / (2 * jnp.pi)))
        return dF * k12 + kink * root / (2 * jnp.pi), dF

    return (lambda *k: joint(*k)[0]), (lambda *k: joint(*k)[1]), joint, diag


def _erf_nngp(k11, k22, k12):
    return (2 / jnp.pi) * jnp.arcsin(
        jnp.clip(2 * k12 / jnp.sqrt((1 + 2 * k11) * (1 + 2 * k22)), -1.0, 1.0)
    )


def _erf_ntk(k11, k22, k12):
    return (4 / jnp.pi) / jnp.sqrt((1 + 2 * k11) * (1 + 2 * k22) - 4 * k12 * k12)


def _sin_nngp(k11, k22, k12):
    return jnp.exp(-(k11 + k22) / 2) * jnp.sinh(k12)


def _sin_ntk(k11, k22, k12):
    return jnp.exp(-(k11 + k22) / 2) * jnp.cosh(k12)


def _linear_nngp(k11, k22, k12):
    return k12


def _linear_ntk(k11, k22, k12):
    return jnp.ones_like(k12)


def _linear_diag(k):
    k = jnp.asarray(k)
    return k, jnp.ones_like(k)


def _gelu_fn(x):
    return x * jax.scipy.stats.norm.cdf(x)


def _softplus(x):
    return jnp.logaddexp(x, 0.0)


def _swish(x):
    return x * jax.nn.sigmoid(x)


def _relu(x):
    return jnp.maximum(x, 0.0)


def _make_registry() -> dict[str, Activation]:
    from rgnn import _gelu

    relu_nngp, relu_ntk, relu_joint, relu_diag = _leaky_relu_maps(0.0)
    leaky_nngp, leaky_ntk, leaky_joint, leaky_diag = _leaky_relu_maps(0.01)
    swish = Activation("swish", _swish)
    return {
        "relu": Activation(
            "relu", _relu, relu_nngp, relu_ntk, True, 0.0, relu_joint, diag_map=relu_diag
        ),
        "leaky_relu": Activation(
            "leaky_relu",
            lambda x: jnp.where(x > 0, x, 0.01 * x),
            leaky_nngp,
            leaky_ntk,
            True,
            0.01,
            leaky_joint,
            diag_map=leaky_diag,
        ),
        "erf": Activation("erf", jax.scipy.special.erf, _erf_nngp, _erf_ntk),
        "tanh": Activation("tanh", jnp.tanh),
        "sin": Activation("sin", jnp.sin, _sin_nngp, _sin_ntk),
        "gelu": Activation(
            "gelu", _gelu_fn, _gelu.gelu_nngp, _gelu.gelu_dnngp, joint_map=_gelu.gelu_maps
        ),
        "swish": swish,
        "silu": dataclasses.replace(swish, name="silu"),
        "sigmoid": Activation("sigmoid", jax.nn.sigmoid),
        "softplus": Activation("softplus", _softplus),
        "linear": Activation(
            "linear", lambda x: x, _linear_nngp, _linear_ntk, True, None, diag_map=_linear_diag
        ),
    }


_REGISTRY: dict[str, Activation] | None = None

KNOWN_ACTIVATIONS = (
    "relu",
    "leaky_relu",
    "erf",
    "tanh",
    "sin",
    "gelu",
    "swish",
    "silu",
    "sigmoid",
    "softplus",
    "linear",
)


def leaky_relu(slope: float) -> Activation:
    """A leaky relu ``max(x, slope * x)`` with its closed-form kernel maps.

    ``slope`` must satisfy ``0 <= slope < 1``.
    """
    if not (isinstance(slope, int | float) and math.isfinite(slope) and 0 <= slope < 1):
        raise ValueError(f"slope: expected a number in [0, 1), got {slope!r}")
    nngp, ntk, joint, diag = _leaky_relu_maps(float(slope))
    return Activation(
        f"leaky_relu({slope:g})",
        lambda x: jnp.where(x > 0, x, slope * x),
        nngp,
        ntk,
        True,
        float(slope),
        joint,
        diag_map=diag,
    )


def get_activation(activation: str | Callable | Activation) -> Activation:
    """Look up an activation by name, or wrap a JAX-traceable callable (integrated by quadrature).

    Raises:
      ValueError: for an unknown name (the message lists the known ones) or a non-callable.
    """
    global _REGISTRY
    if isinstance(activation, Activation):
        return activation
    if isinstance(activation, str):
        if _REGISTRY is None:
            _REGISTRY = _make_registry()
        key = activation.lower().strip()
        if key not in _REGISTRY:
            raise ValueError(
                f"activation: unknown name {activation!r}; expected one of "
                f"{', '.join(KNOWN_ACTIVATIONS)}, or a JAX-traceable callable"
            )
        return _REGISTRY[key]
    if callable(activation):
        name = getattr(activation, "__name__", repr(activation))
        return Activation(f"custom:{name}", activation)
    raise ValueError(
        "activation: expected a name (one of "
        f"{', '.join(KNOWN_ACTIVATIONS)}) or a JAX-traceable callable, got {activation!r}"
    )
