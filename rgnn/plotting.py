"""Figures (matplotlib, Agg backend). Only the command line and notebooks import this module."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["plot_layer_kernels"]


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
