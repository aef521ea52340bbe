"""Training ensembles of finite networks with optax, recording per-layer kernels as they move.

:func:`train` draws ``M`` networks of an :class:`~rgnn.MLP` (:func:`rgnn.ensemble`) and trains
all of them at once: one ``jit``-compiled loop whose every step is a ``jax.vmap`` over the
ensemble axis of the nnx parameter state, and whose steps between two recorded steps run in one
``jax.lax.while_loop`` (no Python loop over networks or over steps). At each recorded step it
stores the loss, the outputs and the per-layer empirical NNGP and NTK
(:func:`rgnn.empirical_nngp`, :func:`rgnn.empirical_ntk`), which :func:`rgnn.compare` measures
against the Gaussian fixed point.

This lives in its own module rather than in :mod:`rgnn.networks` (where ARCHITECTURE.md first
put training) because it depends on :mod:`rgnn.empirical`, which itself builds on
:mod:`rgnn.networks`: keeping the ensemble container below the kernels and training above them
keeps the imports one-way.

**Losses** (the normalization fixes what a learning rate means, and the closed form of
:func:`rgnn.linearized_prediction`):

.. math::

    \\mathcal{L}_{\\rm mse} = \\frac{1}{2 N C} \\sum_{a=1}^{N} \\sum_{i=1}^{C}
        (f_{ia} - y_{ia})^2, \\qquad
    \\mathcal{L}_{\\rm ce} = \\frac{1}{N} \\sum_{a=1}^{N}
        \\Big(\\log \\sum_{i} e^{f_{ia}} - f_{y_a a}\\Big),

over the ``N`` inputs of the (mini)batch and the ``C = out_dim`` outputs: the mean squared
error is halved and averaged over every entry (as in neural-tangents' ``predict``), the
cross-entropy takes integer labels ``y_a`` in ``0..C-1``.

**Optimizers.** ``"gd"``: full-batch gradient descent ``theta <- theta - eta_g grad L``;
``"sgd"``: the same on minibatches of ``batch_size`` inputs drawn without replacement, a fresh
draw every step, shared by all members of the ensemble (so the members differ only by their
initialization) and reproducible from ``key`` (:func:`batch_indices`); ``"adam"``: optax's
``scale_by_adam`` (``b1 = 0.9, b2 = 0.999, eps = 1e-8``), full batch unless ``batch_size`` is
given. The learning rate of each parameter group is ``eta_g = learning_rate * factor_g`` with
the factors of the parameterization (:meth:`rgnn.MLP.scales`): 1 for every group under
``"ntk"`` (one global rate) and ``"standard"`` (the rate as given), and under ``"mup"`` 1 for
SGD (its width scalings sit in the multipliers, Yang & Hu 2021's ``c = 0``) and the Adam
factors of :mod:`rgnn.architecture` for Adam.

**Divergence.** If any member's loss at a step is NaN or inf, training stops before that step's
update, :func:`train` warns (``RuntimeWarning``, naming the step and the learning rate) and
returns the records taken before it, with ``diverged_at`` set to that step.
"""

from __future__ import annotations

import dataclasses
import sys
import warnings
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from rgnn._validate import check_learning_rate, check_pair
from rgnn.architecture import MLP
from rgnn.empirical import empirical_nngp, empirical_ntk
from rgnn.networks import Ensemble, ensemble

__all__ = ["Training", "train", "batch_indices", "ensemble_kernels", "OPTIMIZERS", "LOSSES"]

