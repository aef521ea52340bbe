"""Monte Carlo check of the residual-MLP O(1/n) predictions across widths.

For each activation and residual setting, ``rgnn.measure`` estimates the vertex ``V``
(pair layout), ``n_{l-1} x nngp_correction`` and ``n_{l-1} x kurtosis`` at several widths; a
weighted fit ``y(n) = a + b / n`` (weights 1 / SE^2) gives the intercept ``a`` and its standard
error, compared with ``rgnn.perturbative``, with the NTK side too (``ntk_vertex`` A,
``mixed_vertex`` D, ``ntk_b`` B, ``n x ntk_variance``, ``n x ntk_correction``; ``--no-ntk``
leaves it out): on three inputs for the linear activation, with the dNTK correlators ``dntk_p``
P and ``dntk_q`` Q and the ddNTK means ``ddntk_r, ddntk_s, ddntk_t, ddntk_u`` as well (three
outputs, so that these are defined on the output layer; entries that vanish in every network,
such as R on layer 2, are skipped); for the nonlinear ones on ``--inputs`` inputs (default
one: the single-input flow of :mod:`rgnn._residual_single`; two or three: the unrolled pair
flow of :mod:`rgnn._residual_multi`, every pair component; two outputs, for B on the output
layer); with ``--dntk`` the dNTK ``P, Q`` too, on any of these input counts, in the pointwise
kink convention of automatic differentiation (``--ddntk``: and the ddNTK ``R, S, T, U``, of
:mod:`rgnn._residual_single` on one input, of :mod:`rgnn._residual_multi` on more). ``--full``
(smooth activations): the full four-index layout of both (``full=True``), on up to four inputs
(``--inputs 4``: the components on four distinct inputs, off every pair, are also reported on
their own). Prints one
line
per (setting, field): the largest |a - prediction| / SE(a) over layers 2..L+1 and entries, the
median SE relative to the largest predicted entry, and whether every entry is within
``--sigmas``; for one input also the per-layer predictions, intercepts, SE and z.

For the nonlinear activations it then checks the NTK mean shift (``n x ntk_correction``, every
pair component): ``--mean-networks`` networks at widths ``--mean-widths``, the NTK of
``--mean-units`` units averaged per network (``rgnn.empirical_ntk``; the units' fluctuations
are nearly independent, so the average is much less noisy than one unit), the same weighted
fit; it prints the intercepts, their SE, ``z`` against the prediction and ``z`` against 0 (the
answer of the rotation-symmetric rules for relu).

    PYTHONPATH=. python tools/residual_monte_carlo.py --networks 1024
    PYTHONPATH=. python tools/residual_monte_carlo.py --inputs 3 --activations relu tanh gelu
    PYTHONPATH=. python tools/residual_monte_carlo.py --dntk --activations relu tanh gelu
    PYTHONPATH=. python tools/residual_monte_carlo.py --dntk --inputs 2 --mean-networks 0 --depth 3
    PYTHONPATH=. python tools/residual_monte_carlo.py --activations tanh gelu --depth 3 --inputs 4 \
        --full --dntk --ddntk --widths 16 32 64 --mean-networks 0 --settings gamma=0.8,xi=0.6

Uses only the public API.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

import rgnn

SETTINGS = {  # (shortcut, branch); None: per residual layer, alternating (``--settings``)
    "gamma=0.8,xi=0.6": (0.8, 0.6),
    "gamma=1,xi=0.5": (1.0, 0.5),
    "per-layer": None,
}
DEFAULT_SETTINGS = ["gamma=0.8,xi=0.6", "gamma=1,xi=0.5"]
CW = {"relu": 2.0, "tanh": 1.0, "gelu": 1.98, "linear": 1.0}
NTK_FIELDS = {  # the NTK side: field -> whether it is multiplied by n_{l-1}
    "ntk_vertex": False,
    "mixed_vertex": False,
    "ntk_b": False,
    "ntk_variance": True,
    "ntk_correction": True,
    "dntk_p": False,
    "dntk_q": False,
    "ddntk_r": False,
    "ddntk_s": False,
    "ddntk_t": False,
    "ddntk_u": False,
}
DNTK = ("dntk_p", "dntk_q", "ddntk_r", "ddntk_s", "ddntk_t", "ddntk_u")  # linear only


def _fit(widths, y, se):
    """Weighted fit y = a + b / n per entry: ``(a, se_a)`` arrays."""
    x = 1 / np.asarray(widths, float)
    w = 1 / np.maximum(se, 1e-300) ** 2  # [W, ...]
    xs = x.reshape((-1,) + (1,) * (y.ndim - 1))
    s0, s1 = w.sum(0), (w * xs).sum(0)
    s2 = (w * xs * xs).sum(0)
    t0, t1 = (w * y).sum(0), (w * xs * y).sum(0)
    det = s0 * s2 - s1 * s1
    a = (s2 * t0 - s1 * t1) / det
    return a, np.sqrt(s2 / det)


def _arch(act, depth, width, gamma, xi, out_dim):
    """The residual MLP of the checks: ``C_W`` of the activation, ``C_b = 0.1``."""
    return rgnn.MLP(
        depth,
        width,
        act,
        weight_var=CW[act],
        bias_var=0.1,
        shortcut=gamma,
        branch=xi,
        out_dim=out_dim,
    )


def _ntk_mean(act, gamma, xi, args, x) -> None:
    """The NTK mean shift of a nonlinear residual MLP against Monte Carlo (every pair of
    inputs; the per-layer numbers of the first input's diagonal entry)."""
    t0 = time.time()
    ys, ses = [], []
    for width in args.mean_widths:
        arch = _arch(act, args.depth, width, gamma, xi, args.mean_units)
        theta = np.asarray(rgnn.fixed_point(arch, x).ntk)  # [L+1, N, N]
        n = np.asarray(arch.layer_dims(x.shape[1]), float)[:-1]
        per_net = []
        for start in range(0, args.mean_networks, 1024):
            size = min(1024, args.mean_networks - start)
            key = jax.random.key(args.seed + 1000 * width + start)
            ens = rgnn.ensemble(arch, x.shape[1], n_networks=size, key=key)
            units = [rgnn.empirical_ntk(ens, x, unit=u) for u in range(args.mean_units)]
            per_net.append(np.mean([np.asarray(h) for h in units], axis=0))
        h = np.concatenate(per_net)  # [M, L+1, N, N]
        ys.append((h.mean(0) - theta) * n[:, None, None])
        ses.append(h.std(0, ddof=1) / np.sqrt(h.shape[0]) * n[:, None, None])
    pred = rgnn.perturbative(arch, x, warn=False)
    ref = np.asarray(pred.ntk_correction)[1:] * np.asarray(pred.widths)[1:, None, None]
    a, sa = _fit(args.mean_widths, np.stack(ys)[:, 1:], np.stack(ses)[:, 1:])
    z = (a - ref) / sa
    print(
        f"{act:6s} gamma={gamma},xi={xi} n x ntk_correction, layers 2..{args.depth + 1}, "
        f"entry (0, 0): pred {np.round(ref[:, 0, 0], 3)} fit {np.round(a[:, 0, 0], 3)} "
        f"SE {np.round(sa[:, 0, 0], 3)} z {np.round(z[:, 0, 0], 2)} "
        f"z(0) {np.round(a[:, 0, 0] / sa[:, 0, 0], 2)}; every entry: max|z| "
        f"{np.max(np.abs(z)):.2f} {'ok' if np.max(np.abs(z)) <= args.sigmas else 'FAIL'} "
        f"({time.time() - t0:.0f} s)",
        flush=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--networks", type=int, default=1024)
    ap.add_argument("--widths", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--activations", nargs="+", default=["relu", "tanh", "gelu", "linear"])
    ap.add_argument("--sigmas", type=float, default=4.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mean-networks", type=int, default=4096)
    ap.add_argument("--mean-widths", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--mean-units", type=int, default=8)
    ap.add_argument(
        "--settings",
        nargs="+",
        choices=list(SETTINGS),
        default=DEFAULT_SETTINGS,
        help="per-layer: gamma 0.9, -0.5, 0.9, ... and xi 0.5, 1.1, 0.5, ... on layers 2..L",
    )
    ap.add_argument(
        "--no-ntk", dest="ntk", action="store_false", help="the kernel side only (V, DG, kurtosis)"
    )
    ap.add_argument(
        "--dntk",
        action="store_true",
        help="nonlinear activations: the dNTK correlators P, Q as well (the pointwise kink "
        "convention: what automatic differentiation of the networks gives)",
    )
    ap.add_argument(
        "--ddntk",
        action="store_true",
        help="with --dntk: the ddNTK means R, S, T, U as well (pointwise kinks)",
    )
    ap.add_argument(
        "--inputs",
        type=int,
        default=1,
        choices=(1, 2, 3, 4),
        help="inputs of the nonlinear activations (one: the single-input flow; more: pairs)",
    )
    ap.add_argument(
        "--full",
        action="store_true",
        help="nonlinear activations: the full four-index layout (rgnn.perturbative and "
        "rgnn.measure with full=True; every index tuple, the ones with four distinct inputs "
        "reported on their own)",
    )
    args = ap.parse_args()
    rng = np.random.default_rng(1)
    x3 = rng.normal(size=(3, 6))
    x3 /= np.sqrt(np.mean(x3**2, axis=1, keepdims=True))
    x3 *= np.array([0.8, 1.0, 1.2])[:, None]
    x4 = rng.normal(size=(1, 6))
    x4 *= 0.9 / np.sqrt(np.mean(x4**2))
    x3 = np.concatenate([x3, x4])  # the fourth input of --inputs 4 (the first three unchanged)
    with jax.enable_x64(True):
        for act in args.activations:
            x = x3[:3] if act == "linear" else (x3[1:2] if args.inputs == 1 else x3[: args.inputs])
            full = args.full and not (act == "linear")
            ntk = args.ntk
            for label in args.settings:
                if SETTINGS[label] is None:
                    gamma = tuple((0.9, -0.5)[k % 2] for k in range(args.depth - 1))
                    xi = tuple((0.5, 1.1)[k % 2] for k in range(args.depth - 1))
                else:
                    gamma, xi = SETTINGS[label]
                t0 = time.time()
                linear = act == "linear"
                names = ["vertex", "correction", "kurtosis"]
                dntk = ntk and not linear and args.dntk
                ddntk = dntk and args.ddntk
                ntk_names = [
                    k
                    for k in NTK_FIELDS
                    if linear or k not in DNTK or (dntk and k in DNTK[:2]) or ddntk
                ]
                if ntk:
                    names += ntk_names
                rows = {name: [] for name in names}
                ses = {name: [] for name in names}
                pred = None
                for width in args.widths:
                    arch = _arch(act, args.depth, width, gamma, xi, 3 if linear else 2)
                    if pred is None:
                        pred = rgnn.perturbative(
                            arch,
                            x,
                            ntk=ntk,
                            dntk=dntk,
                            ddntk=(linear and ntk) or ddntk,
                            kinks="pointwise",
                            warn=False,
                            full=full,
                        )
                    m = rgnn.measure(
                        arch,
                        x,
                        n_networks=args.networks,
                        key=jax.random.key(args.seed + width),
                        ntk=ntk,
                        dntk=(linear and ntk) or dntk,
                        ddntk=(linear and ntk) or ddntk,
                        vertex=True,
                        full=full,
                    )
                    n = np.asarray(pred.widths) * width / args.widths[0]
                    n[0] = 1.0  # layer 1: deterministic, not fitted
                    rows["vertex"].append(np.asarray(m.vertex))
                    ses["vertex"].append(np.asarray(m.vertex_se))
                    nn = np.asarray(arch.layer_dims(x.shape[1]), float)[: arch.n_layers]
                    rows["correction"].append(np.asarray(m.nngp_correction) * nn[:, None, None])
                    ses["correction"].append(np.asarray(m.nngp_correction_se) * nn[:, None, None])
                    rows["kurtosis"].append(np.asarray(m.kurtosis) * nn[:, None])
                    ses["kurtosis"].append(np.asarray(m.kurtosis_se) * nn[:, None])
                    for name in ntk_names if ntk else ():
                        s = nn[:, None, None] if NTK_FIELDS[name] else 1.0
                        rows[name].append(np.asarray(getattr(m, name)) * s)
                        ses[name].append(np.asarray(getattr(m, name + "_se")) * s)
                nn0 = np.asarray(pred.widths)
                preds = {
                    "vertex": np.asarray(pred.vertex),
                    "correction": np.asarray(pred.nngp_correction) * nn0[:, None, None],
                    "kurtosis": np.asarray(pred.kurtosis) * nn0[:, None],
                }
                for name in ntk_names if ntk else ():
                    s = nn0[:, None, None] if NTK_FIELDS[name] else 1.0
                    preds[name] = np.asarray(getattr(pred, name)) * s
                for field in rows:
                    y, se = np.stack(rows[field])[:, 1:], np.stack(ses[field])[:, 1:]
                    live = np.any(se > 0, axis=0)  # entries that vary over networks
                    a, sa = _fit(args.widths, y[:, live], se[:, live])
                    ref = preds[field][1:][live]
                    z = np.abs(a - ref) / sa
                    distinct = ""
                    if full and preds[field].ndim == 5 and x.shape[0] >= 4:
                        # the components on four distinct inputs (off every pair)
                        idx = np.indices(preds[field].shape[1:]).reshape(4, -1)
                        four = np.array([len(set(t)) == 4 for t in idx.T])
                        four = np.broadcast_to(four.reshape(preds[field].shape[1:]), live.shape)
                        zd = (np.abs(a - ref) / sa)[four[live]]
                        distinct = f"four distinct: max|z| {np.nanmax(zd):5.2f} / {zd.size}  "
                    # relative to the largest predicted entry; absolute where the prediction
                    # vanishes (the linear network's mean shifts)
                    scale = np.max(np.abs(ref)) or 1.0
                    print(
                        f"{act:6s} {label:17s} {field:14s} max|z| {np.nanmax(z):5.2f}  "
                        f"sum z^2 {np.nansum(z * z):7.1f} / {np.sum(np.isfinite(z))}  "
                        f"median SE/max {np.nanmedian(sa) / scale:.3f}  {distinct}"
                        f"{'ok' if np.nanmax(z) <= args.sigmas else 'FAIL'}  "
                        f"({time.time() - t0:.0f} s)",
                        flush=True,
                    )
                    if not linear and x.shape[0] == 1:  # the per-layer numbers (layers 2..L+1)
                        full = preds[field][1:]
                        ones = (slice(None),) + (0,) * (full.ndim - 1)
                        ref1 = full[ones]
                        every = (slice(None),) + ones
                        a1, s1 = _fit(args.widths, y[every], se[every])
                        print(
                            f"         pred {np.round(ref1, 4)} fit {np.round(a1, 4)} "
                            f"SE {np.round(s1, 4)} z {np.round((a1 - ref1) / s1, 2)}",
                            flush=True,
                        )
                if not linear and args.mean_networks and ntk:
                    _ntk_mean(act, gamma, xi, args, x)


if __name__ == "__main__":
    main()
