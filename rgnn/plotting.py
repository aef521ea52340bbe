"""Figures written as PNG files. Only the command line and notebooks import this module.

Figures are built as bare ``matplotlib.figure.Figure`` objects (rendered by Agg when saved), not
through pyplot, so importing rgnn never switches the user's matplotlib backend: a notebook's
``show()`` keeps working after a sweep has written its plots.
"""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

__all__ = ["plot_layer_kernels", "plot_couplings", "plot_wilsonian", "plot_scale_resolved"]


def _subplots(*args, figsize=None, **kwargs):
    """``pyplot.subplots`` without pyplot: a detached figure and its axes."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*args, **kwargs)


def plot_layer_kernels(fp, path, *, labels=None, layers=None, title=None):
    """Heat maps of the NNGP (top row) and NTK (bottom row) on chosen layers, as a PNG.

    Each kernel is shown as a correlation, ``K_ab / sqrt(K_aa K_bb)``, on one colour scale
    [-1, 1], so layers are comparable; class boundaries are marked when ``labels`` are given.
    """
    n_layers = fp.nngp.shape[0]
    if layers is None:
        layers = sorted({1, 2, (n_layers + 1) // 2, n_layers})
    fig, axes = _subplots(2, len(layers), figsize=(3.0 * len(layers), 6.2), squeeze=False)
    for col, layer in enumerate(layers):
        for row, name in enumerate(("nngp", "ntk")):
            k = np.asarray(getattr(fp, name)[layer - 1])
            d = np.sqrt(np.abs(np.diagonal(k)))
            corr = k / np.outer(d, d) if k.shape[0] == k.shape[1] else k
            ax = axes[row, col]
            im = ax.imshow(corr, vmin=-1, vmax=1, cmap="RdBu_r", interpolation="nearest")
            ax.set_title(f"{name.upper()}  layer {layer}", fontsize=10)
            ax.set_xticks([])
            ax.set_yticks([])
            if labels is not None:
                edges = np.flatnonzero(np.diff(np.asarray(labels))) + 0.5
                for e in edges:
                    ax.axhline(e, color="k", lw=0.4)
                    ax.axvline(e, color="k", lw=0.4)
    fig.colorbar(im, ax=axes, shrink=0.8, label="kernel correlation  K_ab / sqrt(K_aa K_bb)")
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=110)
    return path


def plot_couplings(
    path,
    *,
    activations=("relu", "tanh", "gelu", "swish"),
    depth=20,
    width=256,
    x=None,
    shortcuts=(),
):
    """The running quartic coupling ``V^(l) / (K^(l))^2`` against depth, each activation at its
    critical point (``rgnn.critical_point``), as a PNG.

    ``shortcuts``: residual shortcut weights ``gamma`` (``|gamma| < 1``) to draw besides the
    plain MLP, each as a residual MLP at the same ``C_W, C_b`` with branch
    ``xi = sqrt(1 - gamma^2)``, which keeps it critical (:mod:`rgnn.criticality`): dashed
    curves. For relu the first residual layer adds exactly ``(1 - gamma^2)(5 - gamma^2)``; the
    increment then grows and settles (about 6.5 per layer for ``gamma = 0.5``, steeper than
    the plain 5; about 2.5 for ``gamma = 0.9``), so only a strong shortcut flattens the curve.

    ``V/K^2 = n x coupling`` is width-independent at O(1/n): the plot shows the flow itself; the
    dimensionless coupling at width ``n`` is the curve divided by ``n`` (right axis, at the given
    ``width``). Scale-invariant activations flow linearly (slope 3 A_4 / A_2^2 - 1, 5 for relu),
    K* = 0 activations more slowly (PDLT ch. 5). Uses only the public API.
    """
    import jax

    import rgnn

    if x is None:
        x = np.ones((1, 4))
    fig, ax = _subplots(figsize=(6.4, 4.4))
    with jax.enable_x64(True):
        for name in activations:
            crit = rgnn.critical_point(name)
            color = None
            for gamma in (None, *shortcuts):
                res = {} if gamma is None else dict(shortcut=gamma, branch=(1 - gamma**2) ** 0.5)
                arch = rgnn.MLP(
                    depth, width, name, weight_var=crit.weight_var, bias_var=crit.bias_var, **res
                )
                import warnings

                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)
                    p = rgnn.perturbative(arch, x, ntk=False)
                layers = np.arange(1, arch.n_layers + 1)
                label = (
                    f"{crit.activation} (C_W={crit.weight_var:.4g}, C_b={crit.bias_var:.3g})"
                    if gamma is None
                    else f"{crit.activation}, shortcut gamma={gamma:g}"
                )
                (line,) = ax.plot(
                    layers,
                    np.asarray(p.coupling) * width,
                    marker="o" if gamma is None else None,
                    ms=3,
                    ls="-" if gamma is None else "--",
                    color=color,
                    label=label,
                )
                color = line.get_color()
    ax.set_xlabel("layer l")
    ax.set_ylabel("V / K^2   (= width x quartic coupling)")
    ax.set_title("Running quartic coupling at criticality")
    right = ax.secondary_yaxis("right", functions=(lambda y: y / width, lambda y: y * width))
    right.set_ylabel(f"coupling V / (n K^2) at n = {width}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


# ----------------------------------------------------------------------------- Wilsonian RG
def plot_wilsonian(w, path, *, title=None, closed_form=None):
    """The Wilsonian flow of GP regression (:func:`rgnn.wilsonian`) as a PNG, two panels.

    Left: the running ridge ``sigma^2(Lambda)`` against the cutoff (the trace of the
    integrated-out Gram matrix per sample), its expectation ``sigma^2 + sum_{lambda < Lambda}
    lambda`` from the estimated spectrum, the spread of the input-dependent ``local_ridge``,
    and the IR scale ``Lambda = sigma^2(Lambda) / N``; ``closed_form`` (``[C]``) is overlaid
    when given. Right: the relative distance of the test predictions from the full GP
    posterior mean, for the running-ridge theory, plain truncation and the exact effective
    theory, with the cutoffs where the running-ridge approximation is justified shaded.
    """
    cut = np.asarray(w.cutoffs)
    pos = cut > 0
    c = cut[pos]
    n = w.train.shape[1]
    ridge = float(w.ridge)
    run = np.asarray(w.running_ridge)[pos]
    local = np.asarray(w.local_ridge)[pos]
    fig, (ax0, ax1) = _subplots(1, 2, figsize=(11.5, 4.4))
    ax0.plot(c, run, "o-", ms=4, label="running ridge  sigma^2 + tr K^> / N")
    ax0.plot(
        c,
        ridge + np.asarray(w.integrated_sum)[pos],
        "s--",
        ms=3,
        label="sigma^2 + sum_{lambda<Lambda} lambda  (spectrum)",
    )
    ax0.fill_between(
        c,
        local.min(1),
        local.max(1),
        alpha=0.15,
        label="local ridge sigma^2 + K^>(x, x): range over inputs",
    )
    if closed_form is not None:
        ax0.plot(c, np.asarray(closed_form)[pos], "k:", lw=2, label="closed form")
    ax0.plot(c, n * c, color="0.5", lw=1, label="IR scale: N Lambda")
    ax0.axhline(ridge, color="0.3", lw=0.8, ls="--", label="bare ridge sigma^2")
    ax0.set_xscale("log")
    ax0.set_yscale("log")
    lo, hi = min(ridge, run.min()) / 2, run.max() * 2
    ax0.set_ylim(lo, hi)
    ax0.set_xlabel("cutoff Lambda (modes with lambda < Lambda integrated out)")
    ax0.set_ylabel("ridge")
    ax0.set_title("Running ridge")
    ax0.legend(fontsize=7)
    ax0.grid(alpha=0.3)
    for which, style in (("effective", "o-"), ("truncated", "s-"), ("exact", "^:")):
        err = np.asarray(w.test_error(which))[pos]
        ax1.plot(c, np.maximum(err, 1e-16), style, ms=4, label=which)
    valid = np.asarray(w.valid)[pos]
    if valid.any():
        ax1.axvspan(
            c[valid].min(), c[valid].max(), color="g", alpha=0.08, label="running ridge justified"
        )
    modes = np.asarray(w.n_modes)[pos]
    for x_, m in zip(c[:: max(1, len(c) // 6)], modes[:: max(1, len(c) // 6)], strict=True):
        ax1.annotate(f"{m}", (x_, 1.0), fontsize=7, ha="center", va="bottom", color="0.4")
    ax1.set_xscale("log")
    ax1.set_yscale("log")
    ax1.set_xlabel("cutoff Lambda  (grey: modes kept)")
    ax1.set_ylabel("|f - f_full| / |f_full| on test inputs")
    ax1.set_title("Effective theory vs the full GP posterior mean")
    ax1.legend(fontsize=7)
    ax1.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def plot_scale_resolved(results, path, *, title=None):
    """Scale-resolved departures from the fixed point (:func:`rgnn.scale_resolved`) as a PNG.

    ``results`` maps a label (e.g. ``"NTK, small lr"``) to a :class:`~rgnn.ScaleResolved` on
    the same fixed-point kernel; leading axes (networks, ...) are averaged. Left: each band's
    share of the departure ``|P_b D|_F / |K_0|_F`` with the target's weight per band. Right:
    each band's relative movement ``|P_b D P_b| / |P_b K_0 P_b|``. The legend gives the
    alignment of the whole departure with the target.
    """
    labels = list(results)
    first = results[labels[0]]
    n_bands = int(np.asarray(first.band_modes).shape[0])
    edges = np.asarray(first.band_edges)
    modes = np.asarray(first.band_modes)
    names = []
    for b in range(n_bands):
        hi = "max" if not np.isfinite(edges[b]) else f"{edges[b]:.2g}"
        lo = "0" if not np.isfinite(edges[b + 1]) else f"{edges[b + 1]:.2g}"
        names.append(f"band {b}\n({lo}, {hi}]\n{modes[b]} modes")
    pos = np.arange(n_bands)
    width = 0.8 / len(labels)
    fig, (ax0, ax1) = _subplots(1, 2, figsize=(11.5, 4.4))
    for i, label in enumerate(labels):
        r = results[label]
        dep = np.asarray(r.departure).reshape(-1, n_bands).mean(0)
        rel = np.asarray(r.relative_departure).reshape(-1, n_bands).mean(0)
        align = np.nanmean(np.asarray(r.alignment))
        text = f"{label} (total {np.mean(np.asarray(r.total)):.3g}, alignment {align:.2f})"
        ax0.bar(pos + (i - (len(labels) - 1) / 2) * width, dep, width, label=text)
        ax1.bar(pos + (i - (len(labels) - 1) / 2) * width, rel, width, label=label)
    weight = np.asarray(first.target_weight)
    if np.all(np.isfinite(weight)):
        twin = ax0.twinx()
        twin.plot(pos, weight, "kD--", ms=5, label="target weight |P_b y|^2 / |y|^2")
        twin.set_ylim(0, 1.05)
        twin.set_ylabel("target weight per band")
        twin.legend(fontsize=7, loc="center right")
    for ax in (ax0, ax1):
        ax.set_xticks(pos)
        ax.set_xticklabels(names, fontsize=7)
        ax.grid(alpha=0.3, axis="y")
    ax0.set_ylabel("|P_b D|_F / |K_0|_F")
    ax0.set_title("Where the departure sits (eigenvalue bands of the fixed point)")
    ax0.legend(fontsize=7, loc="upper right")
    ax1.set_ylabel("|P_b D P_b|_F / |P_b K_0 P_b|_F")
    ax1.set_title("How far each band moved, relative to its size")
    ax1.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
