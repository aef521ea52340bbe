"""Fixed-point kernels: rgnn's native recursion vs neural-tangents, jitted and warmed.

(a) the output layer's NNGP + NTK: native ``fixed_point(..., layers="output")`` (the same
    recursion, the lower layers never formed as full kernels) vs one jitted neural-tangents
    kernel_fn of the whole network; the all-layers native call's ratio is reported too;
(b) every layer's NNGP + NTK: native (the same single pass) vs neural-tangents, which needs
    one kernel_fn per prefix of the network (L + 1 of them).

Ratios are neural-tangents time / native time (> 1: native faster). The goals: (a) >= 2 and
(b) >= L (the depth) in float32, (a) and (b) >= 1 in float64. Every timed function runs once
to compile, then the repetitions go round-robin over all of them (native, NT output, NT
prefixes, and the bandwidth reference below), so that they share the machine's load; the
minimum over the repetitions is reported (the median too, in the JSON), with the load
average before and after each case. The first and second calls of ``rgnn.fixed_point`` (not
jitted by the caller, as a user calls it) are timed in a fresh state of its cache.

Memory bandwidth: the result, ``2 (L+1) N^2`` numbers, must be written at least once; a
jitted ``a * b + c`` over ``N x N`` arrays (3 read, 1 written) measures the bandwidth a plain
elementwise pass reaches in the same run. Reported: that bandwidth, the native pass's
"achieved" bandwidth (the result's bytes over its time) and the native time over the time of
writing the result at the reference bandwidth (1 would be the floor).

Accuracy: the output NTK and NNGP of each float32 result against rgnn's float64 result
(largest difference relative to the largest entry), and in float64 rgnn against
neural-tangents. Uses only the public API. Results go to benchmarks/results/fixed_point.json.

    python benchmarks/fixed_point_benchmark.py [--n 2000] [--dim 64] [--depth 10] [--repeats 7]
        [--dtypes float32,float64] [--activations relu,gelu]
"""

import argparse
import json
import os
import platform
import statistics
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import rgnn


def _once(fn):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def _interleaved(fns: dict, repeats: int) -> dict:
    """``{name: (min, median)}`` seconds of each ``fns[name]()``, compiled and warmed first,
    then ``repeats`` round-robin rounds over all of them."""
    for fn in fns.values():
        jax.block_until_ready(fn())
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(_once(fn))
    return {name: (min(t), statistics.median(t)) for name, t in times.items()}


def _rel(a, ref) -> float:
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(a - ref)) / np.max(np.abs(ref)))