OPTIMIZERS = ("gd", "sgd", "adam")
LOSSES = ("mse", "cross_entropy")
ADAM = dict(b1=0.9, b2=0.999, eps=1e-8)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Training:
    """The record of training an ensemble of ``M`` networks, at ``T`` recorded steps.

    ``N`` training inputs, ``N*`` test inputs, ``C = out_dim`` outputs, ``L + 1`` layers
    (layer ``l`` at index ``l - 1``). Arrays follow the dtype of the inputs.

    Attributes:
      steps: ``[T]`` the recorded steps (``0``, initialization, first).
      loss: ``[T, M]`` the full training-set loss of each network at each recorded step.
      outputs: ``[T, M, N, C]`` the network outputs on the training inputs.
      test_outputs: ``[T, M, N*, C]`` the outputs on ``x_test``, or ``None``.
      nngp: ``[T, M, L+1, N, N]`` the per-layer empirical NNGP (the stochastic metric
        ``G^{(l)}``, :func:`ensemble_kernels`) on the training inputs (``None`` if not
        recorded).
      ntk: ``[T, M, L+1, N, N]`` the per-layer empirical NTK of one unit per layer, for the
        learning rates of gradient descent (:func:`ensemble_kernels`; ``None`` if not
        recorded).
      targets: ``[N, C]`` the regression targets, or ``[N]`` integer labels.
      test_inputs: ``[N*, n_0]`` or ``None``.
      initial: the :class:`~rgnn.Ensemble` at step 0.
      final: the ensemble at the last recorded step.
      batch_key: the key of the minibatch draws (:func:`batch_indices`).
      learning_rate: the user's learning rate ``eta`` (static).
      optimizer: ``"gd"``, ``"sgd"`` or ``"adam"`` (static).
      loss_kind: ``"mse"`` or ``"cross_entropy"`` (static).
      batch_size: minibatch size, ``None`` for full batch (static).
      diverged_at: the step whose loss was NaN or inf, ``-1`` if none (static).
    """

    steps: jax.Array
    loss: jax.Array
    outputs: jax.Array
    test_outputs: jax.Array | None
    nngp: jax.Array | None
    ntk: jax.Array | None
    targets: jax.Array
    test_inputs: jax.Array | None
    initial: Ensemble
    final: Ensemble
    batch_key: jax.Array
    learning_rate: float = dataclasses.field(metadata=dict(static=True))
    optimizer: str = dataclasses.field(metadata=dict(static=True))
    loss_kind: str = dataclasses.field(metadata=dict(static=True))
    batch_size: int | None = dataclasses.field(metadata=dict(static=True))
    diverged_at: int = dataclasses.field(metadata=dict(static=True))

    @property
    def n_networks(self) -> int:
        """Ensemble size ``M``."""
        return self.loss.shape[1]


def ensemble_kernels(ens: Ensemble, x) -> tuple[jax.Array, jax.Array]:
    """Per-layer empirical NNGP and NTK of every member, ``([M, L+1, N, N], [M, L+1, N, N])``.

    :func:`rgnn.empirical_nngp` (the stochastic metric) and :func:`rgnn.empirical_ntk` (one unit
    per layer), with one correction for muP: the metric estimator assumes the forward weight
    variance ``C_W / n_{l-1}`` on every layer, while muP's output layer has
    ``C_W^{(L+1)} = C_W / n_L`` (:meth:`rgnn.MLP.scales`), so its output metric is rescaled to
    ``C_b + (G - C_b) C_W^{(L+1)} / C_W``. The NTK needs no correction: it is computed from the
    layer multipliers, and under every parameterization the gradient-descent learning-rate
    factors are 1 (:mod:`rgnn.architecture`), so it is the kernel of gradient descent.

    For an ensemble of a :class:`rgnn.models.Model`: the output layer only,
    ``([M, 1, N, N], [M, 1, N, N])`` (:mod:`rgnn.models`; the NNGP NaN where the model has no
    stochastic metric).
    """
    nngp = empirical_nngp(ens, x)
    ntk = empirical_ntk(ens, x)
    arch = ens.arch
    if isinstance(arch, MLP) and arch.parameterization == "mup":
        sc = arch.scales(ens.in_dim)
        cb = arch.effective_bias_var
        ratio = sc.weight_var[-1] / arch.weight_var
        nngp = nngp.at[:, -1].set(cb + (nngp[:, -1] - cb) * ratio)
    return nngp, ntk


def batch_indices(batch_key: jax.Array, step, n_inputs: int, batch_size: int) -> jax.Array:
    """The minibatch of step ``step``: ``[batch_size]`` indices into the ``n_inputs`` inputs,
    without replacement, ``permutation(fold_in(batch_key, step))[:batch_size]``."""
    perm = jax.random.permutation(jax.random.fold_in(batch_key, step), n_inputs)
    return perm[:batch_size]


def _loss_fn(kind: str):
    if kind == "mse":

        def loss(out, y):
            return 0.5 * jnp.mean((out - y) ** 2)

    else:

        def loss(out, y):
            logp = jax.nn.log_softmax(out, axis=-1)
            return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=-1))

    return loss


@dataclasses.dataclass(frozen=True)
class _Forward:
    """``forward(state, x)`` of one member: the nnx graph of an MLP ensemble, or a
    :class:`rgnn.models.Model`'s ``apply`` (hashable: a static argument of the jitted loop)."""

    graphdef: object = None
    model: object = None

    def __call__(self, state, x):
        if self.model is not None:
            return self.model.apply(state, x)
        return nnx.merge(self.graphdef, state)(x)


def _forward_of(ens: Ensemble) -> _Forward:
    if ens.graphdef is None:
        return _Forward(model=ens.arch)
    return _Forward(graphdef=ens.graphdef)


