"""The ``MLP`` specification and its three views.

One architecture, three views that must describe the same random function:

1. :meth:`MLP.stax` -- the neural-tangents ``(init_fn, apply_fn, kernel_fn)`` triple;
2. :meth:`MLP.network` -- a finite flax nnx module of the given widths, with parameters drawn
   from exactly the distribution the infinite-width limit assumes;
3. :meth:`MLP.recursion` -- the per-layer constants of the native kernel recursions.

Conventions (PDLT, THEORY.md). ``depth`` is the number of hidden layers L; preactivation layers
are l = 1..L+1 (l = L+1 is the output), with widths ``n_1..n_L`` and ``n_{L+1} = out_dim``:

.. math::

    z^{(1)} = a^{(1)}_W W^{(1)} x + a_b b^{(1)}, \\qquad
    z^{(l+1)} = a^{(l+1)}_W W^{(l+1)} \\sigma(z^{(l)}) + a_b b^{(l+1)} .

**Residual MLPs** (``shortcut=gamma``, ``branch=xi``; PDLT appendix B, "Residual Learning",
eq. B.1). Every hidden-to-hidden layer ``l + 1 = 2..L`` adds a shortcut:

.. math::

    z^{(l+1)} = \\xi^{(l+1)} \\big(a^{(l+1)}_W W^{(l+1)} \\sigma(z^{(l)}) + a_b b^{(l+1)}\\big)
        + \\gamma^{(l+1)} z^{(l)}, \\qquad l + 1 = 2, \\dots, L,

while the first layer (from the input, whose dimension differs) and the output layer are
plain, as in the book, where the residual connections join layers of equal width ``n``. The
residual layers therefore need equal hidden widths. ``gamma`` and ``xi`` are either one number
for every residual layer or a sequence of ``L - 1`` numbers (layers ``2..L``). ``shortcut=None``
(default) is the plain MLP; ``gamma = 0, xi = 1`` is the plain MLP too. :meth:`MLP.residual`
gives the per-layer factors on all ``L + 1`` layers (``gamma = 0, xi = 1`` on the plain ones).
The learning-rate scalings ``lambda`` of the branch's parameters are those of the plain layer;
the branch weight ``xi`` multiplies the whole branch (its parameters' gradients included).
muP residual networks are not supported (``ValueError``).

* ``parameterization="ntk"`` (neural-tangents' default): ``W_ij, b_i ~ N(0, 1)``,
  ``a_W = sqrt(C_W / n_{l-1})``, ``a_b = sqrt(C_b)``.
* ``parameterization="standard"``: ``W_ij ~ N(0, C_W / n_{l-1})``, ``b_i ~ N(0, C_b)``,
  ``a_W = a_b = 1``.

Both give the same forward distribution (the same NNGP). The NTK is the kernel of gradient
descent with one learning rate for every parameter, so it differs: in the recursion
``Theta^{(l+1)} = lambda_b + lambda_W <sigma sigma> + C_W <sigma' sigma'> Theta^{(l)}`` (PDLT
eq. 9.4), ``ntk`` has ``lambda_b = C_b, lambda_W = C_W`` and ``standard`` has
``lambda_b = 1, lambda_W = n_{l-1}`` (neural-tangents' ``parameterization="standard"`` with
``s=(1, 1)``; the NTK grows with width, which is why standard-parameterized training scales its
learning rate by 1/width). ``use_bias=False`` removes the biases (``lambda_b = 0`` and the
``C_b`` term), matching ``b_std=None`` in neural-tangents.

**muP** (``parameterization="mup"``, the maximal-update parameterization of Yang & Hu 2021,
"Feature learning in infinite-width neural networks", arXiv 2011.14522, Table 3). In their
abc-form a weight is ``W = n^{-a} w`` with ``w ~ N(0, n^{-2b})`` trained by SGD with learning
rate ``eta n^{-c}``; muP is ``a = -1/2`` for the input weights and all biases, ``a = 0`` for
hidden weights, ``a = 1/2`` for the output weights, ``b = 1/2`` and ``c = 0`` everywhere. rgnn
uses exactly this form, with PDLT's constants ``C_W, C_b`` and each layer's own width for ``n``
(``n_l`` is the width of layer ``l``; the input dimension ``n_0`` is not a width):

=================  =========================  ===============  ===============  ===============
group              multiplier ``a_W, a_b``    init var of w    SGD/GD factor    Adam factor
=================  =========================  ===============  ===============  ===============
input weights      ``sqrt(C_W n_1 / n_0)``    ``1 / n_1``      1                ``n_1^{-1/2}``
hidden weights l   ``sqrt(C_W)``              ``1 / n_{l-1}``  1                ``1 / n_{l-1}``
output weights     ``sqrt(C_W / n_L)``        ``1 / n_L``      1                ``n_L^{-1/2}``
hidden biases l    ``sqrt(C_b n_l)``          ``1 / n_l``      1                ``n_l^{-1/2}``
output bias        ``sqrt(C_b)``              ``1``            1                1
=================  =========================  ===============  ===============  ===============

The factors multiply the user's learning rate per group. With ``c = 0`` every SGD factor is 1:
the width scalings sit in the multipliers, so one global rate trains every layer, and the
empirical NTK of the parameters as they are (:func:`rgnn.empirical_ntk`) is exactly the kernel of
gradient descent. Adam's factors: with ``W = n^{-a} w``, SGD moves ``W`` by
``eta n^{-2a-c} dL/dW`` but Adam, whose step ignores the gradient's scale, by ``eta n^{-a-c}``
times an O(1) direction; so the abc-symmetry ``(a, b) -> (a + theta, b - theta)`` that needs
``c -> c - 2 theta`` for SGD needs ``c -> c - theta`` for Adam. Applied to the fan-in form of
Yang et al. 2022 ("Tensor Programs V", arXiv 2203.03466, Table 3: Adam rates ``eta`` for input
weights and biases, ``eta / fan_in`` for hidden and output weights, output initial variance
``1 / fan_in^2``) it gives the last column. The output bias is not width-scaled (its fan-out is
``out_dim``; TP V's bias rate ``eta * fan_out``). Forward, muP is the NTK parameterization with
the output multiplier divided by ``sqrt(n_L)``: the same hidden preactivations and an output of
variance ``C_b + C_W <sigma sigma> / n_L``, which vanishes with width apart from the bias. By
the symmetry with ``theta = 1/2`` it is the NTK parameterization with that output multiplier
and every learning rate (but the output bias's) ``n`` times larger; every Jacobian of the
output is ``1/sqrt(n)`` smaller, so for equal widths the output NTK at initialization equals
NTK's exactly, while the NTK of a hidden unit is ``n`` times NTK's.

*What the fixed point means for muP.* muP has no width-independent kernel limit: the output NNGP
tends to ``C_b`` and the NTK of a hidden unit grows like the width, because hidden features
move by O(1) in training (feature learning: the dichotomy theorem of Yang & Hu 2021, sec. 3,
puts muP outside the kernel regime), so no infinite-width NTK dynamics describes it.
:meth:`MLP.recursion` and :meth:`MLP.stax` therefore raise a ``ValueError`` for ``"mup"`` (and so
does :func:`rgnn.fixed_point`). The leading-order Gaussian kernels of a muP network *of the
given widths* at initialization follow from :meth:`MLP.scales` (per layer
``C_W^{(l)} = a_W^2 s_W^2 n_{l-1}``, ``C_b^{(l)} = a_b^2 s_b^2``,
``lambda_W^{(l)} = a_W^2 n_{l-1}``, ``lambda_b^{(l)} = a_b^2``), which :func:`rgnn.compare`
uses as its reference for muP.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from rgnn._validate import check_finite
from rgnn.activations import Activation, get_activation

__all__ = ["MLP", "MLPNetwork", "Recursion", "Scales", "PARAMETERIZATIONS"]

PARAMETERIZATIONS = ("ntk", "standard", "mup")


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")
    return int(value)


def _check_variance(name: str, value, *, positive: bool) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a finite number, got {value!r}") from None
    if not math.isfinite(v) or v < 0 or (positive and v == 0):
        bound = "> 0" if positive else ">= 0"
        raise ValueError(f"{name}: expected a finite variance {bound}, got {value!r}")
    return v


@partial(
    jax.tree_util.register_dataclass,
    data_fields=["weight_var", "bias_var", "lambda_b", "lambda_w", "shortcut", "branch"],
    meta_fields=["activation"],
)
@dataclasses.dataclass(frozen=True)
class Recursion:
    """The constants of the per-layer kernel recursions.

    A pytree whose only static part is the activation (and, through the lengths of its tuples,
    the depth and whether the network is residual): a jitted recursion traces the numbers, so
    one compilation serves every width, ``C_W``, ``C_b`` and learning-rate scaling of an
    activation and depth (the fixed point of a sweep over widths compiles once, not once per
    width).

    Attributes:
      activation: the activation with its Gaussian kernel maps.
      weight_var, bias_var: ``C_W`` and ``C_b`` (``C_b = 0`` when there are no biases).
      lambda_b: ``(L+1,)`` the bias learning-rate scalings ``lambda_b^{(l)}``.
      lambda_w: ``(L+1,)`` the weight learning-rate scalings ``lambda_W^{(l)}``.
      shortcut, branch: ``(L+1,)`` the residual factors ``gamma^{(l)}, xi^{(l)}`` of every layer
        (``0`` and ``1`` on plain layers), or ``None`` for a plain MLP.
    """

    activation: Activation
    weight_var: float
    bias_var: float
    lambda_b: tuple[float, ...]
    lambda_w: tuple[float, ...]
    shortcut: tuple[float, ...] | None = None
    branch: tuple[float, ...] | None = None


@dataclasses.dataclass(frozen=True)
class Scales:
    """Per-layer scalings of a parameterization; every field is a tuple of ``L + 1`` floats.

    Layer ``l`` (1-based) at index ``l - 1``; ``W = weight_multiplier * w`` with
    ``w ~ N(0, weight_init_var)`` (biases alike); the learning rate of a group is the user's
    rate times ``*_lr`` (SGD and full-batch gradient descent) or ``*_lr_adam`` (Adam).

    Attributes:
      weight_multiplier, weight_init_var, bias_multiplier, bias_init_var: the forward view.
      weight_lr, bias_lr, weight_lr_adam, bias_lr_adam: learning-rate factors.
      weight_var: ``C_W^{(l)} = a_W^2 s_W^2 n_{l-1}``, the forward weight variance times fan-in.
      bias_var: ``C_b^{(l)} = a_b^2 s_b^2`` (0 without biases).
      lambda_w: ``lambda_W^{(l)} = weight_lr * a_W^2 n_{l-1}``, the NTK weight scaling of
        gradient descent with these learning-rate factors.
      lambda_b: ``lambda_b^{(l)} = bias_lr * a_b^2`` (0 without biases).
    """

    weight_multiplier: tuple[float, ...]
    weight_init_var: tuple[float, ...]
    bias_multiplier: tuple[float, ...]
    bias_init_var: tuple[float, ...]
    weight_lr: tuple[float, ...]
    bias_lr: tuple[float, ...]
    weight_lr_adam: tuple[float, ...]
    bias_lr_adam: tuple[float, ...]
    weight_var: tuple[float, ...]
    bias_var: tuple[float, ...]
    lambda_w: tuple[float, ...]
    lambda_b: tuple[float, ...]


@dataclasses.dataclass(frozen=True)
class MLP:
    """A fully connected network: ``depth`` hidden layers of ``width`` units.

    Args:
      depth: number of hidden layers ``L >= 1``; there are ``L + 1`` preactivation layers.
      width: hidden width ``n`` (every hidden layer), or a sequence of ``L`` widths.
      activation: a registry name (``relu``, ``leaky_relu``, ``erf``, ``tanh``, ``sin``,
        ``gelu``, ``swish``, ``silu``, ``sigmoid``, ``softplus``, ``linear``), an
        :class:`~rgnn.activations.Activation`, or any JAX-traceable elementwise callable.
      weight_var: ``C_W``, the weight variance times fan-in (> 0).
      bias_var: ``C_b``, the bias variance (>= 0).
      parameterization: ``"ntk"``, ``"standard"`` or ``"mup"`` (see the module docstring).
      out_dim: width of the output layer ``n_{L+1}``.
      use_bias: whether layers have biases.
      shortcut: the residual shortcut weight ``gamma`` of the hidden layers ``2..L`` (one
        finite number, or a sequence of ``L - 1``), or ``None`` (default) for a plain MLP.
      branch: the residual branch weight ``xi`` (one finite number or ``L - 1`` of them;
        default 1); only with ``shortcut``.
    """

    depth: int
    width: int | tuple[int, ...]
    activation: str | Callable | Activation = "relu"
    weight_var: float = 1.0
    bias_var: float = 0.0
    parameterization: str = "ntk"
    out_dim: int = 1
    use_bias: bool = True
    shortcut: float | tuple[float, ...] | None = None
    branch: float | tuple[float, ...] = 1.0

    def __post_init__(self):
        depth = _check_positive_int("depth", self.depth)
        if isinstance(self.width, Sequence) and not isinstance(self.width, str):
            widths = tuple(_check_positive_int("width", w) for w in self.width)
            if len(widths) != depth:
                raise ValueError(
                    f"width: expected one width per hidden layer ({depth}), got {len(widths)}"
                )
            object.__setattr__(self, "width", widths)
        else:
            _check_positive_int("width", self.width)
        get_activation(self.activation)  # raises a ValueError for unknown names
        object.__setattr__(
            self, "weight_var", _check_variance("weight_var", self.weight_var, positive=True)
        )
        object.__setattr__(
            self, "bias_var", _check_variance("bias_var", self.bias_var, positive=False)
        )
        if self.parameterization not in PARAMETERIZATIONS:
            raise ValueError(
                f"parameterization: expected one of {PARAMETERIZATIONS}, "
                f"got {self.parameterization!r}"
            )
        _check_positive_int("out_dim", self.out_dim)
        self._check_residual(depth)

    def _check_residual(self, depth: int) -> None:
        def factors(name, value):
            if isinstance(value, Sequence) and not isinstance(value, str):
                vals = tuple(value)
                if len(vals) != depth - 1:
                    raise ValueError(
                        f"{name}: expected one number or one per residual layer 2..L "
                        f"({depth - 1} of them), got {len(vals)}"
                    )
            else:
                vals = (value,)
            out = []
            for v in vals:
                out.append(check_finite(name, v))
            return tuple(out) if len(vals) != 1 or isinstance(value, Sequence) else out[0]

        if self.shortcut is None:
            if not (isinstance(self.branch, int | float) and float(self.branch) == 1.0):
                raise ValueError(
                    f"branch: a branch weight needs a residual shortcut (shortcut=gamma); got "
                    f"branch={self.branch!r} with shortcut=None"
                )
            return
        object.__setattr__(self, "shortcut", factors("shortcut", self.shortcut))
        object.__setattr__(self, "branch", factors("branch", self.branch))
        if self.parameterization == "mup":
            raise ValueError(
                "shortcut: residual MLPs are supported with parameterization 'ntk' or "
                "'standard', not 'mup'"
            )
        if len(set(self.widths)) > 1:
            raise ValueError(
                f"width: a residual MLP (shortcut={self.shortcut!r}) adds z^(l) to z^(l+1), so "
                f"its hidden layers need equal widths; got {self.widths}"
            )

    # ------------------------------------------------------------------ basic facts
    @property
    def widths(self) -> tuple[int, ...]:
        """Hidden widths ``(n_1, ..., n_L)``."""
        if isinstance(self.width, tuple):
            return self.width
        return (int(self.width),) * self.depth

    @property
    def n_layers(self) -> int:
        """Number of preactivation layers, ``L + 1``."""
        return self.depth + 1

    @property
    def act(self) -> Activation:
        """The resolved :class:`~rgnn.activations.Activation`."""
        return get_activation(self.activation)

    @property
    def is_residual(self) -> bool:
        """Whether the MLP has residual shortcuts (``shortcut`` given and ``depth >= 2``)."""
        return self.shortcut is not None and self.depth >= 2

    def residual(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """``(gamma, xi)``: the residual factors of every layer ``l = 1..L+1`` (``L + 1``
        each; ``gamma = 0``, ``xi = 1`` on the plain first and output layers, and on every
        layer of a plain MLP)."""
        n = self.n_layers
        if self.shortcut is None:
            return (0.0,) * n, (1.0,) * n

        def per_layer(v):
            vals = v if isinstance(v, tuple) else (v,) * (self.depth - 1)
            return tuple(float(a) for a in vals)

        return (
            (0.0, *per_layer(self.shortcut), 0.0),
            (1.0, *per_layer(self.branch), 1.0),
        )

    @property
    def effective_bias_var(self) -> float:
        """``C_b``, or 0 without biases."""
        return self.bias_var if self.use_bias else 0.0

    def layer_dims(self, in_dim: int) -> tuple[int, ...]:
        """``(n_0, n_1, ..., n_L, n_{L+1})``."""
        return (_check_positive_int("in_dim", in_dim), *self.widths, self.out_dim)

    # ------------------------------------------------------------------ view 3: recursions
    def scales(self, in_dim: int) -> Scales:
        """The per-layer multipliers, initial variances and learning-rate factors (module
        docstring) for inputs of dimension ``in_dim``."""
        dims = self.layer_dims(in_dim)
        cw, cb = self.weight_var, self.effective_bias_var
        n_layers = self.n_layers
        a_w, s_w, a_b, s_b = [], [], [], []
        lr_w_adam, lr_b_adam = [1.0] * n_layers, [1.0] * n_layers
        for k, (n_in, n_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            if self.parameterization == "ntk":
                a_w.append(math.sqrt(cw / n_in))
                s_w.append(1.0)
                a_b.append(math.sqrt(cb))
                s_b.append(1.0)
            elif self.parameterization == "standard":
                a_w.append(1.0)
                s_w.append(cw / n_in)
                a_b.append(1.0)
                s_b.append(cb)
            elif k == 0:  # muP input weights: a = -1/2, b = 1/2 in the width n_1
                a_w.append(math.sqrt(cw * n_out / n_in))
                s_w.append(1.0 / n_out)
                a_b.append(math.sqrt(cb * n_out))
                s_b.append(1.0 / n_out)
                lr_w_adam[k] = lr_b_adam[k] = 1.0 / math.sqrt(n_out)
            elif k < n_layers - 1:  # muP hidden weights: a = 0, b = 1/2 in the fan-in
                a_w.append(math.sqrt(cw))
                s_w.append(1.0 / n_in)
                a_b.append(math.sqrt(cb * n_out))
                s_b.append(1.0 / n_out)
                lr_w_adam[k] = 1.0 / n_in
                lr_b_adam[k] = 1.0 / math.sqrt(n_out)
            else:  # muP output weights: a = 1/2, b = 1/2; output bias not width-scaled
                a_w.append(math.sqrt(cw / n_in))
                s_w.append(1.0 / n_in)
                a_b.append(math.sqrt(cb))
                s_b.append(1.0)
                lr_w_adam[k] = 1.0 / math.sqrt(n_in)
        ones = (1.0,) * n_layers
        has_b = 1.0 if self.use_bias else 0.0
        return Scales(
            weight_multiplier=tuple(a_w),
            weight_init_var=tuple(s_w),
            bias_multiplier=tuple(a_b),
            bias_init_var=tuple(s_b),
            weight_lr=ones,
            bias_lr=ones,
            weight_lr_adam=tuple(lr_w_adam),
            bias_lr_adam=tuple(lr_b_adam),
            weight_var=tuple(a * a * s * n for a, s, n in zip(a_w, s_w, dims[:-1], strict=True)),
            bias_var=tuple(has_b * a * a * s for a, s in zip(a_b, s_b, strict=True)),
            lambda_w=tuple(a * a * n for a, n in zip(a_w, dims[:-1], strict=True)),
            lambda_b=tuple(has_b * a * a for a in a_b),  # times the SGD factors, all 1
        )

    def recursion(self, in_dim: int) -> Recursion:
        """The constants of the native recursions for inputs of dimension ``in_dim``.

        Raises a ``ValueError`` for ``"mup"``, which has no width-independent kernel limit
        (module docstring); :meth:`scales` gives its per-layer constants at finite width.
        """
        if self.parameterization == "mup":
            raise ValueError(
                "parameterization: 'mup' has no infinite-width kernel limit (its output NNGP "
                "vanishes like 1/width and its hidden-layer NTKs grow like the width: feature "
                "learning); use parameterization='ntk' for the NNGP of its hidden layers, which "
                "muP shares, or rgnn.compare, which builds muP's finite-width Gaussian reference"
            )
        dims = self.layer_dims(in_dim)
        cb = self.effective_bias_var
        if self.parameterization == "ntk":
            lam_b = (cb,) * self.n_layers
            lam_w = (self.weight_var,) * self.n_layers
        else:
            lam_b = (1.0 if self.use_bias else 0.0,) * self.n_layers
            lam_w = tuple(float(n) for n in dims[:-1])
        if self.is_residual:
            gamma, xi = self.residual()
            return Recursion(self.act, self.weight_var, cb, lam_b, lam_w, gamma, xi)
        return Recursion(self.act, self.weight_var, cb, lam_b, lam_w)

    # ------------------------------------------------------------------ view 1: stax
    def stax_layers(self, *, quadrature_order: int = 96) -> list:
        """The neural-tangents layers ``[Dense, act, Dense, act, ..., Dense]`` (2L + 1 of them);
        for a residual MLP its ``L + 1`` stages, one per preactivation layer
        (:meth:`_residual_stages`).

        Activations without a neural-tangents closed form use ``stax.ElementwiseNumerical``
        with ``deg=quadrature_order``.
        """
        if self.parameterization == "mup":
            raise ValueError(
                "parameterization: neural-tangents has no 'mup' layers and muP has no "
                "infinite-width kernel limit; expected 'ntk' or 'standard' for the stax view"
            )
        from rgnn._compat import import_neural_tangents

        stax = import_neural_tangents().stax
        w_std = math.sqrt(self.weight_var)
        b_std = math.sqrt(self.bias_var) if self.use_bias else None
        act = self.act

        def dense(n):
            return stax.Dense(n, W_std=w_std, b_std=b_std, parameterization=self.parameterization)

        name = act.name
        if name == "relu":
            act_layer = stax.Relu()
        elif act.negative_slope is not None and act.negative_slope > 0:
            act_layer = stax.LeakyRelu(act.negative_slope)
        elif name == "erf":
            act_layer = stax.Erf()
        elif name == "sin":
            act_layer = stax.Sin()
        elif name == "gelu":
            act_layer = stax.Gelu(approximate=False)
        elif name == "linear":
            act_layer = stax.Identity()
        else:
            act_layer = stax.ElementwiseNumerical(act.fn, deg=quadrature_order)
        if self.is_residual:
            return self._residual_stages(stax, dense, act_layer)
        layers = [dense(self.widths[0])]
        for n in (*self.widths[1:], self.out_dim):
            layers += [act_layer, dense(n)]
        return layers

    def _residual_stages(self, stax, dense, act_layer) -> list:
        """The ``L + 1`` stages of a residual MLP: ``Dense``, the ``L - 1`` residual blocks
        ``FanOut(2) -> parallel(serial(act, Dense, xi), gamma) -> FanInSum`` and the plain
        output ``serial(act, Dense)``; ``xi``, ``gamma`` are scalings ``z -> c z`` whose
        kernel maps are ``c^2 K`` (NNGP) and ``c^2 Theta`` (NTK), and which keep a Gaussian
        input Gaussian (``FanInSum`` requires it)."""

        @stax.layer
        @stax.supports_masking(remask_kernel=False)
        def scale(c):
            def init_fn(rng, input_shape):
                return input_shape, ()

            def apply_fn(params, x, **kwargs):
                return c * x

            def kernel_fn(k, **kwargs):
                def sq(a):
                    return None if a is None else c * c * a

                return k.replace(nngp=sq(k.nngp), ntk=sq(k.ntk), cov1=sq(k.cov1), cov2=sq(k.cov2))

            return init_fn, apply_fn, kernel_fn

        gamma, xi = self.residual()
        stages = [dense(self.widths[0])]
        for layer in range(1, self.depth):
            branch = stax.serial(act_layer, dense(self.widths[layer]), scale(xi[layer]))
            stages.append(
                stax.serial(
                    stax.FanOut(2), stax.parallel(branch, scale(gamma[layer])), stax.FanInSum()
                )
            )
        stages.append(stax.serial(act_layer, dense(self.out_dim)))
        return stages

    def stax(self, *, layer: int | None = None, quadrature_order: int = 96):
        """The neural-tangents ``(init_fn, apply_fn, kernel_fn)`` of the network.

        Args:
          layer: if given, the prefix of the network up to preactivation layer ``l`` (1-based);
            ``None`` is the whole network (``l = L + 1``).
        """
        from rgnn._compat import import_neural_tangents

        stax = import_neural_tangents().stax
        layers = self.stax_layers(quadrature_order=quadrature_order)
        if layer is not None:
            if not 1 <= layer <= self.n_layers:
                raise ValueError(f"layer: expected 1..{self.n_layers}, got {layer!r}")
            layers = layers[: layer if self.is_residual else 2 * layer - 1]
        return stax.serial(*layers)

    # ------------------------------------------------------------------ view 2: flax
    def network(self, in_dim: int, *, rngs: nnx.Rngs, dtype=None) -> MLPNetwork:
        """A finite flax nnx network of this architecture for inputs of dimension ``in_dim``."""
        return MLPNetwork(self, in_dim, rngs=rngs, dtype=dtype)


def _scaled_normal(key, scale, shape, dtype):
    """``scale * jax.random.normal(key, shape, dtype)``, the same numbers, drawn at a size
    shared by many shapes.

    JAX's sampler is compiled once per shape (and, vmapped over an ensemble's keys, per ensemble
    size), and compiling the float64 normal sampler dominates the cost of drawing a small
    ensemble. With the ``threefry2x32`` generator in its partitionable mode (JAX's default)
    entry ``i`` of a draw depends only on the key and ``i``, so a draw of ``shape`` is the
    first ``prod(shape)`` entries of a flat draw of any larger size: drawing at the next power
    of two (at least 64) and cropping gives bit-identical parameters with one compilation per
    size class (tests/test_monte_carlo.py checks the identity). Any other generator draws
    ``shape`` directly."""
    size = math.prod(shape)
    impl = str(jax.random.key_impl(key))
    if size == 0 or impl != "threefry2x32" or not jax.config.jax_threefry_partitionable:
        return scale * jax.random.normal(key, shape, dtype)
    bucket = max(64, 1 << (size - 1).bit_length())
    return (scale * jax.random.normal(key, (bucket,), dtype))[:size].reshape(shape)


class _Dense(nnx.Module):
    """``z = a_W (x @ W) + a_b b`` with ``W ~ N(0, w_var)``, ``b ~ N(0, b_var)``."""

    def __init__(self, n_in, n_out, *, w_var, b_var, a_w, a_b, use_bias, rngs, dtype):
        self.w = nnx.Param(_scaled_normal(rngs.params(), jnp.sqrt(w_var), (n_in, n_out), dtype))
        self.b = (
            nnx.Param(_scaled_normal(rngs.params(), jnp.sqrt(b_var), (n_out,), dtype))
            if use_bias
            else None
        )
        self.a_w = a_w
        self.a_b = a_b

    def __call__(self, x):
        z = self.a_w * (x @ self.w[...])
        if self.b is not None:
            b = self.b[...]
            z = z + self.a_b * b.reshape((1,) * (z.ndim - 1) + b.shape)
        return z


class MLPNetwork(nnx.Module):
    """A finite network of an :class:`MLP`, parameters drawn as the infinite-width limit assumes.

    ``net(x)`` is the output ``z^{(L+1)}`` (``[N, out_dim]``); ``net.preactivations(x)`` is the
    list of all ``z^{(l)}``, ``l = 1..L+1``.
    """

    def __init__(self, arch: MLP, in_dim: int, *, rngs: nnx.Rngs, dtype=None):
        dtype = dtype or jnp.result_type(float)
        dims = arch.layer_dims(in_dim)
        cw, cb = arch.weight_var, arch.effective_bias_var
        layers = []
        sc = arch.scales(in_dim)
        for k, (n_in, n_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            kw = dict(
                w_var=sc.weight_init_var[k],
                b_var=sc.bias_init_var[k],
                a_w=sc.weight_multiplier[k],
                a_b=sc.bias_multiplier[k],
            )
            layers.append(_Dense(n_in, n_out, use_bias=arch.use_bias, rngs=rngs, dtype=dtype, **kw))
        self.layers = nnx.List(layers)
        self.c_w = cw
        self.c_b = cb
        self.activation = arch.act.fn
        # residual factors of layers 1..L+1 (static Python floats), None for a plain MLP
        self.residual = arch.residual() if arch.is_residual else None

    def preactivations(self, x: jax.Array) -> list[jax.Array]:
        """``[z^{(1)}, ..., z^{(L+1)}]``, each ``[N, n_l]``; a residual layer is
        ``xi * layer(sigma(z)) + gamma * z`` (:mod:`rgnn.architecture`)."""
        zs = [self.layers[0](x)]
        for k, layer in enumerate(self.layers[1:], start=1):
            h = layer(self.activation(zs[-1]))
            if self.residual is not None and k < len(self.layers) - 1:
                gamma, xi = self.residual[0][k], self.residual[1][k]
                h = xi * h + gamma * zs[-1]
            zs.append(h)
        return zs

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.preactivations(x)[-1]
