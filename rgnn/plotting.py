"""Figures (matplotlib, Agg backend). Only the command line and notebooks import this module."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["plot_layer_kernels", "plot_couplings"]


def plot_layer_kernels(fp, path, *, labels=None, layers=None, title=None):
    """Heat maps of the NNGP (top row) and NTK (bottom row) on chosen layers, as a PNG.

    Each kernel is shown as a correlation, ``K_ab / sqrt(K_aa K_bb)``, on one colour scale
    [-1, 1], so layers are comparable; class boundaries are marked when ``labels`` are given.
    """
    n_layers = fp.nngp.shape[0]
    if layers is None:
        layers = sorted({1, 2, (n_layers + 1) // 2, n_layers})
    fig, axes = plt.subplots(2, len(layers), figsize=(3.0 * len(layers), 6.2), squeeze=False)
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
    plt.close(fig)
    return path


def plot_couplings(
    path, *, activations=("relu", "tanh", "gelu", "swish"), depth=20, width=256, x=None
):
    """The running quartic coupling ``V^(l) / (K^(l))^2`` against depth, each activation at its
    critical point (``rgnn.critical_point``), as a PNG.

    ``V/K^2 = n x coupling`` is width-independent at O(1/n): the plot shows the flow itself; the
    dimensionless coupling at width ``n`` is the curve divided by ``n`` (right axis, at the given
    ``width``). Scale-invariant activations flow linearly (slope 3 A_4 / A_2^2 - 1, 5 for relu),
    K* = 0 activations more slowly (PDLT ch. 5). Uses only the public API.
    """
    import jax

    import rgnn

    if x is None:
        x = np.ones((1, 4))
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    with jax.enable_x64(True):
        for name in activations:
            crit = rgnn.critical_point(name)
            arch = rgnn.MLP(depth, width, name, weight_var=crit.weight_var, bias_var=crit.bias_var)
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                p = rgnn.perturbative(arch, x)
            layers = np.arange(1, arch.n_layers + 1)
            ax.plot(
                layers,
                np.asarray(p.coupling) * width,
                marker="o",
                ms=3,
                label=f"{crit.activation} (C_W={crit.weight_var:.4g}, C_b={crit.bias_var:.3g})",
            )
    ax.set_xlabel("layer l")
    ax.set_ylabel("V / K^2   (= width x quartic coupling)")
    ax.set_title("Running quartic coupling at criticality")
    right = ax.secondary_yaxis("right", functions=(lambda y: y / width, lambda y: y * width))
    right.set_ylabel(f"coupling V / (n K^2) at n = {width}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