def _factor_tree(arch: MLP, in_dim: int, state, optimizer: str):
    """A pytree like one member's state: each leaf the learning-rate factor of its group."""
    if not isinstance(arch, MLP):
        return arch.lr_factors(state, optimizer)
    sc = arch.scales(in_dim)
    wf = sc.weight_lr_adam if optimizer == "adam" else sc.weight_lr
    bf = sc.bias_lr_adam if optimizer == "adam" else sc.bias_lr

    def factor(path, leaf):
        keys = [getattr(p, "key", getattr(p, "name", None)) for p in path]
        layer = next(k for k in keys if isinstance(k, int))
        return (wf if "w" in keys else bf)[layer]

    return jax.tree_util.tree_map_with_path(factor, state)


def _check_int(name, value, low, high=None):
    ok = isinstance(value, int | np.integer) and not isinstance(value, bool)
    if not ok or value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in {low}..{high}"
        raise ValueError(f"{name}: expected an integer {bound}, got {value!r}")
    return int(value)


def _check_targets(y, n: int, arch: MLP, loss: str, dtype, out_dim=None):
    try:
        arr = np.asarray(y)
    except Exception as err:  # noqa: BLE001 - anything unconvertible is bad input
        raise ValueError(f"y: expected an array, got {type(y).__name__}") from err
    if out_dim is None:
        out_dim = arch.out_dim
    if arr.shape[:1] != (n,):
        raise ValueError(
            f"y: expected {n} targets (one per row of x) on the first axis, got shape {arr.shape}"
        )
    if loss == "cross_entropy":
        if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(
                f"y: expected integer class labels of shape [{n}] for cross_entropy, "
                f"got shape {arr.shape} and dtype {arr.dtype}"
            )
        if out_dim < 2:
            raise ValueError(f"arch: expected out_dim >= 2 for cross_entropy, got {out_dim}")
        if arr.min() < 0 or arr.max() >= out_dim:
            raise ValueError(
                f"y: expected labels in 0..{out_dim - 1} (arch.out_dim classes), "
                f"got {arr.min()}..{arr.max()}"
            )
        return jnp.asarray(arr, jnp.int32)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2 or arr.shape[1] != out_dim:
        raise ValueError(
            f"y: expected shape [{n}, {out_dim}] (arch.out_dim outputs), got {arr.shape}"
        )
    if not np.issubdtype(arr.dtype, np.number) or not np.all(np.isfinite(arr)):
        raise ValueError("y: expected finite real targets")
    return jnp.asarray(arr, dtype)


def _default_record_steps(steps: int) -> np.ndarray:
    """0, ``steps`` and up to 9 log-spaced steps in between."""
    inner = np.geomspace(1, steps, 9) if steps > 1 else np.array([])
    return np.unique(np.concatenate([[0, steps], np.round(inner).astype(int)]))


def _check_record_steps(record_steps, steps: int) -> np.ndarray:
    if record_steps is None:
        return _default_record_steps(steps)
    try:
        arr = np.asarray(record_steps)
    except Exception as err:  # noqa: BLE001
        raise ValueError("record_steps: expected a sequence of integers") from err
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"record_steps: expected a 1-D sequence of integers, got {record_steps!r}")
    if arr.size and (arr.min() < 0 or arr.max() > steps):
        raise ValueError(
            f"record_steps: expected steps in 0..{steps}, got {arr.min()}..{arr.max()}"
        )
    return np.unique(np.concatenate([[0], arr.astype(int)]))


def _transform(optimizer: str):
    return optax.scale_by_adam(**ADAM) if optimizer == "adam" else optax.identity()


@partial(jax.jit, static_argnames=("optimizer",))
def _opt_init(state, *, optimizer):
    return jax.vmap(_transform(optimizer).init)(state)


