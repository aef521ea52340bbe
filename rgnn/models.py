"""Any architecture on the Gaussian side: one adapter for neural-tangents triples and flax models.

rgnn's native pipeline knows the :class:`~rgnn.MLP` layer by layer. Every other architecture
enters through one small protocol, :class:`Model`: a finite network is a parameter pytree
drawn by ``init(key, x)`` and evaluated by ``apply(params, x) -> [N, C]``; its infinite-width
reference is ``reference(x1, x2) -> (K, Theta)`` of the *output layer*; its empirical kernels
are ``empirical_nngp`` and ``empirical_ntk`` of the output layer; ``lr_factors`` gives every
parameter's learning-rate factor (1 by default); ``output_dim(x)`` the number of outputs;
``at_width(n)`` the same family at width ``n`` (sweeps); ``depth_over_width`` the expansion
parameter the verdict's trust bound reads; ``check_output`` the shape check behind the
one-line errors. Subclass :class:`Model` (a frozen dataclass, hashable) to add an
architecture. :func:`rgnn.fixed_point`,
:func:`rgnn.ensemble`, :func:`rgnn.train`, :func:`rgnn.compare`, :func:`rgnn.sweep` and
:func:`rgnn.classify` dispatch on it at their entry (:func:`as_model` turns a raw triple or an
nnx module into one) and run the same measurements as for an MLP on the one layer they know.

Three implementations:

* :class:`StaxModel`: a neural-tangents ``(init_fn, apply_fn, kernel_fn)`` triple
  (:func:`rgnn.import_neural_tangents`). The reference kernels are ``kernel_fn``'s NNGP and NTK
  of the output; inputs given as ``[N, n_0]`` rows are reshaped to ``input_shape`` (e.g.
  ``(8, 8, 1)`` for images) before ``apply_fn``/``kernel_fn``.
* :class:`FlaxModel`: a user's flax nnx module (or a function from width to module) and a
  reference the user supplies (a function ``(x1, x2) -> (nngp, ntk)``, either may be ``None``,
  or a stax ``kernel_fn``).
* :class:`CNN` (:func:`cnn`): the built-in convolutional family on the 8x8 digits, with
  structural (exact, Jacobian-free) empirical kernels and neural-tangents' reference kernels.

**What exists for these models, and what does not.** Only the output layer: a
:class:`~rgnn.FixedPoint` of a model has a layer axis of length 1 holding the output layer
(``fp.nngp[-1]``, the index the whole pipeline uses); per-layer kernels of a model are absent,
never guessed. There are no 1/n rules for a model (:func:`rgnn.perturbative`,
:func:`rgnn.vertex`, :func:`rgnn.measure` raise a ``ValueError`` saying so): the sweep
measures each measure's 1/n coefficient from the widths themselves
(:func:`rgnn.study.fit_scaling`), and the kurtosis has no prediction (NaN).

**Empirical NTK** (output unit ``unit``, every parameter, gradient-descent factors 1): exact,
without forming a Jacobian. With ``f_a(theta)`` the output on input ``a``,

.. math::

    \\hat\\Theta_{ab} = \\nabla f_a \\cdot \\nabla f_b
        = \\big[J_1 (J_2^{\\top} e_b)\\big]_a :

a VJP of ``f(x2)`` along the basis vector ``e_b`` gives the parameter-shaped vector
``J_2^T e_b``, and a JVP of ``f(x1)`` along it gives column ``b`` of the kernel. Columns are
mapped in chunks so that at most :data:`CHUNK_BYTES` of cotangents exist at once (``N2``
backward and ``N2`` forward-mode passes; memory ``O(chunk * P)`` instead of the Jacobian's
``N P``). The MLP keeps rgnn's structural NTK (:mod:`rgnn.empirical`), which is faster still.

**Empirical NNGP of a model** (the stochastic metric of the output layer, PDLT eq. 4.50): when
the output is affine in the last parameter group ``phi`` (the last non-empty entry of a stax
``serial`` parameter list: a ``Dense`` readout), with every leaf ``phi_k`` drawn i.i.d. with
mean 0 and variance ``s_k``, the covariance of the output over a fresh draw of ``phi`` given
everything below is

.. math::

    G_{ab} = \\sum_k s_k\\, \\partial_{\\phi_k} f_a \\cdot \\partial_{\\phi_k} f_b ,

the ``s``-weighted NTK of the readout (``C_W h_a h_b / n + C_b`` for a ``Dense`` readout in
either parameterization). It is computed by the JVP/VJP method above, and is NaN (never a
guess) when the output is not affine in ``phi`` on the given inputs (checked in the same
pass: ``f(2 phi) + f(0) = 2 f(phi)`` and ``f(phi) + f(-phi) = 2 f(0)``) or the parameters
have no such group. ``s_k`` is given
(:func:`cnn`: NTK parameterization, ``s = 1``) or estimated as the mean square of the leaf's
entries over :data:`VARIANCE_DRAWS` draws of ``init_fn``. A :class:`FlaxModel` has no
parameter order that marks its readout: the user names it (``readout="out"``), and the same
formula runs over that submodule's parameters; without it the output metric is NaN (and
:func:`rgnn.compare` warns). :func:`rgnn.empirical_nngp` with ``layer=`` gives the kernel
``h h^T / n`` of a named submodule's output of one flax module.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

# ``Model``, the protocol (no constructor arguments, so no signature for the reference site's
# check), is described in this module's docstring; it is public all the same
__all__ = [
    "StaxModel",
    "FlaxModel",
    "cnn",
    "CNN",
    "as_model",
    "as_family",
    "is_model_like",
    "require_mlp",
    "ntk_jvp",
    "ntk_jacobian",
    "model_fixed_point",
    "fingerprint",
    "CHUNK_BYTES",
    "VARIANCE_DRAWS",
]

CHUNK_BYTES = 2**28
"""Cotangent memory of one chunk of NTK columns (256 MiB)."""

VARIANCE_DRAWS = 256
"""Draws of ``init_fn`` that estimate the readout's parameter variances when not given."""


