"""Built-in datasets that need no download: scikit-learn's digits and synthetic tasks."""

from __future__ import annotations

import numpy as np

__all__ = ["digits", "teacher_student"]


def digits(n: int | None = 128, *, seed: int = 0, classes=None) -> tuple[np.ndarray, np.ndarray]:
    """The 8x8 handwritten digits shipped inside scikit-learn (no download).

    Inputs are centered and scaled so that each image has ``|x|^2 / n_0 = 1`` (so the first
    layer's kernel diagonal is ``C_b + C_W``); rows are sorted by label, which makes kernel
    heat maps show the class structure.

    Args:
      n: number of images (``None``: all 1797), drawn without replacement.
      seed: seed of the draw.
      classes: optional iterable of labels to keep.

    Returns:
      ``(x [n, 64] float64, y [n] int)``.
    """
    from sklearn.datasets import load_digits

    data = load_digits()
    x, y = data.data.astype(np.float64), data.target.astype(int)
    if classes is not None:
        keep = np.isin(y, list(classes))
        x, y = x[keep], y[keep]
    if n is not None:
        if not isinstance(n, int) or not 1 <= n <= len(x):
            raise ValueError(f"n: expected an integer in 1..{len(x)}, got {n!r}")
        idx = np.random.RandomState(seed).choice(len(x), n, replace=False)
        x, y = x[idx], y[idx]
    order = np.argsort(y, kind="stable")
    x, y = x[order], y[order]
    x = x - x.mean(axis=1, keepdims=True)
    x = x / np.sqrt(np.mean(x**2, axis=1, keepdims=True))
    return x, y


def teacher_student(
    n: int = 128, in_dim: int = 16, *, seed: int = 0, noise: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic regression task: Gaussian inputs, targets from a random tanh teacher.

    ``y = tanh(x @ w1 / sqrt(in_dim)) @ w2 / sqrt(32) + noise * eps`` with a width-32 teacher.
    Returns ``(x [n, in_dim], y [n, 1])``.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n: expected an integer >= 1, got {n!r}")
    if not isinstance(in_dim, int) or in_dim < 1:
        raise ValueError(f"in_dim: expected an integer >= 1, got {in_dim!r}")
    rng = np.random.RandomState(seed)
    x = rng.randn(n, in_dim)
    w1, w2 = rng.randn(in_dim, 32), rng.randn(32, 1)
    y = np.tanh(x @ w1 / np.sqrt(in_dim)) @ w2 / np.sqrt(32) + noise * rng.randn(n, 1)
    return x, y
