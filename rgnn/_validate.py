"""Input validation shared by the public functions: errors a person can act on."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["check_inputs", "check_pair"]


def check_inputs(x, name: str = "x") -> jax.Array:
    """Return ``x`` as a 2-D floating array ``[N, n_0]``, or raise a ``ValueError``.

    Rejects non-2-D arrays, empty arrays, and NaN or inf entries. Integer inputs are promoted to
    the default float dtype; floating inputs keep their dtype. A traced array (inside ``jit``) is
    checked for shape only.
    """
    try:
        arr = x if isinstance(x, jax.Array) else np.asarray(x)
    except Exception as err:  # noqa: BLE001 - anything unconvertible is bad input
        raise ValueError(f"{name}: expected a 2-D array of floats, got {type(x).__name__}") from err
    if arr.ndim != 2:
        raise ValueError(
            f"{name}: expected a 2-D array [n_inputs, n_features], got shape {tuple(arr.shape)}"
        )
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"{name}: expected at least one input and one feature, got {arr.shape}")
    if not (jnp.issubdtype(arr.dtype, jnp.floating) or jnp.issubdtype(arr.dtype, jnp.integer)):
        raise ValueError(f"{name}: expected a real numeric array, got dtype {arr.dtype}")
    if not isinstance(arr, jax.core.Tracer) and not bool(np.all(np.isfinite(np.asarray(arr)))):
        raise ValueError(f"{name}: expected finite values, found NaN or inf")
    if not jnp.issubdtype(arr.dtype, jnp.floating):
        arr = arr.astype(jnp.result_type(float))
    return jnp.asarray(arr)


def check_pair(x1, x2, names=("x1", "x2")) -> tuple[jax.Array, jax.Array | None]:
    """Validate ``x1`` and the optional ``x2``; their feature dimensions must match."""
    x1 = check_inputs(x1, names[0])
    if x2 is None:
        return x1, None
    x2 = check_inputs(x2, names[1])
    if x1.shape[1] != x2.shape[1]:
        raise ValueError(
            f"{names[1]}: expected {x1.shape[1]} features to match {names[0]}, got {x2.shape[1]}"
        )
    dtype = jnp.promote_types(x1.dtype, x2.dtype)
    return x1.astype(dtype), x2.astype(dtype)


def check_finite(name: str, value) -> float:
    """``value`` as a float; a ``ValueError`` naming ``name`` for a bool, a non-number or a
    non-finite number."""
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a finite number, got {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(f):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")
    return f


def check_learning_rate(learning_rate) -> float:
    """``learning_rate`` as a float > 0 (``ValueError`` naming it otherwise)."""
    if isinstance(learning_rate, bool):
        raise ValueError(f"learning_rate: expected a positive number, got {learning_rate!r}")
    try:
        eta = float(learning_rate)
    except (TypeError, ValueError):
        raise ValueError(
            f"learning_rate: expected a positive number, got {learning_rate!r}"
        ) from None
    if not math.isfinite(eta) or eta <= 0:
        raise ValueError(f"learning_rate: expected a finite number > 0, got {learning_rate!r}")
    return eta
