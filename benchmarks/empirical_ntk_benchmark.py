"""Empirical NTK: rgnn's structural NTK vs neural-tangents' ``empirical_ntk_fn``.

rgnn.empirical_ntk computes, for one network, the NTK of unit 0 of *every* layer from the
layer structure (forward-feature Gram times backward-signal Gram, summed over layers; no
Jacobian). neural-tangents' ``empirical_ntk_fn`` computes the output layer's NTK with one of
three implementations (JACOBIAN_CONTRACTION, NTK_VECTOR_PRODUCTS, STRUCTURED_DERIVATIVES). Both
run jitted and warmed on the same parameters (the NTK-parameterized nnx network's weights in
the equivalent stax network), on the same inputs, in the same run. Printed per case: the times,
the ratios NT / rgnn (> 1: rgnn faster), rgnn's achieved FLOP/s against a plain matmul's FLOP/s
measured in the same run, and the largest relative difference of the output NTKs.

rgnn's FLOP count is the work its algorithm does (matmuls only, 2 m k n each): for each top
layer l, the two forward passes, the backward signals down to layer 1, and a signal Gram and a
feature Gram per layer below. The matmul reference is an [N, n] @ [n, N] product.

Then the large case: N = 4096 inputs at width 1024, rgnn only (neural-tangents' Jacobian of
4096 outputs over ~1M parameters does not fit in memory here).

    python benchmarks/empirical_ntk_benchmark.py [--n 256] [--width 256] [--depth 2]
        [--dim 64] [--repeats 3] [--big-n 4096] [--big-width 1024] [--no-big]

Results go to benchmarks/results/empirical_ntk.json.
"""

import argparse
import json
import platform
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from _timing import timed
from flax import nnx

import rgnn


def _time(fn, repeats):
    return timed(fn, repeats)[0]


def _flops(n, dims):
    """Matmul FLOPs of rgnn's structural NTK of all layers for N = n inputs."""
    forward = sum(2 * 2 * n * a * b for a, b in zip(dims[:-1], dims[1:], strict=True))
    total = forward
    for top in range(1, len(dims)):  # top layer l = top, preactivation widths dims[1..top]
        for k in range(top, 0, -1):
            total += 2 * n * n * dims[k] + 2 * n * n * dims[k - 1]  # signal and feature Grams
            if k > 1:
                total += 2 * 2 * n * dims[k] * dims[k - 1]  # backward signals of x1 and x2
    return total


def _matmul_flops_per_s(n, width, dtype, repeats):
    a = jnp.asarray(np.random.RandomState(0).randn(n, width), dtype)
    mm = jax.jit(lambda u: u @ u.T)
    return 2 * n * n * width / _time(lambda: mm(a), repeats)


def _stax_params(net):
    """The nnx network's parameters in the stax layout [(W, b), (), (W, b), ...]."""
    params = []
    for i, layer in enumerate(net.layers):
        if i:
            params.append(())
        params.append((layer.w[...], layer.b[...]))
    return params


def _case(n, width, depth, dim, repeats, with_nt, dtype):
    nt = rgnn.import_neural_tangents()
    x = jnp.asarray(np.random.RandomState(1).randn(n, dim), dtype)
    arch = rgnn.MLP(depth, width, "relu", weight_var=2.0, bias_var=0.1)
    net = arch.network(dim, rngs=nnx.Rngs(0), dtype=dtype)
    t_rgnn = _time(lambda: rgnn.empirical_ntk(net, x), repeats)  # jitted inside
    ours = np.asarray(rgnn.empirical_ntk(net, x))[-1]
    dims = arch.layer_dims(dim)
    flops = _flops(n, dims)
    mm = _matmul_flops_per_s(n, width, dtype, repeats)
    entry = dict(
        n=n,
        width=width,
        depth=depth,
        dim=dim,
        dtype=str(jnp.dtype(dtype)),
        rgnn_s=t_rgnn,
        rgnn_layers=arch.n_layers,
        rgnn_flops=flops,
        rgnn_flops_per_s=flops / t_rgnn,
        matmul_flops_per_s=mm,
        rgnn_fraction_of_matmul=flops / t_rgnn / mm,
        neural_tangents={},
    )
    line = (
        f"N={n:5d} width={width:5d} depth={depth}: rgnn {t_rgnn:8.3f} s (all {arch.n_layers} "
        f"layers), {flops / t_rgnn / 1e9:6.1f} GFLOP/s = {flops / t_rgnn / mm:.2f} x matmul "
        f"({mm / 1e9:.1f} GFLOP/s)"
    )
    print(line, flush=True)
    if not with_nt:
        return entry
    _, apply_fn, _ = arch.stax()
    params = _stax_params(net)
    scale = np.max(np.abs(ours))
    for impl in (
        nt.NtkImplementation.JACOBIAN_CONTRACTION,
        nt.NtkImplementation.NTK_VECTOR_PRODUCTS,
        nt.NtkImplementation.STRUCTURED_DERIVATIVES,
    ):
        fn = jax.jit(nt.empirical_ntk_fn(apply_fn, trace_axes=(), implementation=impl))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                t_nt = _time(lambda fn=fn: fn(x, None, params), repeats)
            except Exception as err:  # noqa: BLE001 - out of memory etc.: report and go on
                print(f"    NT {impl.name}: failed ({type(err).__name__})", flush=True)
                entry["neural_tangents"][impl.name] = dict(error=type(err).__name__)
                continue
            theirs = np.asarray(fn(x, None, params))[:, :, 0, 0]
        diff = float(np.max(np.abs(ours - theirs)) / scale)
        entry["neural_tangents"][impl.name] = dict(seconds=t_nt, ratio=t_nt / t_rgnn, diff=diff)
        print(
            f"    NT {impl.name:22s} {t_nt:8.3f} s (output layer only)  "
            f"NT / rgnn = {t_nt / t_rgnn:6.2f}  max rel diff {diff:.1e}",
            flush=True,
        )
    return entry


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--big-n", type=int, default=4096)
    parser.add_argument("--big-width", type=int, default=1024)
    parser.add_argument("--no-big", action="store_true", help="skip the N=4096 rgnn-only case")
    parser.add_argument("--x64", action="store_true", help="float64 instead of float32")
    args = parser.parse_args()
    if args.x64:
        jax.config.update("jax_enable_x64", True)
    dtype = jnp.float64 if args.x64 else jnp.float32
    cases = [_case(args.n, args.width, args.depth, args.dim, args.repeats, True, dtype)]
    if not args.no_big:
        cases.append(_case(args.big_n, args.big_width, args.depth, args.dim, 1, False, dtype))
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    record = dict(
        device=str(jax.devices()[0]),
        platform=platform.platform(),
        jax=jax.__version__,
        cases=cases,
    )
    (out / "empirical_ntk.json").write_text(json.dumps(record, indent=2))
    print(f"wrote {out / 'empirical_ntk.json'}")


if __name__ == "__main__":
    main()
