"""Two processes joined by ``jax.distributed`` (CPU collectives over TCP) shard an ensemble and
tiled kernels across both processes' devices and reproduce the single-process numbers.

The children run the code a user runs on several machines: ``jax.distributed.initialize``, then
``rgnn.sharding`` unchanged. Each process has two CPU devices, so the mesh has four devices over
two processes: a 6-network ensemble (the first 6 networks of an 8-network one) and the 13-row
kernel are padded to multiples of 4, and the 5 x 5 tiles to 8 rows.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import rgnn
from rgnn import sharding
from tests.tolerances import EXACT, tol

ROOT = Path(__file__).resolve().parents[1]
N_PROCESSES = 2
LOCAL_DEVICES = 2
TIMEOUT_S = 180  # per attempt, both children together; a normal run takes ~20 s

# One process of the job: argv = coordinator port, process id, output prefix. Everything below
# `initialize` is what a single-process user writes; `sharding.gather` reads a result split over
# both processes on each of them.
_CHILD = textwrap.dedent(
    """
    import json, sys
    import jax
    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_num_cpu_devices", %(local)d)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    port, pid, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}", num_processes=%(n)d, process_id=pid,
        initialization_timeout=60,
    )
    import numpy as np
    import rgnn
    from rgnn import sharding

    x, _ = rgnn.data.digits(13)
    arch = rgnn.MLP(2, 16, "erf", weight_var=1.5, bias_var=0.1)
    ens8 = rgnn.ensemble(arch, x.shape[1], n_networks=8, key=jax.random.key(0))
    ens = rgnn.Ensemble(jax.tree.map(lambda a: a[:6], ens8.state), ens8.graphdef, arch, x.shape[1])
    mesh = sharding.device_mesh()
    nngp = sharding.sharded_empirical(ens, x, kind="nngp", mesh=mesh)
    ntk = sharding.sharded_empirical(ens, x, kind="ntk", mesh=mesh)
    fp = sharding.sharded_fixed_point(arch, x, mesh=mesh)
    res = dict(
        nngp=nngp, ntk=ntk, fp_nngp=fp.nngp, fp_ntk=fp.ntk,
        tiled_fp_ntk=sharding.tiled_fixed_point(arch, x, tile=5, kind="ntk", mesh=mesh),
        tiled_nngp8=sharding.tiled_empirical(sharding.shard_ensemble(ens8, mesh), x, tile=5),
    )
    procs = lambda devices: sorted({d.process_index for d in devices})
    info = dict(
        process_count=jax.process_count(), device_count=jax.device_count(),
        local_device_count=jax.local_device_count(), mesh_processes=procs(mesh.devices.flat),
        nngp_processes=procs(nngp.sharding.device_set),
        fp_ntk_processes=procs(fp.ntk.sharding.device_set),
        nngp_addressable=nngp.is_fully_addressable,
    )
    np.savez(out + ".npz", **sharding.gather(res))
    with open(out + ".json", "w") as f:
        json.dump(info, f)
    """
) % dict(local=LOCAL_DEVICES, n=N_PROCESSES)


# what the coordinator prints when its port was taken between choosing and binding it
_PORT_TAKEN = ("Failed to add port", "Failed to start RPC server", "already in use")


def _gloo_available() -> bool:
    """Whether this jaxlib can build CPU collectives over TCP (gloo). A private attribute: the
    test only uses it to decide between running and skipping."""
    from jax._src import lib

    ext = getattr(lib, "_jax", None) or getattr(lib, "xla_extension", None)
    return hasattr(ext, "make_gloo_tcp_collectives")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(base: Path) -> list[str] | None:
    """Run the two children once: their output, or None if the port was taken (failures fail)."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(
        JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    )
    procs, logs = [], []
    for pid in range(N_PROCESSES):
        log = open(f"{base}_{pid}.log", "w+")
        logs.append(log)
        cmd = [sys.executable, "-c", _CHILD, str(port), str(pid), f"{base}_{pid}"]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
    # wait for both; once one fails (or time is up) its peer would only wait for it: stop it
    deadline, timed_out = time.monotonic() + TIMEOUT_S, False
    while any(p.poll() is None for p in procs):
        if any(p.poll() not in (None, 0) for p in procs):
            break
        if time.monotonic() > deadline:
            timed_out = True
            break
        time.sleep(0.2)
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
    texts = []
    for log in logs:
        log.seek(0)
        texts.append(log.read())
        log.close()
    if timed_out or any(p.returncode != 0 for p in procs):
        if any(m in t for t in texts for m in _PORT_TAKEN):
            return None  # the port was taken between choosing and binding it: try another
        why = f"timed out after {TIMEOUT_S} s" if timed_out else "failed"
        report = "\n".join(
            f"--- process {i} (exit {p.returncode}), last output:\n{t[-3000:]}"
            for i, (p, t) in enumerate(zip(procs, texts, strict=True))
        )
        pytest.fail(f"two-process jax.distributed job {why}\n{report}", pytrace=False)
    return texts


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    if not _gloo_available():
        pytest.skip(f"jaxlib {jax.__version__} has no CPU collectives (gloo)")
    base = tmp_path_factory.mktemp("multihost") / "out"
    for _ in range(3):
        if _launch(base) is not None:
            break
    else:
        pytest.fail("no free coordinator port after 3 attempts", pytrace=False)
    out = []
    for pid in range(N_PROCESSES):
        with open(f"{base}_{pid}.json") as f:
            info = json.load(f)
        out.append((dict(np.load(f"{base}_{pid}.npz")), info))
    return out


