"""The ``rgnn`` command line.

Every subcommand takes ``--out DIR`` and ``--json``, exits non-zero with a one-line error on bad
arguments (an ``--out`` that names a file among them) before writing anything, writes strict
JSON (``null`` for a missing number, never ``NaN``), and exits 130 on Ctrl-C.
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


def _dumps(obj) -> str:
    from rgnn.study import strict_json

    return strict_json(obj, indent=2)


def _parsed(text, convert, ok, what: str, need: str):
    """``convert(text)`` if it parses (else ``expected {what}``) and passes ``ok`` (else
    ``expected {need}``): argparse's one-line error for a bad number."""
    try:
        value = convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"expected {need}, got {text.strip()}")
    return value


def _positive_int(text):
    return _parsed(text, int, lambda v: v >= 1, "an integer", "an integer >= 1")


BUILT_IN_DATA = ("digits", "teacher-student")
CNN_WIDTHS = (4, 8, 16, 32)


def _data_arg(text):
    """``digits``, ``teacher-student`` or a path to the user's ``FILE.npz``."""
    if text in BUILT_IN_DATA or text.endswith(".npz"):
        return text
    raise argparse.ArgumentTypeError(
        f"expected digits, teacher-student or a FILE.npz (arrays x, y, optional x_test), "
        f"got {text!r}"
    )


def _load_npz(path):
    """``(x, y, x_test)`` of the user's file, or a one-line failure."""
    from rgnn import data

    try:
        return data.load_npz(path)
    except ValueError as err:
        raise _Fail(str(err)) from None


def _npz_targets(y, loss="mse"):
    """Targets of a user's file: integer labels kept for cross-entropy, else float ``[N, C]``."""
    import numpy as np

    if loss == "cross_entropy":
        return y
    y = np.asarray(y, np.float64)
    return y[:, None] if y.ndim == 1 else y


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
    p.add_argument(
        "--data",
        type=_data_arg,
        default="digits",
        help="digits (default) or FILE.npz: its x (all rows; --n is ignored), y as labels",
    )
    p.add_argument("--backend", default="native", choices=["native", "neural_tangents"])
    _add_common(p)
    _one_line_errors(p)
    p.set_defaults(run=_run_fixed_point)


def _layer_table(fp, labels):
    import numpy as np

    same = labels[:, None] == labels[None, :]
    off = ~np.eye(len(labels), dtype=bool)

    def avg(v):
        return float(v.mean()) if v.size else float("nan")

    rows = []
    for layer in range(fp.n_layers):
        k, t = np.asarray(fp.nngp[layer]), np.asarray(fp.ntk[layer])
        dk, dt = np.sqrt(np.diagonal(k)), np.sqrt(np.diagonal(t))
        ck, ct = k / np.outer(dk, dk), t / np.outer(dt, dt)
        rows.append(
            dict(
                layer=layer + 1,
                nngp_diag=float(np.mean(np.diagonal(k))),
                nngp_corr_same_class=avg(ck[same & off]),
                nngp_corr_other_class=avg(ck[~same]),
                ntk_diag=float(np.mean(np.diagonal(t))),
                ntk_corr_same_class=avg(ct[same & off]),
                ntk_corr_other_class=avg(ct[~same]),
            )
        )
    return rows


def _print_table(rows, stream=None):
    stream = sys.stdout if stream is None else stream
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
    import numpy as np

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
        if args.data == "digits":
            if args.n > 1797:
                raise _Fail(f"n: expected at most 1797 digits, got {args.n}")
            x, y = data.digits(args.n)
            what = f"{args.n} digits"
        elif args.data.endswith(".npz"):
            x, y, _ = _load_npz(args.data)
            args.n = x.shape[0]
            what = f"{args.n} inputs of {args.data}"
            y = y if y.ndim == 1 and y.dtype.kind in "iu" else np.zeros(len(x), int)
        else:
            raise _Fail("data: the fixed point takes digits or a FILE.npz")
        start = time.perf_counter()
        try:
            fp = rgnn.fixed_point(arch, x, backend=args.backend)
        except ValueError as err:
            raise _Fail(str(err)) from None
        fp.ntk.block_until_ready()
        seconds = time.perf_counter() - start
    rows = _layer_table(fp, y)
    args.out.mkdir(parents=True, exist_ok=True)
    png = plotting.plot_layer_kernels(
        fp,
        args.out / "fixed_point.png",
        labels=y,
        title=f"Gaussian fixed point: {arch.act.name} MLP, depth {arch.depth}, "
        f"C_W={arch.weight_var:g}, C_b={arch.bias_var:g}, {what}",
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
        data=args.data,
        backend=args.backend,
        seconds=seconds,
        layers=rows,
        plot=str(png),
    )
    (args.out / "fixed_point.json").write_text(_dumps(result))
    if args.json:
        print(_dumps(result))
    else:
        print(
            f"Gaussian fixed point of a {arch.act.name} MLP (depth {arch.depth}, "
            f"C_W={arch.weight_var:g}, C_b={arch.bias_var:g}, {arch.parameterization} "
            f"parameterization) on {what}, {seconds:.2f} s ({args.backend} backend)"
        )
        print(
            "corr = kernel correlation K_ab / sqrt(K_aa K_bb), averaged over pairs of images "
            "of the same / of different classes"
        )
        _print_table(rows)
        print(f"wrote {png} and {args.out / 'fixed_point.json'}")
    return 0


