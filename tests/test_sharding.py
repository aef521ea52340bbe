"""Sharding over 8 forced host devices (in a subprocess) equals single-device results; tiles
assemble the full kernel."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

import rgnn
from rgnn import sharding
from tests.tolerances import EXACT, tol

# Runs in a fresh interpreter with 8 CPU devices; writes every sharded result to an .npz and the
# layouts to a .json. The ensemble has 6 networks and the kernel 13 rows, so both axes are padded
# to a multiple of 8 and the padding dropped.
_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax
    import numpy as np
    jax.config.update("jax_enable_x64", True)
    import rgnn
    from rgnn import sharding

    from flax import nnx

    out, params = sys.argv[1], np.load(sys.argv[2])
    x, _ = rgnn.data.digits(16)
    arch = rgnn.MLP(2, 16, "erf", weight_var=1.5, bias_var=0.1)
    # the main process's ensemble, rebuilt from its parameters
    graphdef, shapes = nnx.split(nnx.eval_shape(lambda: arch.network(64, rngs=nnx.Rngs(0))))
    leaves = [jax.numpy.asarray(params[f"arr_{i}"]) for i in range(len(params.files))]
    ens8 = rgnn.Ensemble(jax.tree.unflatten(jax.tree.structure(shapes), leaves), graphdef, arch, 64)
    ens = rgnn.Ensemble(jax.tree.map(lambda a: a[:6], ens8.state), ens8.graphdef, arch, 64)
    mesh = sharding.device_mesh()
    res, info = {}, {"devices": jax.device_count(), "mesh": mesh.size}
    res["nngp"] = sharding.sharded_empirical(ens, x, kind="nngp", mesh=mesh)  # 6 -> 8, padded
    g8 = sharding.sharded_empirical(sharding.shard_ensemble(ens8, mesh), x, mesh=mesh)
    res["nngp8"] = g8
    info["nngp8_devices"] = len(g8.sharding.device_set)
    info["nngp8_spec"] = list(g8.sharding.spec)
    fp = sharding.sharded_fixed_point(arch, x, mesh=mesh)  # 16 rows, 2 per device
    res["fp_nngp"], res["fp_ntk"] = fp.nngp, fp.ntk
    info["fp_ntk_devices"] = len(fp.ntk.sharding.device_set)
    info["fp_ntk_spec"] = list(fp.ntk.sharding.spec)
    try:
        sharding.shard_ensemble(ens, mesh)
        info["indivisible_error"] = ""
    except ValueError as err:
        info["indivisible_error"] = str(err)
    np.savez(out + ".npz", **{k: np.asarray(v) for k, v in res.items()})
    with open(out + ".json", "w") as f:
        json.dump(info, f)
    """
)


@pytest.fixture(scope="module")
def single_device():
    """The data, architecture and 8-network ensemble, on this process's one device."""
    with jax.enable_x64(True):
        x, _ = rgnn.data.digits(16)
        arch = rgnn.MLP(2, 16, "erf", weight_var=1.5, bias_var=0.1)
        ens8 = rgnn.ensemble(arch, 64, n_networks=8, key=jax.random.key(0))
        ref = dict(
            fp=rgnn.fixed_point(arch, x),
            nngp=np.asarray(rgnn.empirical_nngp(ens8, x)),
        )
    return x, arch, ens8, ref


@pytest.fixture(scope="module")
def eight_devices(single_device, tmp_path_factory):
    base = str(tmp_path_factory.mktemp("sharding") / "out")
    params = base + "_params.npz"
    np.savez(params, *[np.asarray(a) for a in jax.tree.leaves(single_device[2].state)])
    flags = "--xla_force_host_platform_device_count=8"
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT, base, params],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(base + ".json") as f:
        info = json.load(f)
    return dict(np.load(base + ".npz")), info


def test_main_process_keeps_one_device():
    assert jax.device_count() == 1


def test_sharded_results_equal_single_device(eight_devices, single_device, x64):
    res, info = eight_devices
    assert info["devices"] == 8 and info["mesh"] == 8
    *_, ref = single_device
    single = {
        "nngp": ref["nngp"][:6],
        "nngp8": ref["nngp"],
        "fp_nngp": ref["fp"].nngp,
        "fp_ntk": ref["fp"].ntk,
    }
    for name, ref in single.items():
        assert res[name].dtype == np.float64, name
        got, want = res[name], np.asarray(ref)
        np.testing.assert_allclose(got, want, **tol(EXACT, np.float64), err_msg=name)


def test_sharded_layouts_span_all_devices(eight_devices):
    _, info = eight_devices
    # the network axis of the ensemble and the row axis of the kernel stay split over 8 devices
    assert info["nngp8_devices"] == 8 and info["nngp8_spec"] == ["shard"]
    assert info["fp_ntk_devices"] == 8 and info["fp_ntk_spec"] == [None, "shard"]
    assert "divisible by the 8 devices, got 6" in info["indivisible_error"]


def test_tiles_assemble_the_full_kernel(single_device, tmp_path, x64):
    x, arch, ens8, ref = single_device
    fp = ref["fp"]
    np.testing.assert_allclose(
        sharding.tiled_fixed_point(arch, x, tile=6), fp.nngp, **tol(EXACT, np.float64)
    )
    # rectangular, into a memory-mapped file on disk
    mm = np.lib.format.open_memmap(tmp_path / "k.npy", "w+", np.float64, (3, 16, 7))
    got = sharding.tiled_fixed_point(arch, x, x[:7], tile=6, kind="ntk", out=mm)
    assert got is mm
    np.testing.assert_allclose(
        np.load(tmp_path / "k.npy"), fp.ntk[:, :, :7], **tol(EXACT, np.float64)
    )
    np.testing.assert_allclose(
        sharding.tiled_empirical(ens8, x, tile=6), ref["nngp"], **tol(EXACT, np.float64)
    )


def test_bad_arguments(x64):
    x, _ = rgnn.data.digits(4)
    arch = rgnn.MLP(1, 8)
    with pytest.raises(ValueError, match="tile: expected an integer >= 1"):
        sharding.tiled_fixed_point(arch, x, tile=0)
    with pytest.raises(ValueError, match="kind: expected one of"):
        sharding.tiled_fixed_point(arch, x, tile=2, kind="cka")
    with pytest.raises(ValueError, match="out: expected shape"):
        sharding.tiled_fixed_point(arch, x, tile=2, out=np.zeros((3, 4, 4)))
    with pytest.raises(ValueError, match="ens: expected an rgnn.Ensemble"):
        sharding.sharded_empirical(arch, x)
    with pytest.raises(ValueError, match="mesh: expected a one-axis"):
        sharding.sharded_fixed_point(arch, x, mesh="all")
