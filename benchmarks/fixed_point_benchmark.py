"""Fixed-point kernels: rgnn's native recursion vs neural-tangents, jitted and warmed.

(a) the output layer's NNGP + NTK: native (all layers, one jitted pass) vs one jitted
    neural-tangents kernel_fn of the whole network;
(b) every layer's NNGP + NTK: native (the same single pass) vs neural-tangents, which needs
    one kernel_fn per prefix of the network (L + 1 of them).

Ratios are neural-tangents time / native time, measured in the same run (> 1: native faster).
Uses only the public API. Results go to benchmarks/results/fixed_point.json.

    python benchmarks/fixed_point_benchmark.py [--n 2000] [--dim 64] [--depth 10] [--repeats 5]
"""

import argparse
import json
import platform
import warnings
from pathlib import Path

import jax
import numpy as np
from _timing import timed

import rgnn


def _run_case(arch, x, repeats):
    """Time and check one architecture; returns the case's entry for the results JSON."""
    native = jax.jit(lambda a: rgnn.fixed_point(arch, a))
    t_native, _ = timed(lambda: native(x), repeats)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = jax.jit(lambda a: arch.stax()[2](a, None, ("nngp", "ntk")))
        t_nt_out, _ = timed(lambda: full(x), repeats)
        prefixes = [
            jax.jit(lambda a, l=l: arch.stax(layer=l)[2](a, None, ("nngp", "ntk")))
            for l in range(1, arch.n_layers + 1)
        ]
        t_nt_all, _ = timed(lambda: [p(x) for p in prefixes], repeats)
    # accuracy of both against a float64 native reference
    with jax.enable_x64(True):
        ref = np.asarray(rgnn.fixed_point(arch, x.astype(np.float64)).ntk[-1])

    def rel_err(k):
        return float(np.max(np.abs(np.asarray(k, np.float64) - ref)) / np.max(np.abs(ref)))

    err_native, err_nt = rel_err(native(x).ntk[-1]), rel_err(full(x).ntk)
    return dict(
        activation=arch.activation,
        native_all_layers_s=t_native,
        nt_output_layer_s=t_nt_out,
        nt_all_layers_s=t_nt_all,
        ratio_output_layer=t_nt_out / t_native,
        ratio_all_layers=t_nt_all / t_native,
        goal_all_layers=arch.depth / 2,
        native_max_rel_err_vs_float64=err_native,
        nt_max_rel_err_vs_float64=err_nt,
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--depth", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--x64", action="store_true", help="float64 (default: float32)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    jax.config.update("jax_enable_x64", args.x64)
    x = (
        np.random.RandomState(0)
        .randn(args.n, args.dim)
        .astype(np.float64 if args.x64 else np.float32)
    )
    results = dict(
        n=args.n,
        dim=args.dim,
        depth=args.depth,
        repeats=args.repeats,
        dtype=str(x.dtype),
        device=str(jax.devices()[0]),
        platform=platform.platform(),
        cases=[],
    )
    for activation, cw in (("relu", 2.0), ("gelu", 1.8)):
        arch = rgnn.MLP(args.depth, 512, activation, weight_var=cw, bias_var=0.05)
        case = _run_case(arch, x, args.repeats)
        results["cases"].append(case)
        print(
            f"{activation:5s} N={args.n} depth={args.depth} {x.dtype}: "
            f"native {case['native_all_layers_s'] * 1e3:8.1f} ms | "
            f"(a) NT output layer {case['nt_output_layer_s'] * 1e3:8.1f} ms, "
            f"ratio {case['ratio_output_layer']:5.2f} | "
            f"(b) NT all layers {case['nt_all_layers_s'] * 1e3:8.1f} ms, "
            f"ratio {case['ratio_all_layers']:5.2f} "
            f"(goal >= {arch.depth / 2:g}) | output NTK error vs float64: "
            f"native {case['native_max_rel_err_vs_float64']:.1e}, "
            f"NT {case['nt_max_rel_err_vs_float64']:.1e}",
            flush=True,
        )
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "fixed_point.json"
    path.write_text(json.dumps(results, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