def _run_case(arch, x, repeats):
    """Time and check one architecture on inputs ``x``; the case's entry for the JSON."""
    n, itemsize = x.shape[0], x.dtype.itemsize
    load_before = os.getloadavg()[0]
    xj = jnp.asarray(x)
    first = _once(lambda: rgnn.fixed_point(arch, xj))
    second = _once(lambda: rgnn.fixed_point(arch, xj))
    native = jax.jit(lambda a: rgnn.fixed_point(arch, a))
    native_out = jax.jit(lambda a: rgnn.fixed_point(arch, a, layers="output"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = jax.jit(lambda a: arch.stax()[2](a, None, ("nngp", "ntk")))
        prefixes = [
            jax.jit(lambda a, l=l: arch.stax(layer=l)[2](a, None, ("nngp", "ntk")))
            for l in range(1, arch.n_layers + 1)
        ]
        nt_first = _once(lambda: full(xj))
        rng = np.random.RandomState(1)
        a, b, c = (jnp.asarray(rng.rand(n, n).astype(x.dtype)) for _ in range(3))
        fma = jax.jit(lambda a, b, c: a * b + c)
        t = _interleaved(
            {
                "native": lambda: native(xj),
                "native_output": lambda: native_out(xj),
                "nt_output": lambda: full(xj),
                "nt_prefixes": lambda: [p(xj) for p in prefixes],
                "elementwise": lambda: fma(a, b, c),
            },
            repeats,
        )
        got, nt = native(xj), full(xj)
        got_out = native_out(xj)
    load_after = os.getloadavg()[0]
    ref_bw = 4 * n * n * itemsize / t["elementwise"][0]
    result_bytes = 2 * arch.n_layers * n * n * itemsize
    case = dict(
        activation=arch.activation,
        dtype=str(x.dtype),
        load_average_before=load_before,
        load_average_after=load_after,
        native_first_call_s=first,
        native_second_call_s=second,
        nt_output_first_call_s=nt_first,
        times_min_median_s={k: list(v) for k, v in t.items()},
        native_s=t["native"][0],
        native_output_layer_s=t["native_output"][0],
        nt_output_layer_s=t["nt_output"][0],
        nt_all_layers_s=t["nt_prefixes"][0],
        ratio_output_layer=t["nt_output"][0] / t["native_output"][0],
        ratio_output_layer_from_all_layers=t["nt_output"][0] / t["native"][0],
        ratio_all_layers=t["nt_prefixes"][0] / t["native"][0],
        goal_output_layer=2.0 if x.dtype == np.float32 else 1.0,
        goal_all_layers=float(arch.depth) if x.dtype == np.float32 else 1.0,
        elementwise_bandwidth_GBps=ref_bw / 1e9,
        native_result_GB=result_bytes / 1e9,
        native_achieved_bandwidth_GBps=result_bytes / t["native"][0] / 1e9,
        native_over_write_floor=t["native"][0] / (result_bytes / ref_bw),
    )
    # the output-layer call is the last layer of the all-layers call
    case["output_call_vs_all_layers_rel"] = max(
        _rel(got_out.ntk[0], got.ntk[-1]), _rel(got_out.nngp[0], got.nngp[-1])
    )
    if x.dtype == np.float64:
        case["native_vs_nt_ntk_rel"] = _rel(got.ntk[-1], nt.ntk)
        case["native_vs_nt_nngp_rel"] = _rel(got.nngp[-1], nt.nngp)
    else:
        with jax.enable_x64(True):
            ref = rgnn.fixed_point(arch, x.astype(np.float64))
            ref_ntk, ref_nngp = np.asarray(ref.ntk[-1]), np.asarray(ref.nngp[-1])
        case["native_ntk_rel_err_vs_float64"] = _rel(got.ntk[-1], ref_ntk)
        case["native_nngp_rel_err_vs_float64"] = _rel(got.nngp[-1], ref_nngp)
        case["nt_ntk_rel_err_vs_float64"] = _rel(nt.ntk, ref_ntk)
        case["nt_nngp_rel_err_vs_float64"] = _rel(nt.nngp, ref_nngp)
    return case


def _line(case, args) -> str:
    acc = (
        f"NTK error vs float64: native {case['native_ntk_rel_err_vs_float64']:.1e}, "
        f"NT {case['nt_ntk_rel_err_vs_float64']:.1e}"
        if "native_ntk_rel_err_vs_float64" in case
        else f"native vs NT: NTK {case['native_vs_nt_ntk_rel']:.1e}"
    )
    return (
        f"{case['activation']:5s} N={args.n} depth={args.depth} {case['dtype']}: "
        f"native {case['native_s'] * 1e3:7.1f} ms (1st call {case['native_first_call_s']:.2f} s, "
        f"2nd {case['native_second_call_s'] * 1e3:.0f} ms) | (a) native output layer "
        f"{case['native_output_layer_s'] * 1e3:7.1f} ms, NT output layer "
        f"{case['nt_output_layer_s'] * 1e3:7.1f} ms, ratio {case['ratio_output_layer']:5.2f} "
        f"(goal >= {case['goal_output_layer']:g}; from the all-layers call "
        f"{case['ratio_output_layer_from_all_layers']:.2f}) | (b) NT all layers "
        f"{case['nt_all_layers_s'] * 1e3:7.1f} ms, ratio {case['ratio_all_layers']:5.2f} "
        f"(goal >= {case['goal_all_layers']:g}) | bandwidth: a*b+c "
        f"{case['elementwise_bandwidth_GBps']:.1f} GB/s, native "
        f"{case['native_achieved_bandwidth_GBps']:.1f} GB/s "
        f"({case['native_over_write_floor']:.1f}x the write floor) | {acc} | "
        f"load {case['load_average_before']:.1f}-{case['load_average_after']:.1f}"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--depth", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--dtypes", default="float32,float64")
    parser.add_argument("--activations", default="relu,gelu")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    dtypes = args.dtypes.split(",")
    if not set(dtypes) <= {"float32", "float64"}:
        parser.exit(2, f"--dtypes: expected float32 and/or float64, got {args.dtypes!r}\n")
    settings = {"relu": 2.0, "gelu": 1.8}
    activations = args.activations.split(",")
    if not set(activations) <= set(settings):
        parser.exit(2, f"--activations: expected relu and/or gelu, got {args.activations!r}\n")
    x = np.random.RandomState(0).randn(args.n, args.dim)
    results = dict(
        n=args.n,
        dim=args.dim,
        depth=args.depth,
        repeats=args.repeats,
        device=str(jax.devices()[0]),
        cpu_count=os.cpu_count(),
        platform=platform.platform(),
        jax=jax.__version__,
        cases=[],
    )
    for dtype in dtypes:
        with jax.enable_x64(dtype == "float64"):
            for activation in activations:
                arch = rgnn.MLP(
                    args.depth, 512, activation, weight_var=settings[activation], bias_var=0.05
                )
                case = _run_case(arch, x.astype(dtype), args.repeats)
                results["cases"].append(case)
                print(_line(case, args), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "fixed_point.json"
    path.write_text(json.dumps(results, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
