"""Strict JAX for the whole suite: rank promotion raises; float64 only where a test asks for it."""

import jax
import pytest


@pytest.fixture(autouse=True)
def _strict_rank_promotion():
    with jax.numpy_rank_promotion("raise"):
        yield


@pytest.fixture
def x64():
    """Run the test body with 64-bit floats enabled (and restore the setting afterwards)."""
    with jax.enable_x64(True):
        yield
