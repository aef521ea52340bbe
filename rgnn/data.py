"""Built-in datasets that need no download: scikit-learn's digits and synthetic tasks."""

from __future__ import annotations

import os
import zipfile

import numpy as np

__all__ = ["digits", "load_npz", "teacher_student"]


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


def _numeric(name: str, arr: np.ndarray, path: str) -> np.ndarray:
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"data: array {name!r} in {path} is not numeric (dtype {arr.dtype})")
    if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
        raise ValueError(f"data: array {name!r} in {path} has NaN or inf entries")
    return arr


def load_npz(path) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The user's own data from a NumPy ``.npz`` file, checked.

    The file holds ``x`` (``[N, n_0]`` inputs), ``y`` (``[N]`` or ``[N, C]`` targets; integer
    ``[N]`` labels for a cross-entropy loss) and optionally ``x_test`` (``[N*, n_0]``). Every
    problem is one ``ValueError`` line naming the file and what is wrong: a missing or
    unreadable file, a missing array, wrong shapes, non-numeric arrays (object arrays are not
    loaded: no pickles), NaN or inf.

    Returns:
      ``(x float64 [N, n_0], y [N] or [N, C], x_test float64 [N*, n_0] or None)``.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"data: no such file {path}")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"data: {path} is not a readable .npz file (not a zip archive)")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except ValueError as err:
        if "pickle" in str(err).lower() or "object" in str(err).lower():
            raise ValueError(f"data: {path} holds non-numeric (object) arrays") from None
        raise ValueError(f"data: {path} is not a readable .npz file ({err})") from None
    except (OSError, zipfile.BadZipFile, EOFError) as err:
        raise ValueError(f"data: {path} is not a readable .npz file ({err})") from None
    if not isinstance(arrays, dict) or not arrays:
        raise ValueError(f"data: {path} holds no arrays (expected x and y)")
    missing = [k for k in ("x", "y") if k not in arrays]
    if missing:
        raise ValueError(
            f"data: {path} has no array {' or '.join(repr(k) for k in missing)} (expected x "
            f"[N, n_0], y [N] or [N, C], optional x_test; found {sorted(arrays)})"
        )
    x = _numeric("x", arrays["x"], path)
    y = _numeric("y", arrays["y"], path)
    if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"data: x in {path} must be [N, n_0] with N, n_0 >= 1, got {x.shape}")
    if y.ndim not in (1, 2) or y.shape[0] != x.shape[0]:
        raise ValueError(
            f"data: y in {path} must be [{x.shape[0]}] or [{x.shape[0]}, C] to match x, got "
            f"{y.shape}"
        )
    x_test = arrays.get("x_test")
    if x_test is not None:
        x_test = _numeric("x_test", x_test, path)
        if x_test.ndim != 2 or x_test.shape[1] != x.shape[1] or x_test.shape[0] < 1:
            raise ValueError(
                f"data: x_test in {path} must be [N*, {x.shape[1]}] to match x, got {x_test.shape}"
            )
        x_test = x_test.astype(np.float64)
    return x.astype(np.float64), y, x_test