@partial(jax.jit, static_argnames=("forward", "loss_kind", "optimizer", "batch_size"))
def _advance(
    state,
    opt_state,
    x,
    y,
    factors,
    eta,
    batch_key,
    start,
    stop,
    *,
    forward,
    loss_kind,
    optimizer,
    batch_size,
):
    """Steps ``start..stop-1`` of every member (vmapped); stops before a step whose loss is
    not finite and returns that step (else -1)."""
    loss_one = _loss_fn(loss_kind)
    tx = _transform(optimizer)
    n = x.shape[0]

    def net_loss(s, xb, yb):
        return loss_one(forward(s, xb), yb)

    def cond(carry):
        i, _, _, bad = carry
        return (i < stop) & (bad < 0)

    def body(carry):
        i, state, opt_state, _ = carry
        if batch_size is None:
            xb, yb = x, y
        else:
            idx = batch_indices(batch_key, i, n, batch_size)
            xb, yb = x[idx], y[idx]
        losses, grads = jax.vmap(jax.value_and_grad(net_loss), in_axes=(0, None, None))(
            state, xb, yb
        )
        updates, new_opt = jax.vmap(tx.update)(grads, opt_state, state)
        updates = jax.tree_util.tree_map(lambda u, f: -eta * f * u, updates, factors)
        new_state = jax.tree_util.tree_map(lambda p, u: p + u, state, updates)
        finite = jnp.all(jnp.isfinite(losses))
        keep = partial(jax.tree_util.tree_map, lambda new, old: jnp.where(finite, new, old))
        bad = jnp.where(finite, -1, i)
        return i + 1, keep(new_state, state), keep(new_opt, opt_state), bad

    init = (jnp.asarray(start), state, opt_state, jnp.asarray(-1))
    _, state, opt_state, bad = jax.lax.while_loop(cond, body, init)
    return state, opt_state, bad


@partial(jax.jit, static_argnames=("forward", "loss_kind"))
def _observe(state, x, y, x_test, *, forward, loss_kind):
    loss_one = _loss_fn(loss_kind)

    def one(s):
        out = forward(s, x)
        return loss_one(out, y), out, None if x_test is None else forward(s, x_test)

    return jax.vmap(one)(state)