# ----------------------------------------------------------------------------- sweep, classify
def _int_list(text):
    return _typed_list(text, _positive_int)


def _seed_list(text):
    return _typed_list(
        text, lambda t: _parsed(t, int, lambda v: v >= 0, "integers", "non-negative seeds")
    )


def _float_list(text):
    return _typed_list(
        text,
        lambda t: _parsed(
            t, float, lambda v: 0 < v < float("inf"), "numbers", "positive finite numbers"
        ),
    )


def _str_list(text):
    return _typed_list(text, str)


def _typed_list(text, kind):
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
    return [kind(t) for t in items]


def _one_line_errors(p):
    """Make argparse report a bad argument as one line (no usage block), exit status 2."""

    def error(message):
        p.exit(2, f"{p.prog}: error: {message} (see {p.prog} --help)\n")

    p.error = error


def _add_network_options(p, *, width):
    g = p.add_argument_group("network and training")
    g.add_argument("--depth", type=_positive_int, default=2, help="hidden layers L (default 2)")
    if width:
        g.add_argument("--width", type=_positive_int, required=True, help="hidden width")
    g.add_argument("--activation", default="relu", help="activation (default relu)")
    g.add_argument("--weight-var", type=float, default=2.0, help="C_W (default 2: relu critical)")
    g.add_argument("--bias-var", type=float, default=0.0, help="C_b (default 0)")
    g.add_argument("--parameterization", default="ntk", help="ntk, standard or mup (default ntk)")
    g.add_argument(
        "--data",
        type=_data_arg,
        default="digits",
        help="digits (default), teacher-student, or FILE.npz with arrays x [N, n_0], y [N] or "
        "[N, C] (all rows; --n is ignored)",
    )
    g.add_argument("--n", type=_positive_int, default=32, help="training inputs (default 32)")
    g.add_argument("--steps", type=int, default=200, help="training steps (default 200)")
    g.add_argument("--n-networks", type=_positive_int, default=8, help="ensemble size (8)")
    g.add_argument("--optimizer", default="gd", help="gd, sgd or adam (default gd)")
    g.add_argument("--loss", default="mse", help="training loss (default mse)")


def _sweep_parser(sub):
    p = sub.add_parser(
        "sweep",
        help="width sweep of a trained MLP family, scaling exponents and the regime",
        description="Train ensembles of an MLP family across widths and seeds, measure how far "
        "they sit from the Gaussian fixed point, fit each measure's exponent against width and "
        "say which regime the family is in. Finished points are saved as they finish in "
        "OUT/points.jsonl; rerunning the same command resumes. The default is rgnn's main "
        "job: a depth-2 ReLU MLP at criticality in NTK parameterization, 8 networks per width "
        "trained for 200 steps of full-batch gradient descent (learning rate 0.25) on 32 digits "
        "(regression onto the parity of the digit), widths 32 to 512.",
    )
    p.add_argument(
        "--widths",
        type=_int_list,
        help="comma-separated hidden widths (default 32,64,128,256,512; --arch cnn: "
        f"{','.join(map(str, CNN_WIDTHS))} channels)",
    )
    p.add_argument(
        "--arch",
        default="mlp",
        choices=["mlp", "cnn"],
        help="mlp (default) or cnn: the built-in convolutional family on the 8x8 digits "
        "(rgnn.models.cnn: --depth 3x3 relu convolutions of width channels, global average "
        "pooling, a dense readout; NTK parameterization)",
    )
    p.add_argument("--seeds", type=_seed_list, default=[0], help="ensemble seeds (default 0)")
    p.add_argument("--depths", type=_int_list, help="sweep depths too (comma-separated)")
    p.add_argument("--activations", type=_str_list, help="sweep activations too")
    p.add_argument("--parameterizations", type=_str_list, help="sweep parameterizations too")
    p.add_argument(
        "--learning-rates", type=_float_list, default=[0.25], help="learning rates (default 0.25)"
    )
    _add_network_options(p, width=False)
    p.add_argument(
        "--shortcut",
        type=float,
        help="residual shortcut weight gamma of the hidden layers 2..L (a residual MLP, "
        "PDLT appendix B; default: a plain MLP)",
    )
    p.add_argument(
        "--branch", type=float, default=1.0, help="residual branch weight xi (default 1)"
    )
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    _add_common(p)
    _one_line_errors(p)
    p.set_defaults(run=_run_sweep)