@pytest.fixture(scope="module")
def one_process():
    """The same numbers on this process's one device, without rgnn.sharding."""
    with jax.enable_x64(True):
        x, _ = rgnn.data.digits(13)
        arch = rgnn.MLP(2, 16, "erf", weight_var=1.5, bias_var=0.1)
        ens8 = rgnn.ensemble(arch, x.shape[1], n_networks=8, key=jax.random.key(0))
        fp = rgnn.fixed_point(arch, x)
        nngp8 = np.asarray(rgnn.empirical_nngp(ens8, x))
        return {
            "nngp": nngp8[:6],
            "ntk": np.asarray(rgnn.empirical_ntk(ens8, x))[:6],
            "fp_nngp": np.asarray(fp.nngp),
            "fp_ntk": np.asarray(fp.ntk),
            "tiled_fp_ntk": np.asarray(fp.ntk),
            "tiled_nngp8": nngp8,
        }


def test_the_job_spans_both_processes(two_processes):
    for pid, (_, info) in enumerate(two_processes):
        assert info["process_count"] == N_PROCESSES, pid
        assert info["device_count"] == N_PROCESSES * LOCAL_DEVICES, pid
        assert info["local_device_count"] == LOCAL_DEVICES, pid
        # the mesh and the results' blocks live on both processes' devices
        assert info["mesh_processes"] == [0, 1], pid
        assert info["nngp_processes"] == [0, 1] and info["fp_ntk_processes"] == [0, 1], pid
        assert info["nngp_addressable"] is False, pid


def test_two_processes_equal_one_process(two_processes, one_process):
    for pid, (res, _) in enumerate(two_processes):
        assert set(res) == set(one_process), pid
        for name, want in one_process.items():
            got = res[name]
            assert got.dtype == np.float64 and got.shape == want.shape, (pid, name)
            np.testing.assert_allclose(
                got, want, **tol(EXACT, np.float64), err_msg=f"process {pid}: {name}"
            )


def test_gather_on_one_process_is_asarray(x64):
    a = jax.numpy.arange(6.0).reshape(2, 3)
    got = sharding.gather({"a": a, "b": [np.ones(2)]})
    assert isinstance(got["a"], np.ndarray) and isinstance(got["b"][0], np.ndarray)
    np.testing.assert_array_equal(got["a"], np.asarray(a))