def train(
    arch: MLP,
    x,
    y,
    *,
    steps: int,
    learning_rate: float,
    optimizer: str = "gd",
    loss: str = "mse",
    n_networks: int = 1,
    key: jax.Array,
    record_steps=None,
    batch_size: int | None = None,
    x_test=None,
    dtype=None,
    progress: bool = False,
    record_kernels: bool = True,
) -> Training:
    """Train ``n_networks`` networks of ``arch`` on ``(x, y)`` in parallel, recording kernels.

    Args:
      arch: the :class:`~rgnn.MLP` (any parameterization, ``"mup"`` included), or any
        architecture :func:`rgnn.models.as_model` takes (a neural-tangents stax triple, a
        flax nnx module or a :class:`rgnn.models.Model`): its networks are drawn by its own
        ``init`` and trained with one learning rate for every parameter; the recorded kernels
        are then the output layer's only, ``[T, M, 1, N, N]``.
      x: ``[N, n_0]`` training inputs.
      y: ``[N, out_dim]`` (or ``[N]`` when ``out_dim == 1``) targets for ``"mse"``; ``[N]``
        integer labels in ``0..out_dim-1`` for ``"cross_entropy"``.
      steps: number of optimizer steps (>= 1).
      learning_rate: ``eta`` (> 0), multiplied per group by the parameterization's factors.
      optimizer: ``"gd"`` (full batch), ``"sgd"`` (minibatches) or ``"adam"``.
      loss: ``"mse"`` or ``"cross_entropy"`` (module docstring).
      n_networks: ensemble size ``M``.
      key: a ``jax.random`` key: the ensemble is ``rgnn.ensemble(..., key=fold_in(key, 0))``,
        the minibatches use ``fold_in(key, 1)``.
      record_steps: the steps to record (0 is always added); default 0, ``steps`` and up to 9
        log-spaced steps between.
      batch_size: minibatch size for ``"sgd"`` (default ``min(32, N)``) and optionally
        ``"adam"``; must be ``None`` (or ``N``) for ``"gd"``.
      x_test: optional ``[N*, n_0]`` inputs whose outputs are recorded too.
      dtype: parameter and computation dtype (default: that of ``x``).
      progress: print one line per recorded step to stderr.
      record_kernels: record the per-layer kernels (``False`` leaves ``nngp`` and ``ntk``
        ``None``: cheaper, but :func:`rgnn.compare` needs them).

    Returns:
      A :class:`Training`.

    Example:
      >>> import jax, rgnn
      >>> x, y = rgnn.data.teacher_student(16, 4)
      >>> run = rgnn.train(rgnn.MLP(2, 64), x, y, steps=20, learning_rate=0.5, n_networks=4,
      ...                  key=jax.random.key(0))
      >>> run.ntk.shape
      (10, 4, 3, 16, 16)
    """
    if not isinstance(arch, MLP):
        from rgnn.models import as_model

        arch = as_model(arch)
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer: expected one of {OPTIMIZERS}, got {optimizer!r}")
    if loss not in LOSSES:
        raise ValueError(f"loss: expected one of {LOSSES}, got {loss!r}")
    steps = _check_int("steps", steps, 1)
    n_networks = _check_int("n_networks", n_networks, 1)
    eta = check_learning_rate(learning_rate)
    x, x_test = check_pair(x, x_test, ("x", "x_test"))
    if dtype is not None:
        if not jnp.issubdtype(jnp.dtype(dtype), jnp.floating):
            raise ValueError(f"dtype: expected a floating dtype, got {dtype!r}")
        x = x.astype(dtype)
        x_test = None if x_test is None else x_test.astype(dtype)
    dtype = x.dtype
    n, in_dim = x.shape
    out_dim = None
    if not isinstance(arch, MLP):
        # one draw first: a model that cannot run on x fails here with a one-line error
        ensemble(arch, in_dim, n_networks=1, key=jax.random.key(0), dtype=dtype)
        out_dim = arch.output_dim(x)
    targets = _check_targets(y, n, arch, loss, dtype, out_dim)
    if batch_size is not None:
        batch_size = _check_int("batch_size", batch_size, 1, n)
    if optimizer == "sgd" and batch_size is None:
        batch_size = min(32, n)
    if optimizer == "gd" and batch_size not in (None, n):
        raise ValueError(f"batch_size: expected None for full-batch 'gd', got {batch_size!r}")
    if batch_size == n and optimizer != "sgd":
        batch_size = None
    records = _check_record_steps(record_steps, steps)

    ens0 = ensemble(
        arch, in_dim, n_networks=n_networks, key=jax.random.fold_in(key, 0), dtype=dtype
    )
    batch_key = jax.random.fold_in(key, 1)
    graphdef, forward = ens0.graphdef, _forward_of(ens0)
    one_state = jax.tree_util.tree_map(lambda a: a[0], ens0.state)
    factors = _factor_tree(arch, in_dim, one_state, optimizer)
    static = dict(forward=forward, loss_kind=loss, optimizer=optimizer, batch_size=batch_size)
    eta_arr = jnp.asarray(eta, dtype)

    def advance(state, opt_state, start, stop):
        return _advance(
            state, opt_state, x, targets, factors, eta_arr, batch_key, start, stop, **static
        )

    def observe(state):
        return _observe(state, x, targets, x_test, forward=forward, loss_kind=loss)

    state, opt_state = ens0.state, _opt_init(ens0.state, optimizer=optimizer)
    rec = dict(loss=[], outputs=[], test_outputs=[], nngp=[], ntk=[])
    done, last, diverged = [], 0, -1
    for r in records:
        if r > last:
            state, opt_state, bad = advance(state, opt_state, last, int(r))
            bad = int(bad)
            if bad >= 0:
                diverged = bad
                break
            last = int(r)
        ens = Ensemble(state, graphdef, arch, in_dim)
        lo, out, test = observe(state)
        if not bool(jnp.all(jnp.isfinite(lo))):  # diverged exactly at a recorded step
            diverged = int(r)
            break
        nngp, ntk = ensemble_kernels(ens, x) if record_kernels else (None, None)
        for name, value in zip(rec, (lo, out, test, nngp, ntk), strict=True):
            rec[name].append(value)
        done.append(int(r))
        final = ens
        if progress:
            print(
                f"step {int(r)}/{steps}  loss {float(jnp.mean(lo)):.4g} (mean of {n_networks})",
                file=sys.stderr,
                flush=True,
            )
    if not done:
        raise ValueError(
            "x: the loss at initialization is not finite (inputs or targets too large for "
            f"dtype {dtype}?)"
        )
    if diverged >= 0:
        warnings.warn(
            f"training diverged at step {diverged}: the loss became NaN or inf with "
            f"learning_rate={eta} ({optimizer}, {arch.parameterization} parameterization); "
            f"returning the {len(done)} recorded steps before it",
            RuntimeWarning,
            stacklevel=2,
        )
    return Training(
        steps=jnp.asarray(done, jnp.int32),
        loss=jnp.stack(rec["loss"]),
        outputs=jnp.stack(rec["outputs"]),
        test_outputs=None if x_test is None else jnp.stack(rec["test_outputs"]),
        nngp=jnp.stack(rec["nngp"]) if record_kernels else None,
        ntk=jnp.stack(rec["ntk"]) if record_kernels else None,
        targets=targets,
        test_inputs=x_test,
        initial=ens0,
        final=final,
        batch_key=batch_key,
        learning_rate=eta,
        optimizer=optimizer,
        loss_kind=loss,
        batch_size=batch_size,
        diverged_at=diverged,
    )