def _classify_parser(sub):
    p = sub.add_parser(
        "classify",
        help="gaussian / perturbative / non-perturbative verdict, with the evidence",
        description="Classify the sweep saved in --out DIR (by `rgnn sweep`), or, with "
        "--width, train and classify one configuration. Prints each measure, its threshold, "
        "its fitted exponent and the verdict; writes OUT/regime.json.",
    )
    p.add_argument("--tolerance", type=float, help="one threshold for every measure")
    p.add_argument(
        "--width",
        type=_positive_int,
        help="classify one configuration of this width (trained now) instead of a saved sweep",
    )
    g = p.add_argument_group("one configuration (with --width)")
    g.add_argument("--depth", type=_positive_int, default=2)
    g.add_argument("--activation", default="relu")
    g.add_argument("--weight-var", type=float, default=2.0)
    g.add_argument("--bias-var", type=float, default=0.0)
    g.add_argument("--parameterization", default="ntk")
    g.add_argument("--arch", default="mlp", choices=["mlp", "cnn"], help="mlp or cnn")
    g.add_argument(
        "--data", type=_data_arg, default="digits", help="digits, teacher-student or FILE.npz"
    )
    g.add_argument("--n", type=_positive_int, default=32)
    g.add_argument("--steps", type=int, default=200)
    g.add_argument("--n-networks", type=_positive_int, default=8)
    g.add_argument("--optimizer", default="gd")
    g.add_argument("--loss", default="mse")
    g.add_argument("--learning-rate", type=float, default=0.25)
    g.add_argument("--seed", type=int, default=0)
    _add_common(p)
    _one_line_errors(p)
    p.set_defaults(run=_run_classify)


def _task(args):
    import numpy as np

    from rgnn import data

    if args.data.endswith(".npz"):
        x, y, _ = _load_npz(args.data)
        return x, _npz_targets(y, getattr(args, "loss", "mse"))
    if args.data == "digits":
        if args.n > 1797:
            raise _Fail(f"n: expected at most 1797 digits, got {args.n}")
        x, labels = data.digits(args.n)
        y = np.where(labels % 2 == 0, 1.0, -1.0)[:, None]  # parity of the digit
    else:
        x, y = data.teacher_student(args.n)
    return x, y


def _base_arch(args, width):
    import rgnn

    if getattr(args, "arch", "mlp") == "cnn":
        if args.activation != "relu" or args.parameterization != "ntk":
            raise _Fail(
                "arch: the cnn family is relu in NTK parameterization; expected --activation "
                "relu and --parameterization ntk"
            )
        try:
            return rgnn.models.cnn(
                width, depth=args.depth, weight_var=args.weight_var, bias_var=args.bias_var
            )
        except ValueError as err:
            raise _Fail(str(err)) from None
    try:
        return rgnn.MLP(
            args.depth,
            width,
            args.activation,
            weight_var=args.weight_var,
            bias_var=args.bias_var,
            parameterization=args.parameterization,
            shortcut=getattr(args, "shortcut", None),
            branch=getattr(args, "branch", 1.0),
        )
    except ValueError as err:
        raise _Fail(str(err)) from None