def _describe(obj) -> str:
    if isinstance(obj, tuple):
        return f"a {len(obj)}-tuple"
    return f"a {type(obj).__name__}"


def require_mlp(arch, what: str) -> None:
    """Raise the ``ValueError`` for a function that needs rgnn's layer rules (an MLP).

    ``what`` names the function (``"rgnn.perturbative"``); the message names what the
    architecture is and what is unsupported.
    """
    from rgnn.architecture import MLP

    if isinstance(arch, MLP):
        return
    if is_model_like(arch):
        kind = "a neural-tangents stax triple" if _is_triple(arch) else _describe(arch)
        if isinstance(arch, Model):
            kind = f"the {arch.kind} model {arch.name!r}"
        raise ValueError(
            f"arch: no 1/n rules for {kind}: {what} needs rgnn's layer-by-layer flow, which "
            "exists for rgnn.MLP only; a model's 1/n coefficients are measured from a width "
            "sweep (rgnn.sweep) instead"
        )
    raise ValueError(f"arch: expected an rgnn.MLP, got {type(arch).__name__}")


def _is_triple(obj) -> bool:
    return isinstance(obj, tuple) and len(obj) == 3 and all(callable(f) for f in obj)


def _is_nnx(obj) -> bool:
    from flax import nnx

    return isinstance(obj, nnx.Module)


def is_model_like(obj) -> bool:
    """Whether ``obj`` is a :class:`Model`, a stax triple or a flax nnx module."""
    return isinstance(obj, Model) or _is_triple(obj) or _is_nnx(obj)


def as_model(obj, *, name: str | None = None, input_shape=None) -> Model:
    """``obj`` as a :class:`Model`: a :class:`Model` as it is, a stax triple as a
    :class:`StaxModel`, an nnx module as a :class:`FlaxModel` (without a reference)."""
    if isinstance(obj, Model):
        return obj
    if _is_triple(obj):
        return StaxModel(*obj, name=name or "stax", input_shape=input_shape)
    if _is_nnx(obj):
        from rgnn.architecture import MLPNetwork

        if isinstance(obj, MLPNetwork):
            raise ValueError("model: an rgnn.MLPNetwork goes through rgnn's MLP path")
        return FlaxModel(obj, name=name or type(obj).__name__)
    if callable(obj):
        raise ValueError(
            "arch: a function (a family of widths) goes to rgnn.sweep; here expected one "
            "network: call it at a width, or use rgnn.models.as_family(fn)(width)"
        )
    if isinstance(obj, tuple):
        raise ValueError(
            f"arch: expected a neural-tangents stax triple (init_fn, apply_fn, kernel_fn), got "
            f"{_describe(obj)} whose entries are not all callable"
        )
    raise ValueError(
        "arch: expected an rgnn.MLP, a neural-tangents stax triple (init_fn, apply_fn, "
        f"kernel_fn), a flax nnx module or an rgnn.models.Model, got {type(obj).__name__}"
    )


# ----------------------------------------------------------------------------- the protocol
@dataclasses.dataclass(frozen=True)
class Model:
    """The adapter protocol (module docstring). Subclasses are frozen dataclasses, so a model
    is hashable and can be a static argument of ``jit``.

    Attributes every model has: ``kind`` (``"stax"``, ``"flax"``), ``name``,
    ``width`` (the width the family is at, or ``None``), ``depth`` (hidden layers, or
    ``None``), ``parameterization`` (``"ntk"``, ``"standard"`` or ``"user"``),
    ``activation`` (a name, or ``"n/a"``).
    """

    kind = "model"
    name = "model"
    activation = "n/a"
    parameterization = "user"
    depth = None
    width = None

    # -- finite networks
    def init(self, key, x):
        """One network's parameters for inputs like ``x`` (``[N, n_0]``)."""
        raise NotImplementedError

    def apply(self, params, x):
        """The outputs ``[N, out_dim]`` on ``x`` (``[N, n_0]``)."""
        raise NotImplementedError

    def output_dim(self, x) -> int:
        """``out_dim`` for inputs like ``x``."""
        raise NotImplementedError

    def lr_factors(self, params, optimizer: str):
        """Learning-rate factor of every parameter (a pytree like ``params``): 1."""
        return jax.tree_util.tree_map(lambda _: 1.0, params)

    # -- kernels
    def reference(self, x1, x2=None):
        """Infinite-width ``(nngp, ntk)`` of the output layer, each ``[N1, N2]`` or ``None``
        where the model has none."""
        return None, None

    def empirical_ntk(self, params, x1, x2, unit: int = 0):
        """Exact empirical NTK ``[N1, N2]`` of output unit ``unit`` (:func:`ntk_jvp`)."""
        return ntk_jvp(lambda p, x: self.apply(p, x)[:, unit], params, x1, x2)

    def empirical_nngp(self, params, x1, x2):
        """The output layer's stochastic metric ``[N1, N2]``, or NaN where not available."""
        return jnp.full((x1.shape[0], x2.shape[0]), jnp.nan, x1.dtype)

    @property
    def depth_over_width(self) -> float:
        """``depth / width``, the expansion parameter the verdict's trust bound reads
        (:mod:`rgnn.regime`). An unknown depth counts as one hidden layer (a lower bound: the
        bound then refuses only what a single layer of this width would); an unknown width
        (one module, no family) gives 0, no bound (the record then cannot be trusted more than
        its measures say)."""
        if self.width is None:
            return 0.0
        return (1 if self.depth is None else self.depth) / self.width

    def at_width(self, width: int) -> Model:
        """The same family at another width (for sweeps)."""
        raise ValueError(
            f"arch: the {self.kind} model {self.name!r} is one network, not a family of widths; "
            "pass a function from width to model (or triple) to rgnn.sweep"
        )

    def check_output(self, params, x) -> None:
        """Raise a ``ValueError`` unless the output on ``x`` is ``[N, out_dim]``, floating (also
        when the model cannot run on ``x`` at all: the error it raised, in one line)."""
        try:
            shape = jax.eval_shape(self.apply, params, x)
        except ValueError:
            raise
        except Exception as err:  # noqa: BLE001 - e.g. a shape mismatch deep inside the model
            raise ValueError(
                f"x: the {self.kind} model {self.name!r} does not run on inputs of shape "
                f"{tuple(x.shape)} ({type(err).__name__}: {str(err)[:200]})"
            ) from None
        if shape.ndim != 2 or shape.shape[0] != x.shape[0]:
            raise ValueError(
                f"arch: expected the {self.kind} model {self.name!r} to map [N, ...] inputs "
                f"to [N, out_dim] outputs, got {tuple(shape.shape)} for {x.shape[0]} inputs"
            )
        if not jnp.issubdtype(shape.dtype, jnp.floating):
            raise ValueError(f"arch: expected floating outputs, got {shape.dtype}")


