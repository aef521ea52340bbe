"""Scale-out: ensembles and kernels sharded over devices, and kernels larger than memory in tiles.

Two axes parallelize without communication, because every entry they index is computed
independently of the others:

* **the network axis** of an :class:`~rgnn.Ensemble` (``M`` networks, parameters ``[M, ...]``):
  each device holds ``M / D`` networks and computes their per-layer empirical kernels;
* **the input axis** of a kernel: ``K^{(l)}_{ab}`` depends only on ``x_a`` and ``x_b`` (at
  infinite width, and per network at finite width), so each device computes a block of rows
  ``a`` against all columns ``b``.

Both use a one-dimensional :class:`jax.sharding.Mesh` over the devices and
:class:`jax.sharding.NamedSharding` (``PartitionSpec(axis)`` on the sharded axis,
``PartitionSpec()`` = replicated) with :func:`jax.shard_map`: every device runs the same
single-device code on its block, so results equal the single-device ones up to floating-point
roundoff. An axis whose length is not a multiple of the device count is padded (with copies of
its first entry) and the padding is dropped from the result.

**Tiles.** A kernel too large for device memory (``[L+1, N, N]`` grows as ``N^2``) is computed
in ``tile x tile`` blocks, each moved to host memory (a NumPy array, or a ``numpy.memmap`` on
disk passed as ``out``) before the next is computed; with ``x2 = None`` only the blocks on and
above the diagonal are computed and the rest is filled by symmetry. Tiles and sharding compose:
each tile is itself computed across all devices.

**Several hosts.** The same program runs on one host or several; only the launch differs.
Start one process per host (or per group of devices) and call :func:`jax.distributed.initialize`
in each before any other JAX call: with explicit arguments
(``coordinator_address="host0:1234", num_processes=P, process_id=i``) or with none on SLURM,
Open MPI and Cloud TPU, where it reads them from the launcher. On CPU hosts the processes
exchange blocks through CPU collectives (gloo over TCP, JAX's default;
``jax.config.update("jax_cpu_collectives_implementation", "gloo")`` on versions where it is
not). ``jax.devices()`` then lists the devices of *all* processes and :func:`device_mesh` spans
them; ``jax.local_devices()`` are this process's. Every process passes the same inputs and the
same ``key``, so every process builds the same ensemble and the functions here place each
network on the device that owns it; a sharded result is a global array whose blocks live on
their processes, and :func:`gather` gives every process the whole of it as NumPy (``numpy.asarray``
on one host). Tiled kernels need nothing more: each tile is computed across every process's
devices and gathered to every process, which fills its own ``out``. ``tests/test_multihost.py``
runs this with two processes on one machine and checks every result against one process.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from rgnn._validate import check_pair
from rgnn.architecture import MLP
from rgnn.empirical import empirical_nngp, empirical_ntk
from rgnn.fixed_point import FixedPoint, fixed_point
from rgnn.networks import Ensemble

__all__ = [
    "AXIS",
    "device_mesh",
    "map_networks",
    "shard_ensemble",
    "sharded_empirical",
    "sharded_fixed_point",
    "tiled_kernel",
    "tiled_fixed_point",
    "tiled_empirical",
    "gather",
]

AXIS = "shard"
"""The name of the single mesh axis."""

KINDS = ("nngp", "ntk")


def device_mesh(devices=None, *, axis: str = AXIS) -> Mesh:
    """A one-dimensional mesh over ``devices`` (default: ``jax.devices()``, every device of
    every host once :func:`jax.distributed.initialize` has run)."""
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("devices: expected at least one device, got none")
    return Mesh(np.asarray(devices), (axis,))


def _mesh(mesh) -> Mesh:
    if mesh is None:
        return device_mesh()
    if not isinstance(mesh, Mesh) or len(mesh.axis_names) != 1:
        raise ValueError(f"mesh: expected a one-axis jax.sharding.Mesh, got {mesh!r}")
    return mesh


def _pad_rows(a, multiple: int):
    pad = (-a.shape[0]) % multiple
    if pad == 0:
        return a
    return jnp.concatenate([a, jnp.broadcast_to(a[:1], (pad, *a.shape[1:]))], axis=0)


def _check_ensemble(ens):
    if not isinstance(ens, Ensemble):
        raise ValueError(f"ens: expected an rgnn.Ensemble, got {type(ens).__name__}")


def shard_ensemble(ens: Ensemble, mesh: Mesh | None = None) -> Ensemble:
    """Place ``ens``'s parameters with the network axis split over ``mesh``'s devices.

    This is placement only (each device stores ``M / D`` networks); :func:`map_networks`
    computes on such an ensemble with each device working on its own networks. A jitted
    computation that takes the placed ensemble directly is partitioned by XLA's sharding
    propagation, which may choose to gather. ``n_networks`` must be a multiple of the number
    of devices (``ValueError`` otherwise).
    """
    _check_ensemble(ens)
    mesh = _mesh(mesh)
    if ens.n_networks % mesh.size:
        raise ValueError(
            f"ens: expected a number of networks divisible by the {mesh.size} devices, "
            f"got {ens.n_networks}"
        )
    sharding = NamedSharding(mesh, P(mesh.axis_names[0]))
    return Ensemble(jax.device_put(ens.state, sharding), ens.graphdef, ens.arch, ens.in_dim)


@functools.lru_cache(maxsize=64)
def _network_map(fn, graphdef, arch, in_dim, mesh, n_args):
    axis = mesh.axis_names[0]

    def block(state, *args):
        return fn(Ensemble(state, graphdef, arch, in_dim), *args)

    specs = (P(axis),) + (P(),) * n_args
    # check_vma=False: each block is independent (no collectives); the model path's VJPs
    # (rgnn.models.ntk_jvp) would otherwise trip over the varying-axis types of shard_map
    return jax.jit(
        jax.shard_map(block, mesh=mesh, in_specs=specs, out_specs=P(axis), check_vma=False)
    )


def map_networks(fn, ens: Ensemble, *args, mesh: Mesh | None = None):
    """``fn(ens, *args)`` with the network axis split over ``mesh``'s devices.

    ``fn`` takes an :class:`~rgnn.Ensemble` (a block of ``M / D`` networks on one device) and
    replicated array arguments, and returns a pytree of arrays whose leading axis is the
    network axis (a vmapped per-network computation: empirical kernels, training). Each device
    runs ``fn`` on its own networks, with no communication; the outputs stay split over the
    devices along the network axis. ``M`` need not divide evenly: the ensemble is padded with
    copies of its first network and the padding dropped from the result. ``fn`` should be a
    module-level function or otherwise reused object: the compiled program is cached on it.
    """
    _check_ensemble(ens)
    mesh = _mesh(mesh)
    m = ens.n_networks
    state = jax.tree_util.tree_map(lambda a: _pad_rows(a, mesh.size), ens.state)
    state = jax.device_put(state, NamedSharding(mesh, P(mesh.axis_names[0])))
    args = [jax.device_put(a, NamedSharding(mesh, P())) for a in args]
    run = _network_map(fn, ens.graphdef, ens.arch, ens.in_dim, mesh, len(args))
    out = run(state, *args)
    if jax.tree_util.tree_leaves(state)[0].shape[0] == m:
        return out
    return jax.tree_util.tree_map(lambda a: a[:m], out)


def _nngp_block(ens, x):
    return empirical_nngp(ens, x)


def _ntk_block(ens, x):
    return empirical_ntk(ens, x)


def sharded_empirical(ens: Ensemble, x, *, kind: str = "nngp", mesh: Mesh | None = None):
    """Per-layer empirical NNGP (stochastic metric) or NTK of every network of ``ens``, the
    network axis split over ``mesh``'s devices (:func:`map_networks`).

    Returns:
      ``[M, L+1, N, N]``, equal to :func:`rgnn.empirical_nngp` / :func:`rgnn.empirical_ntk`
      on one device.
    """
    _check_ensemble(ens)
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
    x, _ = check_pair(x, None, ("x", "x2"))
    if x.shape[1] != ens.in_dim:
        raise ValueError(f"x: expected {ens.in_dim} features, got {x.shape[1]}")
    return map_networks(_nngp_block if kind == "nngp" else _ntk_block, ens, x, mesh=mesh)


@functools.lru_cache(maxsize=64)
def _fixed_point_fn(arch, mesh, order, rule):
    axis = mesh.axis_names[0]

    def block(x1, x2):
        fp = fixed_point(arch, x1, x2, quadrature_order=order, quadrature_rule=rule)
        return fp.nngp, fp.ntk, fp.nngp_diag1, fp.nngp_diag2

    specs = (P(None, axis), P(None, axis), P(None, axis), P())
    return jax.jit(
        jax.shard_map(block, mesh=mesh, in_specs=(P(axis), P()), out_specs=specs, check_vma=False)
    )


def sharded_fixed_point(
    arch: MLP,
    x1,
    x2=None,
    *,
    mesh: Mesh | None = None,
    quadrature_order: int = 96,
    quadrature_rule: str = "trapezoid",
) -> FixedPoint:
    """:func:`rgnn.fixed_point` (native backend) with the rows of the kernel (inputs ``x1``)
    split over ``mesh``'s devices; ``x2`` (default ``x1``) is replicated.

    Returns:
      A :class:`~rgnn.FixedPoint` equal to the single-device one, ``nngp``/``ntk`` sharded
      along their input axis 1.
    """
    if not isinstance(arch, MLP):
        raise ValueError(f"arch: expected an rgnn.MLP, got {type(arch).__name__}")
    mesh = _mesh(mesh)
    x1, x2 = check_pair(x1, x2)
    x2 = x1 if x2 is None else x2
    n1 = x1.shape[0]
    fn = _fixed_point_fn(arch, mesh, quadrature_order, quadrature_rule)
    axis = mesh.axis_names[0]
    xs = jax.device_put(_pad_rows(x1, mesh.size), NamedSharding(mesh, P(axis)))
    nngp, ntk, d1, d2 = fn(xs, jax.device_put(x2, NamedSharding(mesh, P())))
    if nngp.shape[1] != n1:
        nngp, ntk, d1 = nngp[:, :n1], ntk[:, :n1], d1[:, :n1]
    order = 0 if arch.act.closed_form else quadrature_order
    return FixedPoint(nngp, ntk, d1, d2, backend="native", quadrature_order=order)


def gather(tree):
    """Every array of ``tree`` as one NumPy array on this host, whichever hosts hold its blocks.

    An array whose blocks all live on this process's devices is copied to host memory
    (``numpy.asarray``); one split over the devices of several processes (after
    :func:`jax.distributed.initialize`) is all-gathered, so every process receives the whole
    array (:func:`jax.experimental.multihost_utils.process_allgather`). Every process must call
    it, in the same order, on arrays of the same global shape. On one host it is
    ``numpy.asarray``, so code written with it runs unchanged on one host or several.
    """

    def one(a):
        if isinstance(a, jax.Array) and not a.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(a, tiled=True))
        return np.asarray(a)

    return jax.tree_util.tree_map(one, tree)


# ----------------------------------------------------------------------------- tiles
def tiled_kernel(fn, x1, x2=None, *, tile: int, out=None) -> np.ndarray:
    """Assemble a kernel ``[..., N1, N2]`` from ``tile x tile`` blocks ``fn(x1_block, x2_block)``.

    ``fn(a, b)`` must return ``[..., len(a), len(b)]`` whose entry ``[..., i, j]`` depends only
    on ``a[i]`` and ``b[j]`` (true of every kernel here). Every block is computed at the full
    tile size (the last one padded), so ``fn`` compiles once; each block is copied to host
    memory before the next is computed, so device memory holds one tile (a block split over
    several hosts' devices is gathered to every host: :func:`gather`). With ``x2 = None``
    the kernel is taken to be symmetric in its last two axes and only blocks on or above the
    diagonal are computed.

    Args:
      fn: the block function.
      x1, x2: ``[N1, n_0]``, ``[N2, n_0]`` inputs (``x2 = None``: ``x1``).
      tile: rows and columns per block (``>= 1``).
      out: optional preallocated array of the result's shape (for instance a ``numpy.memmap``,
        for kernels larger than host memory); a new NumPy array otherwise.

    Returns:
      ``out``, filled.
    """
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 1:
        raise ValueError(f"tile: expected an integer >= 1, got {tile!r}")
    x1, x2 = check_pair(x1, x2)
    symmetric = x2 is None
    x2 = x1 if symmetric else x2
    n1, n2 = x1.shape[0], x2.shape[0]
    t1, t2 = min(tile, n1), min(tile, n2)
    starts1, starts2 = range(0, n1, t1), range(0, n2, t2)

    def block(x, start, t):
        rows = x[start : start + t]
        return _pad_rows(rows, t) if rows.shape[0] < t else rows

    for i in starts1:
        a = block(x1, i, t1)
        for j in starts2:
            if symmetric and j < i:
                continue
            kb = gather(fn(a, block(x2, j, t2)))
            if out is None:
                out = np.empty((*kb.shape[:-2], n1, n2), kb.dtype)
            elif out.shape[-2:] != (n1, n2) or out.shape[:-2] != kb.shape[:-2]:
                raise ValueError(
                    f"out: expected shape {(*kb.shape[:-2], n1, n2)}, got {tuple(out.shape)}"
                )
            r, c = min(t1, n1 - i), min(t2, n2 - j)
            out[..., i : i + r, j : j + c] = kb[..., :r, :c]
            if symmetric and j > i:
                out[..., j : j + c, i : i + r] = np.swapaxes(kb[..., :r, :c], -1, -2)
    return out


def tiled_fixed_point(
    arch: MLP, x1, x2=None, *, tile: int, kind: str = "nngp", mesh: Mesh | None = None, out=None
) -> np.ndarray:
    """The fixed point's per-layer ``kind`` kernel (``"nngp"`` or ``"ntk"``) ``[L+1, N1, N2]``
    in tiles (:func:`tiled_kernel`); each tile sharded over ``mesh`` when one is given."""
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
    if not isinstance(arch, MLP):
        raise ValueError(f"arch: expected an rgnn.MLP, got {type(arch).__name__}")

    def fn(a, b):
        fp = fixed_point(arch, a, b) if mesh is None else sharded_fixed_point(arch, a, b, mesh=mesh)
        return getattr(fp, kind)

    return tiled_kernel(fn, x1, x2, tile=tile, out=out)


def tiled_empirical(
    ens: Ensemble, x1, x2=None, *, tile: int, kind: str = "nngp", out=None
) -> np.ndarray:
    """Every network's per-layer empirical ``kind`` kernel ``[M, L+1, N1, N2]`` in tiles
    (:func:`tiled_kernel`). A sharded ensemble (:func:`shard_ensemble`) computes each tile
    across its devices."""
    _check_ensemble(ens)
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
    f = empirical_nngp if kind == "nngp" else empirical_ntk
    return tiled_kernel(lambda a, b: f(ens, a, b), x1, x2, tile=tile, out=out)