def _print_sweep(result, regimes, stream=None):
    stream = sys.stdout if stream is None else stream
    from rgnn.study import GROUP_FIELDS, MEASURES

    rows = result.table()
    names = list(result.measures)
    groups = result.groups
    varying = [f for f in GROUP_FIELDS if len({g[f] for g in groups}) > 1]
    predicted = [n for n in names if any(n + "_predicted" in r for r in rows)]
    head = [*varying, "width", "seeds", "depth/width"]
    for name in names:
        head += [name] + ([f"{name} O(1/n)"] if name in predicted else [])
    table = []
    for r in rows:
        cells = [str(r[f]) for f in varying]
        cells += [str(r["width"]), str(r["n_seeds"]), f"{r['depth_over_width']:.4g}"]
        for name in names:
            if name in r:
                se = r.get(name + "_se")
                ok = se is not None and se == se
                cells.append(f"{r[name]:.3g}" + (f"+-{se:.1g}" if ok else "+-?"))
            else:
                cells.append("-")
            if name in predicted:
                pred = r.get(name + "_predicted")
                cells.append("-" if pred is None else format(pred, ".3g"))
        table.append(cells)
    sizes = [max(len(h), *(len(c[i]) for c in table)) for i, h in enumerate(head)]
    print("  ".join(f"{h:>{w}}" for h, w in zip(head, sizes, strict=True)), file=stream)
    for cells in table:
        print("  ".join(f"{c:>{w}}" for c, w in zip(cells, sizes, strict=True)), file=stream)
    notes = []
    if predicted:
        notes.append("O(1/n): the prediction of the measure beside it")
    if any("+-?" in c for cells in table for c in cells):
        notes.append("+-?: no standard error")
    if notes:
        print(f"({'; '.join(notes)})", file=stream)
    print(file=stream)
    print(
        "fits against width: v = c n^p (95% interval of p), and v(inf) from "
        "v = v_inf + b n^(slowest perturbative exponent):",
        file=stream,
    )
    for f in result.fits:
        g = ", ".join(f"{k}={v}" for k, v in f.group if k in varying)
        g = f"{g:<24} " if varying else ""
        meta = MEASURES.get(f.measure)
        fast = meta.fastest_exponent if meta else f.expected
        allowed = f"{f.expected:g}" if fast == f.expected else f"{fast:g}..{f.expected:g}"
        print(
            f"  {f.measure:<15} {g}p = {f.exponent:6.2f} +- {f.exponent_se:.2f} "
            f"[{f.exponent_low:5.2f}, {f.exponent_high:5.2f}]  perturbative {allowed:<9} "
            f"v(inf) = {f.infinite_width:.3g} +- {f.infinite_width_se:.2g}",
            file=stream,
        )
    print(file=stream)
    for reg in regimes:
        print(reg, file=stream)
        print(file=stream)


def _regimes(result, tolerance):
    from rgnn.regime import classify

    return [classify(result, group=g, tolerance=tolerance) for g in result.groups]


def _run_sweep(args):
    import jax

    import rgnn

    if args.widths is None:
        args.widths = list(CNN_WIDTHS) if args.arch == "cnn" else [32, 64, 128, 256, 512]
    base = _base_arch(args, args.widths[0])
    x, y = _task(args)
    if args.steps < 0:
        raise _Fail(f"steps: expected a non-negative integer, got {args.steps}")
    start = time.perf_counter()
    try:
        with jax.enable_x64(False):
            result = rgnn.sweep(
                base,
                x,
                y,
                widths=args.widths,
                seeds=args.seeds,
                depths=args.depths,
                activations=args.activations,
                parameterizations=args.parameterizations,
                learning_rates=args.learning_rates,
                steps=args.steps,
                n_networks=args.n_networks,
                optimizer=args.optimizer,
                loss=args.loss,
                out=args.out,
                plots=not args.no_plots,
            )
    except KeyboardInterrupt:
        points = args.out / "points.jsonl"
        done = len(points.read_text().splitlines()) if points.exists() else 0
        print(
            f"rgnn sweep: {done} finished point(s) saved in {points}; run the same command "
            "again to resume",
            file=sys.stderr,
        )
        raise
    except (ValueError, RuntimeError) as err:
        raise _Fail(str(err)) from None
    seconds = time.perf_counter() - start
    regimes = _regimes(result, None)
    _write_regimes(args.out, regimes)
    if args.json:
        doc = json.loads((args.out / "table.json").read_text())
        doc.update(
            config=result.config,
            regimes=[r.as_dict() for r in regimes],
            seconds=seconds,
            out=str(args.out),
        )
        print(_dumps(doc))
    else:
        print(
            f"width sweep: {len(result.records)} points ({len(result.groups)} group(s)) in "
            f"{seconds:.1f} s; results in {args.out}/"
        )
        _print_sweep(result, regimes)
        pngs = sorted(p.name for p in args.out.glob("*.png"))
        print(
            f"wrote {args.out}/table.csv, table.json, regime.json, points.jsonl; plots: "
            + ", ".join(pngs)
        )
    return 0


