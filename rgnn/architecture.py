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
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from rgnn.activations import Activation, get_activation

__all__ = ["MLP", "MLPNetwork", "Recursion", "PARAMETERIZATIONS"]

PARAMETERIZATIONS = ("ntk", "standard")


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


@dataclasses.dataclass(frozen=True)
class Recursion:
    """The constants of the per-layer kernel recursions (hashable: a static jit argument).

    Attributes:
      activation: the activation with its Gaussian kernel maps.
      weight_var, bias_var: ``C_W`` and ``C_b`` (``C_b = 0`` when there are no biases).
      lambda_b: ``(L+1,)`` the bias learning-rate scalings ``lambda_b^{(l)}``.
      lambda_w: ``(L+1,)`` the weight learning-rate scalings ``lambda_W^{(l)}``.
    """

    activation: Activation
    weight_var: float
    bias_var: float
    lambda_b: tuple[float, ...]
    lambda_w: tuple[float, ...]


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
      parameterization: ``"ntk"`` or ``"standard"`` (see the module docstring).
      out_dim: width of the output layer ``n_{L+1}``.
      use_bias: whether layers have biases.
    """

    depth: int
    width: int | tuple[int, ...]
    activation: str | Callable | Activation = "relu"
    weight_var: float = 1.0
    bias_var: float = 0.0
    parameterization: str = "ntk"
    out_dim: int = 1
    use_bias: bool = True

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
    def effective_bias_var(self) -> float:
        """``C_b``, or 0 without biases."""
        return self.bias_var if self.use_bias else 0.0

    def layer_dims(self, in_dim: int) -> tuple[int, ...]:
        """``(n_0, n_1, ..., n_L, n_{L+1})``."""
        return (_check_positive_int("in_dim", in_dim), *self.widths, self.out_dim)

    # ------------------------------------------------------------------ view 3: recursions
    def recursion(self, in_dim: int) -> Recursion:
        """The constants of the native recursions for inputs of dimension ``in_dim``."""
        dims = self.layer_dims(in_dim)
        cb = self.effective_bias_var
        if self.parameterization == "ntk":
            lam_b = (cb,) * self.n_layers
            lam_w = (self.weight_var,) * self.n_layers
        else:
            lam_b = (1.0 if self.use_bias else 0.0,) * self.n_layers
            lam_w = tuple(float(n) for n in dims[:-1])
        return Recursion(self.act, self.weight_var, cb, lam_b, lam_w)

    # ------------------------------------------------------------------ view 1: stax
    def stax_layers(self, *, quadrature_order: int = 96) -> list:
        """The neural-tangents layers ``[Dense, act, Dense, act, ..., Dense]`` (2L + 1 of them).

        Activations without a neural-tangents closed form use ``stax.ElementwiseNumerical``
        with ``deg=quadrature_order``.
        """
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
        layers = [dense(self.widths[0])]
        for n in (*self.widths[1:], self.out_dim):
            layers += [act_layer, dense(n)]
        return layers

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
            layers = layers[: 2 * layer - 1]
        return stax.serial(*layers)

    # ------------------------------------------------------------------ view 2: flax
    def network(self, in_dim: int, *, rngs: nnx.Rngs, dtype=None) -> MLPNetwork:
        """A finite flax nnx network of this architecture for inputs of dimension ``in_dim``."""
        return MLPNetwork(self, in_dim, rngs=rngs, dtype=dtype)


class _Dense(nnx.Module):
    """``z = a_W (x @ W) + a_b b`` with ``W ~ N(0, w_var)``, ``b ~ N(0, b_var)``."""

    def __init__(self, n_in, n_out, *, w_var, b_var, a_w, a_b, use_bias, rngs, dtype):
        self.w = nnx.Param(jnp.sqrt(w_var) * jax.random.normal(rngs.params(), (n_in, n_out), dtype))
        self.b = (
            nnx.Param(jnp.sqrt(b_var) * jax.random.normal(rngs.params(), (n_out,), dtype))
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
        for n_in, n_out in zip(dims[:-1], dims[1:], strict=True):
            if arch.parameterization == "ntk":
                kw = dict(w_var=1.0, b_var=1.0, a_w=math.sqrt(cw / n_in), a_b=math.sqrt(cb))
            else:
                kw = dict(w_var=cw / n_in, b_var=cb, a_w=1.0, a_b=1.0)
            layers.append(_Dense(n_in, n_out, use_bias=arch.use_bias, rngs=rngs, dtype=dtype, **kw))
        self.layers = nnx.List(layers)
        self.c_w = cw
        self.c_b = cb
        self.activation = arch.act.fn

    def preactivations(self, x: jax.Array) -> list[jax.Array]:
        """``[z^{(1)}, ..., z^{(L+1)}]``, each ``[N, n_l]``."""
        zs = [self.layers[0](x)]
        for layer in self.layers[1:]:
            zs.append(layer(self.activation(zs[-1])))
        return zs

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.preactivations(x)[-1]