# ----------------------------------------------------------------------------- kernels
def _tree_size(tree) -> int:
    return sum(int(np.prod(np.shape(leaf))) for leaf in jax.tree_util.tree_leaves(tree))


def _chunk(n2: int, params, itemsize: int) -> int:
    per = max(1, _tree_size(params) * itemsize)
    return int(max(1, min(n2, CHUNK_BYTES // per)))


def ntk_jvp(f, params, x1, x2, *, weights=None):
    """``J_1 W J_2^T`` for a scalar-per-input function ``f(params, x) -> [N]``, by VJPs and JVPs
    (module docstring); ``weights`` (a pytree like ``params``, optional) multiplies each
    parameter's cotangent (the readout variances of the empirical NNGP). Returns ``[N1, N2]``.
    """

    def g1(p):
        return f(p, x1)

    def g2(p):
        return f(p, x2)

    _, vjp2 = jax.vjp(g2, params)
    n2 = x2.shape[0]
    dtype = jax.eval_shape(g2, params).dtype

    def column(e):
        (ct,) = vjp2(e)
        if weights is not None:
            ct = jax.tree_util.tree_map(lambda c, w: c * w, ct, weights)
        return jax.jvp(g1, (params,), (ct,))[1]

    eye = jnp.eye(n2, dtype=dtype)
    chunk = _chunk(n2, params, jnp.dtype(dtype).itemsize)
    cols = jax.lax.map(column, eye, batch_size=chunk)  # [N2, N1]
    return cols.T


def ntk_jacobian(f, params, x1, x2):
    """The same kernel from ``jax.jacobian`` (the reference the tests hold
    :func:`ntk_jvp` to)."""
    j1 = jax.jacobian(lambda p: f(p, x1))(params)
    j2 = jax.jacobian(lambda p: f(p, x2))(params)
    return sum(
        jnp.einsum("ap,bp->ab", a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1))
        for a, b in zip(jax.tree_util.tree_leaves(j1), jax.tree_util.tree_leaves(j2), strict=True)
    )


def _affine(f, phi, x):
    """Whether ``f(phi, x)`` looks affine in ``phi`` (a scalar-valued jax bool): the two exact
    identities of an affine map ``f(2 phi) + f(0) = 2 f(phi)`` and ``f(phi) + f(-phi) =
    2 f(0)``, to rounding (1000 eps of the output's scale). The second catches a positively
    homogeneous map, such as relu of a hidden layer, that passes the first."""
    scaled = [jax.tree_util.tree_map(lambda a, c=c: c * a, phi) for c in (1.0, 2.0, 0.0, -1.0)]
    f1, f2, f0, fm = (f(p, x) for p in scaled)
    scale = jnp.max(jnp.abs(f1)) + jnp.max(jnp.abs(f0)) + jnp.max(jnp.abs(fm))
    tol = 1e3 * jnp.finfo(f1.dtype).eps * (1 + scale)
    return (jnp.max(jnp.abs(f2 + f0 - 2 * f1)) <= tol) & (jnp.max(jnp.abs(f1 + fm - 2 * f0)) <= tol)


# ----------------------------------------------------------------------------- stax
def _last_group(params):
    """Index of the last non-empty entry of a stax parameter sequence, or ``None``."""
    if not isinstance(params, list | tuple):
        return None
    for i in range(len(params) - 1, -1, -1):
        if jax.tree_util.tree_leaves(params[i]):
            return i
    return None


@dataclasses.dataclass(frozen=True, eq=True)
class StaxModel(Model):
    """A neural-tangents ``(init_fn, apply_fn, kernel_fn)`` triple as a :class:`Model`.

    Args:
      init_fn, apply_fn, kernel_fn: the triple (``stax.serial(...)``).
      name: a label (sweep records, messages).
      input_shape: the shape of one input without the batch axis (``(8, 8, 1)`` for 8x8
        images, channels last); ``None``: inputs are the flat rows ``[N, n_0]``.
      readout_var: the variances ``s_k`` of the last parameter group's leaves (module
        docstring), or ``None`` to estimate them from :data:`VARIANCE_DRAWS` draws.
      width, depth, activation, parameterization: descriptive (sweeps and the verdict's
        trust bound ``depth / width``).
      family: a function ``width -> triple`` (set by :func:`as_family`), for
        :meth:`at_width`.
    """

    init_fn: Callable
    apply_fn: Callable
    kernel_fn: Callable
    name: str = "stax"
    input_shape: tuple | None = None
    readout_var: tuple | None = None
    width: int | None = None
    depth: int | None = None
    activation: str = "n/a"
    parameterization: str = "user"
    family: Callable | None = dataclasses.field(default=None, compare=True)
    kind = "stax"

    def _shape(self, x):
        if self.input_shape is None:
            return x
        return x.reshape((x.shape[0], *self.input_shape))

    def init(self, key, x):
        _, params = self.init_fn(key, (-1, *self._shape(x).shape[1:]))
        dtype = x.dtype
        return jax.tree_util.tree_map(lambda p: jnp.asarray(p, dtype), params)

    def apply(self, params, x):
        return self.apply_fn(params, self._shape(x))

    def reference(self, x1, x2=None):
        a = self._shape(x1)
        b = None if x2 is None else self._shape(x2)
        try:
            k = self.kernel_fn(a, b, ("nngp", "ntk"))
        except (NotImplementedError, TypeError, ValueError, KeyError, AttributeError) as err:
            try:
                k = self.kernel_fn(a, b, "nngp")
            except Exception:  # noqa: BLE001 - report the first failure below
                raise ValueError(
                    f"arch: the kernel_fn of {self.name!r} computes neither the NNGP nor the "
                    f"NTK on these inputs ({type(err).__name__}: {str(err)[:200]})"
                ) from None
            return jnp.asarray(k, x1.dtype), None
        ntk = getattr(k, "ntk", None)
        nngp = getattr(k, "nngp", None)
        if ntk is None or (hasattr(ntk, "ndim") and ntk.ndim == 0):
            ntk = None
        return (
            None if nngp is None else jnp.asarray(nngp, x1.dtype),
            None if ntk is None else jnp.asarray(ntk, x1.dtype),
        )

    def _readout_weights(self, params, dtype):
        i = _last_group(params)
        if i is None:
            return None, None
        group = params[i]
        if self.readout_var is not None:
            leaves, tdef = jax.tree_util.tree_flatten(group)
            if len(self.readout_var) != len(leaves):
                raise ValueError(
                    f"readout_var: expected {len(leaves)} variances (one per leaf of the last "
                    f"parameter group), got {len(self.readout_var)}"
                )
            return i, jax.tree_util.tree_unflatten(
                tdef, [jnp.asarray(v, dtype) for v in self.readout_var]
            )
        return i, None

    def empirical_nngp(self, params, x1, x2):
        i, weights = self._readout_weights(params, x1.dtype)
        if i is None:
            return super().empirical_nngp(params, x1, x2)
        if weights is None:
            weights = self._estimated_var(params, x1)

        def f(phi, x):
            p = list(params)
            p[i] = phi
            return self.apply(type(params)(p) if isinstance(params, tuple) else p, x)[:, 0]

        phi = params[i]
        g = ntk_jvp(f, phi, x1, x2, weights=weights)
        return jnp.where(_affine(f, phi, x1), g, jnp.nan)

    def _estimated_var(self, params, x):
        i = _last_group(params)
        keys = jax.random.split(jax.random.key(20260), VARIANCE_DRAWS)
        draws = jax.vmap(lambda k: self.init(k, x)[i])(keys)
        return jax.tree_util.tree_map(lambda d: jnp.mean(d**2), draws)

    def at_width(self, width: int) -> StaxModel:
        if self.family is None:
            return super().at_width(width)
        return dataclasses.replace(
            as_family(self.family, name=self.name, input_shape=self.input_shape)(width),
            readout_var=self.readout_var,
            depth=self.depth,
            activation=self.activation,
            parameterization=self.parameterization,
        )

    def output_dim(self, x) -> int:
        """``out_dim`` for inputs like ``x``."""
        out_shape, _ = self.init_fn(jax.random.key(0), (-1, *self._shape(x).shape[1:]))
        return int(out_shape[-1])


def _call_family(fn, width):
    from flax import nnx

    if _takes_rngs(fn):
        return fn(width, rngs=nnx.Rngs(0))
    return fn(width)


def as_family(fn: Callable, *, name: str | None = None, input_shape=None) -> Callable:
    """A function ``width -> Model`` from a function ``width -> triple | Model | nnx module``.

    Each model it returns knows its width (for the sweep's records) and the family (for
    :meth:`Model.at_width`)."""
    label = name or getattr(fn, "__qualname__", getattr(fn, "__name__", "family"))

    def at(width: int) -> Model:
        obj = _call_family(fn, width)
        if _is_nnx(obj):
            return FlaxModel(fn, name=label, width=int(width))
        m = as_model(obj, name=label, input_shape=input_shape)
        if isinstance(m, StaxModel):
            return dataclasses.replace(m, width=int(width), family=fn, name=label)
        return m

    return at


def _patches(h, size: int):
    """``[N, H, W, C] -> [N, H W, 9 C]``: the 3x3 "SAME" patches, index ``(kh 3 + kw) C + c``
    (the order of an ``HWIO`` kernel reshaped to ``[9 C, C_out]``; cross-correlation, as
    ``lax.conv_general_dilated``)."""
    n, hh, ww, c = h.shape
    pad = size // 2
    hp = jnp.pad(h, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    cols = [hp[:, i : i + hh, j : j + ww, :] for i in range(size) for j in range(size)]
    return jnp.stack(cols, axis=3).reshape(n, hh * ww, size * size * c)


@dataclasses.dataclass(frozen=True)
class CNN(Model):
    """The built-in convolutional family (:func:`cnn`): ``depth`` 3x3 convolutions of
    ``width`` channels ("SAME" padding, relu), global average pooling, a dense readout.

    NTK parameterization, exactly neural-tangents' ``stax.Conv``/``stax.Dense`` (``W, b ~
    N(0, 1)``; the convolution scaled by ``sqrt(C_W / (9 C_in))``, the readout by
    ``sqrt(C_W / C)``, biases by ``sqrt(C_b)``), and the same parameter pytree as
    :meth:`stax`'s ``init_fn``, whose ``kernel_fn`` gives the reference kernels. The forward
    pass is written as patches times a matrix (faster than a vmapped convolution on CPU); the
    tests hold it to ``stax``'s ``apply_fn``. Its empirical kernels are structural and exact:

    .. math::

        G_{ab} = \\frac{C_W}{C} \\bar h_a \\cdot \\bar h_b + C_b, \\qquad
        \\hat\\Theta_{ab} = \\sum_{k} \\sum_{s, s'} \\big(\\delta^{(k)}_{a s} \\cdot
            \\delta^{(k)}_{b s'}\\big) \\big(a_k^2\\, P^{(k)}_{a s} \\cdot P^{(k)}_{b s'}
            + C_b\\big) + G_{ab},

    with ``bar h`` the pooled features, ``P^{(k)}_{a s}`` the patch of layer ``k``'s input at
    position ``s``, ``a_k^2 = C_W / (9 C_in)``, and ``delta^{(k)}_{a s} = d f_a / d z^{(k)}_{a s}``
    the backward signals, all from one backward pass (the gradient of ``sum_a f_a`` with
    respect to additive perturbations of every preactivation): the convolutional form of
    :func:`rgnn.empirical_ntk`'s layer sum (the readout term is ``G``, since the readout's
    parameters enter with unit variance).
    """

    width: int = 32
    depth: int = 2
    weight_var: float = 2.0
    bias_var: float = 0.0
    out_dim_: int = 1
    image_shape: tuple = (8, 8, 1)
    kind = "cnn"
    activation = "relu"
    parameterization = "ntk"

    @property
    def name(self) -> str:
        return f"cnn(depth={self.depth}, C_W={self.weight_var:g}, C_b={self.bias_var:g})"

    def stax(self):
        """The neural-tangents triple of this network."""
        from rgnn._compat import import_neural_tangents

        stax = import_neural_tangents().stax
        w_std = math.sqrt(self.weight_var)
        b_std = math.sqrt(self.bias_var) if self.bias_var > 0 else None
        layers = []
        for _ in range(self.depth):
            layers += [
                stax.Conv(self.width, (3, 3), padding="SAME", W_std=w_std, b_std=b_std),
                stax.Relu(),
            ]
        layers += [stax.GlobalAvgPool(), stax.Dense(self.out_dim_, W_std=w_std, b_std=b_std)]
        return stax.serial(*layers)

    def _check(self, x):
        if x.shape[1] != int(np.prod(self.image_shape)):
            raise ValueError(
                f"x: expected {int(np.prod(self.image_shape))} features (images of shape "
                f"{self.image_shape}, flattened), got {x.shape[1]}"
            )

    def init(self, key, x):
        self._check(x)
        return _cnn_params(self, key, jnp.dtype(x.dtype))

    def _forward(self, params, x, eps=None):
        """Output ``[N, C]``; ``eps`` (optional) adds a perturbation to each preactivation."""
        self._check(x)
        h = x.reshape((x.shape[0], *self.image_shape))
        cw, cb = self.weight_var, self.bias_var
        feats = []
        for k in range(self.depth):
            w, b = params[2 * k][0], params[2 * k][1]
            n, hh, ww, c = h.shape
            p = _patches(h, 3)
            feats.append(p)
            z = math.sqrt(cw / (9 * c)) * (p @ w.reshape(9 * c, -1))
            if b is not None:
                z = z + math.sqrt(cb) * b.reshape(1, 1, -1)
            if eps is not None:
                z = z + eps[k]
            h = jax.nn.relu(z).reshape(n, hh, ww, -1)
        pooled = h.mean(axis=(1, 2))
        w, b = params[-1][0], params[-1][1]
        out = math.sqrt(cw / pooled.shape[1]) * (pooled @ w)
        if b is not None:
            out = out + math.sqrt(cb) * b.reshape(1, -1)
        return out, feats, pooled

    def apply(self, params, x):
        return self._forward(params, x)[0]

    def output_dim(self, x) -> int:
        return self.out_dim_

    def reference(self, x1, x2=None):
        shape = (-1, *self.image_shape)
        a = x1.reshape(shape)
        b = None if x2 is None else x2.reshape(shape)
        # the infinite-channel kernels do not depend on the width: one compilation per family
        nngp, ntk = _cnn_reference(dataclasses.replace(self, width=1), a, b)
        return jnp.asarray(nngp, x1.dtype), jnp.asarray(ntk, x1.dtype)

    def empirical_nngp(self, params, x1, x2):
        h1, h2 = self._forward(params, x1)[2], self._forward(params, x2)[2]
        return self.weight_var * (h1 @ h2.T) / h1.shape[1] + self.bias_var

    def _signals(self, params, x, unit):
        n, (hh, ww) = x.shape[0], self.image_shape[:2]
        eps = [jnp.zeros((n, hh * ww, self.width), x.dtype) for _ in range(self.depth)]

        def total(e):
            return self._forward(params, x, e)[0][:, unit].sum()

        deltas = jax.grad(total)(eps)
        _, feats, pooled = self._forward(params, x)
        return deltas, feats, pooled

    def empirical_ntk(self, params, x1, x2, unit: int = 0):
        d1, p1, h1 = self._signals(params, x1, unit)
        d2, p2, h2 = self._signals(params, x2, unit)
        theta = self.weight_var * (h1 @ h2.T) / h1.shape[1] + self.bias_var
        for k in range(self.depth):
            a2 = self.weight_var / p1[k].shape[-1]
            dd = jnp.einsum("asc,btc->abst", d1[k], d2[k])
            pp = a2 * jnp.einsum("asc,btc->abst", p1[k], p2[k]) + self.bias_var
            theta = theta + jnp.sum(dd * pp, axis=(2, 3))
        return theta

    @property
    def depth_over_width(self) -> float:
        return self.depth / self.width

    def at_width(self, width: int) -> CNN:
        return dataclasses.replace(self, width=int(width))


@functools.partial(jax.jit, static_argnums=(0, 2))
def _cnn_params(model: CNN, key, dtype):
    """``stax``'s ``init_fn`` draw of one network, compiled once per (network, dtype): eagerly,
    each of its sampling operations would be compiled on its own for every width."""
    _, params = model.stax()[0](key, (-1, *model.image_shape))
    return jax.tree_util.tree_map(lambda p: jnp.asarray(p, dtype), params)


@functools.partial(jax.jit, static_argnums=(0,))
def _cnn_reference(model: CNN, a, b):
    """``stax``'s ``kernel_fn`` NNGP and NTK of the output, compiled once per family and input
    shapes (eagerly, neural-tangents' kernel functions compile operation by operation)."""
    k = model.stax()[2](a, b, ("nngp", "ntk"))
    return k.nngp, k.ntk


def cnn(
    width: int = 32,
    *,
    depth: int = 2,
    weight_var: float = 2.0,
    bias_var: float = 0.0,
    out_dim: int = 1,
    image_shape=(8, 8, 1),
) -> CNN:
    """The built-in convolutional family at ``width`` channels (:class:`CNN`): relu at
    criticality by default (``C_W = 2``, ``C_b = 0``), on the 8x8 digits of
    :func:`rgnn.data.digits` (rows of 64 numbers, reshaped to images)."""
    for label, v in (("width", width), ("depth", depth), ("out_dim", out_dim)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{label}: expected an integer >= 1, got {v!r}")
    if not (isinstance(weight_var, int | float) and weight_var > 0):
        raise ValueError(f"weight_var: expected C_W > 0, got {weight_var!r}")
    if not (isinstance(bias_var, int | float) and bias_var >= 0):
        raise ValueError(f"bias_var: expected C_b >= 0, got {bias_var!r}")
    shape = tuple(int(s) for s in image_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"image_shape: expected (height, width, channels), got {image_shape!r}")
    return CNN(width, depth, float(weight_var), float(bias_var), out_dim, shape)


# ----------------------------------------------------------------------------- flax
def _takes_rngs(fn) -> bool:
    import inspect

    target = fn.__init__ if isinstance(fn, type) else fn
    try:
        return "rngs" in inspect.signature(target).parameters
    except (TypeError, ValueError):
        return False


@dataclasses.dataclass(frozen=True)
class FlaxModel(Model):
    """A user's flax nnx model as a :class:`Model`.

    Args:
      model: an nnx module ``model(x) -> [N, out_dim]`` used as it is (one network), or a
        function ``width -> module``; a function with an ``rngs`` keyword,
        ``make(width, rngs=nnx.Rngs(key))``, draws a new network per key (ensembles need it).
      reference_fn: the user's infinite-width kernels of the output: a function
        ``(x1, x2) -> (nngp, ntk)`` (``x2`` may be ``None``; either kernel may be ``None``),
        or a neural-tangents ``kernel_fn`` (its ``Kernel``'s ``nngp`` and ``ntk`` are used);
        ``None``: no reference (:func:`rgnn.compare` then refuses the model).
      name: a label.
      width: the width passed to a function ``model`` (sweeps set it).
      depth: hidden layers, if the user wants the verdict's trust bound ``depth / width``.
      readout: the attribute path (dots for nesting, e.g. ``"out"`` or ``"head.dense"``) of
        the submodule whose parameters enter the output affinely, usually the last ``Linear``.
        It gives the output layer's empirical metric (the empirical NNGP, module docstring):
        ``G_ab = sum_k s_k df_a/dphi_k . df_b/dphi_k`` over that submodule's parameters
        ``phi_k``, which is ``s_W h_a . h_b + s_b`` for a ``Linear`` readout of features
        ``h``. ``None`` (the default): a flax model has no such layer that rgnn could find for
        itself, and the empirical NNGP and every NNGP field of :func:`rgnn.compare` and
        :func:`rgnn.sweep` are NaN (``compare`` warns once why).
      readout_var: the variances ``s_k`` of the readout's parameter leaves at initialization,
        one number per leaf in the order of ``jax.tree_util.tree_leaves`` of that submodule's
        parameters (``nnx.Linear``: ``(bias, kernel)``; its defaults are ``(0.0, 1 / fan_in)``).
        ``None``: estimated as the mean square of each leaf's entries over
        :data:`VARIANCE_DRAWS` networks drawn by ``make(width, rngs=...)``, or, for a single
        module that cannot draw, over the entries of its own readout (relative error about
        ``sqrt(2 / size)`` of the leaf).

    The parameters are the module's ``nnx.Param`` variables; every other state (e.g. an
    ``nnx.Rngs``) is taken from the module built with ``jax.random.key(0)`` and held fixed.
    """

    model: object = None
    reference_fn: Callable | None = None
    name: str = "flax"
    width: int | None = None
    depth: int | None = None
    readout: str | None = None
    readout_var: tuple | None = None
    kind = "flax"

    def __post_init__(self):
        if self.readout is not None and (not isinstance(self.readout, str) or not self.readout):
            raise ValueError(
                f"readout: expected the attribute path of a submodule (a str), got {self.readout!r}"
            )
        if self.readout_var is not None:
            try:
                var = tuple(float(v) for v in self.readout_var)
            except (TypeError, ValueError):
                raise ValueError(
                    "readout_var: expected a sequence of variances, one per parameter leaf of "
                    f"the readout, got {self.readout_var!r}"
                ) from None
            if self.readout is None:
                raise ValueError("readout_var: given without readout (the submodule it describes)")
            if not all(math.isfinite(v) and v >= 0 for v in var):
                raise ValueError(f"readout_var: expected finite variances >= 0, got {var}")
            object.__setattr__(self, "readout_var", var)

    @property
    def is_family(self) -> bool:
        return not _is_nnx(self.model)

    @property
    def can_draw(self) -> bool:
        """Whether ``init`` draws a new network per key (an ``rngs`` keyword)."""
        return self.is_family and _takes_rngs(self.model)

    def _build(self, key):
        from flax import nnx

        if not self.is_family:
            return self.model
        if self.width is None:
            raise ValueError(
                f"model: {self.name!r} is a function from width to model; call "
                "rgnn.models.FlaxModel(...).at_width(width) or pass it to rgnn.sweep"
            )
        if _takes_rngs(self.model):
            return self.model(self.width, rngs=nnx.Rngs(key))
        return self.model(self.width)

    @functools.cached_property
    def _split(self):
        from flax import nnx

        graphdef, params, rest = nnx.split(self._build(jax.random.key(0)), nnx.Param, ...)
        return graphdef, params, rest

    def init(self, key, x):
        from flax import nnx

        if not self.can_draw:
            params = self._split[1]
        else:
            params = nnx.split(self._build(key), nnx.Param, ...)[1]
        params = jax.tree_util.tree_map(lambda p: jnp.asarray(p, x.dtype), params)
        self.check_output(params, x)  # a module that cannot take x: one ValueError, here
        return params

    def apply(self, params, x):
        from flax import nnx

        graphdef, _, rest = self._split
        return nnx.merge(graphdef, params, rest)(x)

    def output_dim(self, x) -> int:
        shape = jax.eval_shape(self.apply, self._split[1], x)
        return int(shape.shape[-1]) if shape.ndim == 2 else -1

    def reference(self, x1, x2=None):
        if self.reference_fn is None:
            return None, None
        out = self.reference_fn(x1, x2)
        if hasattr(out, "nngp") and hasattr(out, "ntk"):  # a neural-tangents Kernel
            out = (out.nngp, out.ntk)
        if not (isinstance(out, tuple | list) and len(out) == 2):
            raise ValueError(
                "reference: expected a function (x1, x2) -> (nngp, ntk), got one returning "
                f"{type(out).__name__}"
            )
        n1 = x1.shape[0]
        n2 = n1 if x2 is None else x2.shape[0]
        res = []
        for label, k in zip(("nngp", "ntk"), out, strict=True):
            if k is None:
                res.append(None)
                continue
            k = jnp.asarray(k, x1.dtype)
            if k.shape != (n1, n2):
                raise ValueError(
                    f"reference: expected the {label} as [{n1}, {n2}], got {tuple(k.shape)}"
                )
            res.append(k)
        return tuple(res)

    def _readout_split(self, params):
        """``(phi, put)``: the readout's parameter leaves (a list) and a function
        ``put(new_phi) -> params`` that puts others in their place."""
        parts = tuple(self.readout.split("."))
        flat, treedef = jax.tree_util.tree_flatten_with_path(params)
        sel = [i for i, (path, _) in enumerate(flat) if _path_names(path)[: len(parts)] == parts]
        if not sel:
            raise ValueError(
                f"readout: no parameters under {self.readout!r} in {self.name!r} (expected the "
                "attribute path of the submodule that computes the output, e.g. 'out')"
            )
        leaves = [leaf for _, leaf in flat]

        def put(new):
            vals = list(leaves)
            for i, leaf in zip(sel, new, strict=True):
                vals[i] = leaf
            return jax.tree_util.tree_unflatten(treedef, vals)

        return [leaves[i] for i in sel], put

    def _readout_variances(self, params, dtype):
        phi, _ = self._readout_split(params)
        if self.readout_var is not None:
            if len(self.readout_var) != len(phi):
                raise ValueError(
                    f"readout_var: expected {len(phi)} variances (one per parameter leaf of "
                    f"{self.readout!r}), got {len(self.readout_var)}"
                )
            return [jnp.asarray(v, dtype) for v in self.readout_var]
        if self.can_draw:
            from flax import nnx

            def draw(key):
                drawn = nnx.split(self._build(key), nnx.Param, ...)[1]
                return self._readout_split(drawn)[0]

            keys = jax.random.split(jax.random.key(20260), VARIANCE_DRAWS)
            draws = jax.vmap(draw)(keys)
            return [jnp.mean(jnp.asarray(d, dtype) ** 2) for d in draws]
        own = self._readout_split(self._split[1])[0]
        return [jnp.mean(jnp.asarray(leaf, dtype) ** 2) for leaf in own]

    def empirical_nngp(self, params, x1, x2):
        """The output layer's stochastic metric ``[N1, N2]`` from the named ``readout``
        (class docstring), NaN without one or where the output is not affine in it."""
        if self.readout is None:
            return super().empirical_nngp(params, x1, x2)
        phi, put = self._readout_split(params)
        weights = self._readout_variances(params, x1.dtype)

        def f(new, x):
            return self.apply(put(new), x)[:, 0]

        g = ntk_jvp(f, phi, x1, x2, weights=weights)
        return jnp.where(_affine(f, phi, x1), g, jnp.nan)

    def features(self, params, x, layer: str):
        """The output of the submodule at attribute path ``layer`` (dots for nesting),
        flattened to ``[N, n]``."""
        from flax import nnx

        graphdef, _, rest = self._split
        mod = nnx.merge(graphdef, params, rest)
        _, inter = nnx.capture(mod, nnx.Intermediate, method_outputs=nnx.Intermediate)(x)
        node = inter
        for part in layer.split("."):
            try:
                node = node[part]
            except (KeyError, TypeError, AttributeError):
                raise ValueError(
                    f"layer: no submodule {layer!r} is called in {self.name!r}"
                ) from None
        try:
            h = node["__call__"].get_value()[0]
        except (KeyError, TypeError, IndexError, AttributeError):
            raise ValueError(
                f"layer: {layer!r} is not a called submodule of {self.name!r}"
            ) from None
        return h.reshape(h.shape[0], -1)

    def at_width(self, width: int) -> FlaxModel:
        if not self.is_family:
            return super().at_width(width)
        return dataclasses.replace(self, width=int(width))


def _path_names(path) -> tuple:
    """The attribute names of a pytree path of an ``nnx.State`` (dict keys, sequence indices
    and attributes as strings; the trailing ``value`` of a variable dropped)."""
    names = []
    for entry in path:
        for attr in ("key", "idx", "name"):
            if hasattr(entry, attr):
                names.append(str(getattr(entry, attr)))
                break
    if names and names[-1] == "value":
        names.pop()
    return tuple(names)


def fingerprint(model: Model, x) -> str:
    """A short, process-independent label of a model's behaviour: the SHA-256 of its kind,
    name, parameter shapes and outputs at ``jax.random.key(0)`` on the first 4 inputs of ``x``
    rounded to 8 significant digits (the sweep's resume key for a family)."""
    xs = jnp.asarray(x[:4])
    params = model.init(jax.random.key(0), xs)
    shapes = [tuple(np.shape(p)) for p in jax.tree_util.tree_leaves(params)]
    out = np.asarray(model.apply(params, xs), np.float64)
    text = f"{model.kind}:{model.name}:{shapes}:" + ",".join(f"{v:.8g}" for v in out.ravel())
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def model_fixed_point(arch, x1, x2=None):
    """The Gaussian fixed point of a model (:func:`rgnn.fixed_point` for a non-MLP): a
    :class:`~rgnn.FixedPoint` whose layer axis has length 1, the output layer, from the
    model's :meth:`Model.reference` (``kernel_fn`` for a triple). Per-layer kernels do not
    exist for a model and are not guessed; a kernel the model does not provide (an NTK that
    its ``kernel_fn`` lacks, a flax model without a reference) is NaN. ``backend`` is
    ``"model"``; ``quadrature_error`` is ``None`` (the model's own accuracy is not estimated).
    """
    from rgnn._validate import check_pair
    from rgnn.fixed_point import FixedPoint

    model = as_model(arch)
    x1, x2 = check_pair(x1, x2)
    n1 = x1.shape[0]
    n2 = n1 if x2 is None else x2.shape[0]
    try:
        k, t = model.reference(x1, x2)
        # the diagonals: with x2 None the kernel above is already K(x1, x1)
        k1 = k if x2 is None else model.reference(x1)[0]
        k2 = k1 if x2 is None else model.reference(x2)[0]
    except ValueError:
        raise
    except Exception as err:  # noqa: BLE001 - a kernel_fn that cannot run on these inputs
        raise ValueError(
            f"arch: the kernel function of the {model.kind} model {model.name!r} failed on "
            f"inputs of shape {tuple(x1.shape)} ({type(err).__name__}: {str(err)[:200]})"
        ) from None

    def full(a, shape):
        return jnp.full(shape, jnp.nan, x1.dtype) if a is None else jnp.asarray(a, x1.dtype)

    d1 = jnp.diagonal(full(k1, (n1, n1)))
    d2 = jnp.diagonal(full(k2, (n2, n2)))
    return FixedPoint(
        nngp=full(k, (n1, n2))[None],
        ntk=full(t, (n1, n2))[None],
        nngp_diag1=d1[None],
        nngp_diag2=d2[None],
        backend="model",
        quadrature_order=0,
        quadrature_error=None,
    )
