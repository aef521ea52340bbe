"""The ``rgnn`` command line.

Every subcommand takes ``--out DIR`` and ``--json``, exits non-zero with a one-line error on bad
arguments, and exits 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

__all__ = ["main"]


class _Fail(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _add_common(p):
    p.add_argument("--out", type=Path, default=Path("rgnn-out"), help="output directory")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")


def _fixed_point_parser(sub):
    p = sub.add_parser(
        "fixed-point",
        help="per-layer infinite-width NNGP/NTK of an MLP on built-in data",
        description="Per-layer infinite-width NNGP and NTK kernels (the Gaussian fixed point) "
        "of an MLP on the built-in digits data: a table of how the kernel flows with depth and "
        "a PNG heat map.",
    )
    p.add_argument("--activation", default="relu")
    p.add_argument("--depth", type=_positive_int, default=10, help="hidden layers L")
    p.add_argument("--width", type=_positive_int, default=512)
    p.add_argument("--weight-var", type=float, default=2.0, help="C_W (2.0: relu criticality)")
    p.add_argument("--bias-var", type=float, default=0.0, help="C_b")
    p.add_argument("--parameterization", default="ntk", choices=["ntk", "standard"])
    p.add_argument("--n", type=_positive_int, default=128, help="number of digits images")
    p.add_argument("--backend", default="native", choices=["native", "neural_tangents"])
    _add_common(p)
    p.set_defaults(run=_run_fixed_point)


def _layer_table(fp, labels):
    import numpy as np

    same = labels[:, None] == labels[None, :]
    off = ~np.eye(len(labels), dtype=bool)
    rows = []
    for layer in range(fp.n_layers):
        k, t = np.asarray(fp.nngp[layer]), np.asarray(fp.ntk[layer])
        dk, dt = np.sqrt(np.diagonal(k)), np.sqrt(np.diagonal(t))
        ck, ct = k / np.outer(dk, dk), t / np.outer(dt, dt)
        rows.append(
            dict(
                layer=layer + 1,
                nngp_diag=float(np.mean(np.diagonal(k))),
                nngp_corr_same_class=float(ck[same & off].mean()),
                nngp_corr_other_class=float(ck[~same].mean()),
                ntk_diag=float(np.mean(np.diagonal(t))),
                ntk_corr_same_class=float(ct[same & off].mean()),
                ntk_corr_other_class=float(ct[~same].mean()),
            )
        )
    return rows


def _print_table(rows, stream=sys.stdout):
    head = (
        "layer",
        "K_aa",
        "corr K same",
        "corr K other",
        "Theta_aa",
        "corr Th same",
        "corr Th other",
    )
    print("  ".join(f"{h:>13}" for h in head), file=stream)
    for r in rows:
        vals = list(r.values())
        print(f"{vals[0]:>13d}" + "".join(f"  {v:13.6g}" for v in vals[1:]), file=stream)


def _run_fixed_point(args):
    import jax

    import rgnn
    from rgnn import data, plotting

    with jax.enable_x64(True):
        try:
            arch = rgnn.MLP(
                args.depth,
                args.width,
                args.activation,
                weight_var=args.weight_var,
                bias_var=args.bias_var,
                parameterization=args.parameterization,
            )
        except ValueError as err:
            raise _Fail(str(err)) from None
        x, y = data.digits(args.n)
        start = time.perf_counter()
        fp = rgnn.fixed_point(arch, x, backend=args.backend)
        fp.ntk.block_until_ready()
        seconds = time.perf_counter() - start
    rows = _layer_table(fp, y)
    args.out.mkdir(parents=True, exist_ok=True)
    png = plotting.plot_layer_kernels(
        fp,
        args.out / "fixed_point.png",
        labels=y,
        title=f"Gaussian fixed point: {arch.act.name} MLP, depth {arch.depth}, "
        f"C_W={arch.weight_var:g}, C_b={arch.bias_var:g}, {args.n} digits",
    )
    result = dict(
        architecture=dict(
            depth=arch.depth,
            width=arch.width,
            activation=arch.act.name,
            weight_var=arch.weight_var,
            bias_var=arch.bias_var,
            parameterization=arch.parameterization,
        ),
        n_inputs=args.n,
        backend=args.backend,
        seconds=seconds,
        layers=rows,
        plot=str(png),
    )
    (args.out / "fixed_point.json").write_text(json.dumps(result, indent=2))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"Gaussian fixed point of a {arch.act.name} MLP (depth {arch.depth}, "
            f"C_W={arch.weight_var:g}, C_b={arch.bias_var:g}, {arch.parameterization} "
            f"parameterization) on {args.n} digits, {seconds:.2f} s ({args.backend} backend)"
        )
        print(
            "corr = kernel correlation K_ab / sqrt(K_aa K_bb), averaged over pairs of images "
            "of the same / of different classes"
        )
        _print_table(rows)
        print(f"wrote {png} and {args.out / 'fixed_point.json'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rgnn",
        description="The renormalization-group view of neural networks: Gaussian fixed point, "
        "perturbative flow, finite networks.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _fixed_point_parser(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.run(args)
    except _Fail as err:
        print(f"rgnn {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"rgnn {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