def _write_regimes(out, regimes):
    from rgnn.study import _atomic_write

    doc = [r.as_dict() for r in regimes]
    _atomic_write(Path(out) / "regime.json", _dumps(doc) + "\n")


def _run_classify(args):
    import jax

    from rgnn.regime import classify
    from rgnn.study import load_sweep

    if args.tolerance is not None and not args.tolerance > 0:
        raise _Fail(f"tolerance: expected a positive number, got {args.tolerance}")
    try:
        if args.width is None:
            result = load_sweep(args.out)
            if not result.records:
                raise _Fail(f"out: the sweep in {args.out} has no finished points yet")
            regimes = _regimes(result, args.tolerance)
        else:
            arch = _base_arch(args, args.width)
            x, y = _task(args)
            with jax.enable_x64(False):
                regimes = [
                    classify(
                        arch,
                        x,
                        y,
                        tolerance=args.tolerance,
                        seed=args.seed,
                        steps=args.steps,
                        learning_rate=args.learning_rate,
                        optimizer=args.optimizer,
                        loss=args.loss,
                        n_networks=args.n_networks,
                    )
                ]
            args.out.mkdir(parents=True, exist_ok=True)
    except (ValueError, RuntimeError) as err:
        raise _Fail(str(err)) from None
    _write_regimes(args.out, regimes)
    if args.json:
        print(_dumps([r.as_dict() for r in regimes]))
    else:
        for r in regimes:
            print(r)
            print()
    return 0


# ----------------------------------------------------------------------------- wilsonian
def _wilsonian_parser(sub):
    p = sub.add_parser(
        "wilsonian",
        help="Wilsonian RG of the fixed-point kernel: the running ridge, and where trained "
        "networks depart from the fixed point",
        description="Explicit renormalization on built-in data (rgnn.wilsonian; Howard, "
        "Jefferson, Maiti & Ringel 2024). (1) GP regression with the fixed-point kernel: "
        "integrate out the kernel eigenmodes below each cutoff, print the running ridge and how "
        "close the effective theory (and plain truncation) stays to the full GP posterior "
        "mean. (2) Train an NTK-parameterized ensemble with a small learning rate at each of "
        "--widths and a muP ensemble (on digits 0 and 1, or the teacher), and resolve each "
        "output NTK's departure from the fixed "
        "point over the fixed point's eigenvalue bands (rgnn.scale_resolved). Writes "
        "OUT/wilsonian.json, OUT/wilsonian.png and OUT/scale_resolved.png.",
    )
    g = p.add_argument_group("the flow")
    g.add_argument(
        "--data",
        type=_data_arg,
        default="digits",
        help="digits (default), teacher-student, or FILE.npz: x and y train, x_test tests (no "
        "x_test: a random quarter of the rows); --n, --n-test are then ignored",
    )
    g.add_argument("--n", type=_positive_int, default=100, help="training inputs (default 100)")
    g.add_argument("--n-test", type=_positive_int, default=300, help="test inputs (default 300)")
    g.add_argument("--kernel", default="nngp", choices=["nngp", "ntk"])
    g.add_argument("--ridge", type=float, default=0.01, help="bare ridge sigma^2 (default 0.01)")
    g.add_argument("--cutoffs", type=_positive_int, default=12, help="log-spaced cutoffs (12)")
    g.add_argument("--depth", type=_positive_int, default=2, help="hidden layers L (default 2)")
    g.add_argument("--activation", default="relu", help="activation (default relu)")
    g.add_argument("--weight-var", type=float, default=2.0, help="C_W (default 2)")
    g.add_argument("--bias-var", type=float, default=0.0, help="C_b (default 0)")
    g = p.add_argument_group("trained networks (scale-resolved comparison)")
    g.add_argument(
        "--widths",
        type=_int_list,
        default=[64, 128, 256, 512],
        help="NTK-parameterization widths (default 64,128,256,512)",
    )
    g.add_argument("--mup-width", type=_positive_int, help="muP width (default: 2nd of --widths)")
    g.add_argument("--n-scale", type=_positive_int, default=24, help="training inputs (24)")
    g.add_argument("--steps", type=_positive_int, default=20, help="NTK steps (default 20)")
    g.add_argument("--lr", type=float, default=0.05, help="NTK learning rate (default 0.05)")
    g.add_argument("--mup-steps", type=_positive_int, default=60, help="muP steps (default 60)")
    g.add_argument("--mup-lr", type=float, default=0.3, help="muP learning rate (default 0.3)")
    g.add_argument("--n-networks", type=_positive_int, default=8, help="ensemble size (8)")
    g.add_argument("--bands", type=_positive_int, default=3, help="eigenvalue bands (3)")
    g.add_argument("--seed", type=int, default=0, help="seed of the data split and networks")
    g.add_argument("--no-networks", action="store_true", help="skip the trained networks")
    _add_common(p)
    _one_line_errors(p)
    p.set_defaults(run=_run_wilsonian)


def _wilsonian_task(args, n):
    """``n`` inputs of the task in random order (digits come sorted by label) and targets:
    the parity of the digit (+-1) or the teacher's output."""
    import numpy as np

    from rgnn import data

    if args.data.endswith(".npz"):
        x, y, x_test = _load_npz(args.data)
        y = _npz_targets(y)
        if x_test is None:
            if len(x) < 2:
                raise _Fail(f"data: expected at least 2 rows of x in {args.data}, got {len(x)}")
            perm = np.random.RandomState(args.seed).permutation(len(x))
            x, y = x[perm], y[perm]
            args.n_test = max(1, len(x) // 4)
            args.n = len(x) - args.n_test
            return x, y
        args.n, args.n_test = len(x), len(x_test)
        pad = np.zeros((len(x_test), y.shape[1]))  # test targets are never used
        return np.concatenate([x, x_test]), np.concatenate([y, pad])
    if args.data == "digits":
        if n > 1797:
            raise _Fail(f"n: expected at most 1797 digits in all, got {n}")
        x, labels = data.digits(n, seed=args.seed)
        y = np.where(labels % 2 == 0, 1.0, -1.0)[:, None]
    else:
        x, y = data.teacher_student(n, seed=args.seed)
    perm = np.random.RandomState(args.seed).permutation(n)
    return x[perm], y[perm]


def _scale_task(args):
    """The trained networks' task: digits 0 and 1 (targets -1, +1), whose target lies almost
    entirely in the fixed point's top modes, or the teacher-student task."""
    import numpy as np

    from rgnn import data

    if args.data.endswith(".npz"):
        x, y, _ = _load_npz(args.data)
        perm = np.random.RandomState(args.seed).permutation(len(x))[: args.n_scale]
        return x[perm], _npz_targets(y)[perm]
    if args.data == "digits":
        if args.n_scale > 360:
            raise _Fail(f"n-scale: expected at most 360 digits 0 and 1, got {args.n_scale}")
        x, labels = data.digits(args.n_scale, seed=args.seed, classes=(0, 1))
        return x, np.where(labels == 0, -1.0, 1.0)[:, None]
    return data.teacher_student(args.n_scale, seed=args.seed)


def _mean_se(values):
    import numpy as np

    v = np.asarray(values, dtype=float).reshape(-1)
    se = float(v.std(ddof=1) / np.sqrt(v.size)) if v.size > 1 else float("nan")
    return float(v.mean()), se


def _slope(widths, totals):
    """Weighted least-squares slope of log(mean total) on log(width), with its standard error
    (weights from each width's standard error over networks)."""
    import numpy as np

    mean = np.array([np.mean(t) for t in totals])
    se = np.array([np.std(t, ddof=1) / np.sqrt(len(t)) for t in totals]) / mean
    a = np.stack([np.ones(len(widths)), np.log(widths)], 1) / se[:, None]
    cov = np.linalg.inv(a.T @ a)
    coef = cov @ a.T @ (np.log(mean) / se)
    return float(coef[1]), float(np.sqrt(cov[1, 1]))


def _scale_summary(s):
    """Means over the ensemble with standard errors, and the per-network values."""
    import numpy as np

    fields = dict(
        total=s.total,
        alignment=s.alignment,
        top_fraction=s.top_fraction,
        top_band_alignment=s.band_alignment[:, 0],
    )
    summary = {}
    for name, values in fields.items():
        summary[name], summary[f"{name}_se"] = _mean_se(values)
    summary["per_network"] = {
        name: [float(v) for v in np.asarray(values)] for name, values in fields.items()
    }
    summary["band_alignment"] = [float(v) for v in np.nanmean(np.asarray(s.band_alignment), 0)]
    summary["departure"] = [float(v) for v in np.asarray(s.departure).mean(0)]
    summary["relative_departure"] = [float(v) for v in np.asarray(s.relative_departure).mean(0)]
    return summary


def _run_wilsonian(args):
    import jax
    import numpy as np

    import rgnn
    from rgnn import plotting

    if not (args.ridge > 0 and np.isfinite(args.ridge)):
        raise _Fail(f"ridge: expected a finite number > 0, got {args.ridge}")
    for name in ("lr", "mup_lr"):
        if not (getattr(args, name) > 0 and np.isfinite(getattr(args, name))):
            raise _Fail(f"{name.replace('_', '-')}: expected a finite number > 0")
    if args.data == "digits" and args.n + args.n_test > 1797:  # checked before any output
        raise _Fail(f"n: expected at most 1797 digits in all, got {args.n + args.n_test}")
    if args.data == "digits" and not args.no_networks and args.n_scale > 360:
        raise _Fail(f"n-scale: expected at most 360 digits 0 and 1, got {args.n_scale}")
    start = time.perf_counter()
    result = dict(data=args.data, kernel=args.kernel, ridge=args.ridge)
    with jax.enable_x64(True):
        try:
            arch = rgnn.MLP(
                args.depth,
                max(args.widths),
                args.activation,
                weight_var=args.weight_var,
                bias_var=args.bias_var,
            )
        except ValueError as err:
            raise _Fail(str(err)) from None
        x, y = _wilsonian_task(args, args.n + args.n_test)
        try:
            fp = rgnn.fixed_point(arch, x)
        except ValueError as err:
            raise _Fail(str(err)) from None
        w = rgnn.wilsonian_fixed_point(
            fp,
            y[: args.n],
            n_train=args.n,
            ridge=args.ridge,
            kernel=args.kernel,
            cutoffs=args.cutoffs,
        )
        errors = {k: np.asarray(w.test_error(k)) for k in ("effective", "truncated", "exact")}
        rows = [
            dict(
                cutoff=float(w.cutoffs[i]),
                modes=int(w.n_modes[i]),
                running_ridge=float(w.running_ridge[i]),
                spectral_ridge=float(w.ridge + w.integrated_sum[i]),
                error_effective=float(errors["effective"][i]),
                error_truncated=float(errors["truncated"][i]),
                error_exact=float(errors["exact"][i]),
                valid=bool(w.valid[i]),
            )
            for i in range(w.cutoffs.shape[0])
        ]
        result["flow"] = rows
        args.out.mkdir(parents=True, exist_ok=True)
        result["plot_flow"] = str(
            plotting.plot_wilsonian(
                w,
                args.out / "wilsonian.png",
                title=f"Wilsonian flow: {args.kernel.upper()} of a depth-{args.depth} "
                f"{arch.act.name} MLP, {args.data}, N = {args.n}, sigma^2 = {args.ridge:g}",
            )
        )
        if not args.no_networks:
            result["scale_resolved"] = _scale_contrast(args)
    result["seconds"] = time.perf_counter() - start
    (args.out / "wilsonian.json").write_text(_dumps(result))
    if args.json:
        print(_dumps(result))
    else:
        _print_wilsonian(args, result)
    return 0


def _scale_contrast(args):
    """NTK-parameterized ensembles (small learning rate) at each width and one muP ensemble,
    their output NTKs resolved over the fixed point's eigenvalue bands."""
    import jax
    import numpy as np

    import rgnn
    from rgnn import plotting

    x, y = _scale_task(args)
    mup_width = args.mup_width or args.widths[min(1, len(args.widths) - 1)]

    def arch(width, par):
        return rgnn.MLP(
            args.depth,
            width,
            args.activation,
            weight_var=args.weight_var,
            bias_var=args.bias_var,
            parameterization=par,
        )

    try:
        fp = rgnn.fixed_point(arch(mup_width, "ntk"), x)
        key = jax.random.key(args.seed)
        kw = dict(n_networks=args.n_networks, key=key)
        lazy = {}
        for width in args.widths:
            run = rgnn.train(
                arch(width, "ntk"),
                x,
                y,
                steps=args.steps,
                learning_rate=args.lr,
                record_steps=[args.steps],
                **kw,
            )
            lazy[width] = rgnn.scale_resolved(
                fp.ntk[-1], run.ntk[-1, :, -1], bands=args.bands, target=y
            )
        run = rgnn.train(
            arch(mup_width, "mup"),
            x,
            y,
            steps=args.mup_steps,
            learning_rate=args.mup_lr,
            record_steps=[args.mup_steps],
            **kw,
        )
    except ValueError as err:
        raise _Fail(str(err)) from None
    mup = rgnn.scale_resolved(fp.ntk[-1], run.ntk[-1, :, -1], bands=args.bands, target=y)
    out = dict(
        n_inputs=args.n_scale,
        bands=dict(
            edges=[float(e) for e in np.asarray(mup.band_edges)],
            modes=[int(m) for m in np.asarray(mup.band_modes)],
            target_weight=[float(v) for v in np.asarray(mup.target_weight)],
        ),
        ntk={str(w): dict(width=w, **_scale_summary(s)) for w, s in lazy.items()},
        mup=dict(width=mup_width, **_scale_summary(mup)),
    )
    if len(args.widths) >= 2 and args.n_networks >= 2:
        slope, slope_se = _slope(args.widths, [np.asarray(s.total) for s in lazy.values()])
        out["ntk_total_slope"], out["ntk_total_slope_se"] = slope, slope_se
    show = {f"NTK, lr {args.lr:g}, width {w}": s for w, s in lazy.items()}
    show[f"muP, lr {args.mup_lr:g}, width {mup_width}"] = mup
    out["plot"] = str(
        plotting.plot_scale_resolved(
            show,
            args.out / "scale_resolved.png",
            title=f"Output-NTK departure from the fixed point over its eigenvalue bands "
            f"({args.n_networks} networks each, {args.n_scale} inputs)",
        )
    )
    return out


def _print_wilsonian(args, result):
    print(
        f"Wilsonian flow of GP regression with the fixed-point {args.kernel.upper()} "
        f"({args.data}, {args.n} training and {args.n_test} test inputs, ridge {args.ridge:g})"
    )
    print(
        "modes with population eigenvalue below the cutoff are integrated out; error = "
        "|f - f_full| / |f_full| on the test inputs; * = running ridge justified (N Lambda <= "
        "sigma^2(Lambda), >= N modes integrated out)"
    )
    head = ("cutoff", "modes", "running ridge", "err effective", "err truncated", "err exact")
    print("  ".join(f"{h:>13}" for h in head))
    for r in result["flow"]:
        print(
            f"{r['cutoff']:13.4g}  {r['modes']:13d}  {r['running_ridge']:13.4g}  "
            f"{r['error_effective']:13.4g}  {r['error_truncated']:13.4g}  "
            f"{r['error_exact']:13.4g}{' *' if r['valid'] else ''}"
        )
    sr = result.get("scale_resolved")
    if sr:
        print()
        print(
            "Output-NTK departure from the fixed point, resolved over its eigenvalue bands "
            f"({args.n_scale} inputs; band modes {sr['bands']['modes']}, target weight "
            + ", ".join(f"{v:.2f}" for v in sr["bands"]["target_weight"])
            + ")"
        )
        head = ("network", "total", "top-band share", "alignment", "top-band align")
        print("  ".join(f"{h:>18}" for h in head) + "  relative per band")
        rows = [(f"NTK width {k}", v) for k, v in sr["ntk"].items()]
        rows.append((f"muP width {sr['mup']['width']}", sr["mup"]))
        for name, v in rows:
            cells = [f"{name:>18}"]
            for field in ("total", "top_fraction", "alignment", "top_band_alignment"):
                cells.append(f"{v[field]:>9.3g} +-{v[field + '_se']:<6.2g}")
            rel = ", ".join(f"{r:.3g}" for r in v["relative_departure"])
            print("  ".join(cells) + f"  {rel}")
        if "ntk_total_slope" in sr:
            print(
                f"NTK departure vs width: log-log slope {sr['ntk_total_slope']:.3f} "
                f"+- {sr['ntk_total_slope_se']:.3f}"
            )
        print(f"wrote {result['plot_flow']}, {sr['plot']} and {args.out / 'wilsonian.json'}")
    else:
        print(f"wrote {result['plot_flow']} and {args.out / 'wilsonian.json'}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rgnn",
        description="The renormalization-group view of neural networks: Gaussian fixed point, "
        "perturbative flow, finite networks.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _fixed_point_parser(sub)
    _sweep_parser(sub)
    _classify_parser(sub)
    _wilsonian_parser(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        out = getattr(args, "out", None)
        if out is not None and out.exists() and not out.is_dir():
            raise _Fail(f"out: expected a directory, got the file {str(out)!r}")
        return args.run(args)
    except _Fail as err:
        print(f"rgnn {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"rgnn {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
