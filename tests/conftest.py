"""Strict JAX for the whole suite: rank promotion raises; float64 only where a test asks for it."""

import os
import shutil
import tempfile

import jax
import pytest

_CACHE_ENV = "RGNN_TEST_JAX_CACHE"
_CACHE_KEY = pytest.StashKey[str]()


def pytest_configure(config):
    """One on-disk JAX compilation cache for the session, shared by the pytest-xdist workers:
    a program that both workers need (the fixed point's or the flow engine's for shapes many
    tests share) is compiled once, not once per worker. The controller (or a run without
    workers) makes a temporary directory, hands it to the workers through the environment and
    removes it at the end; every run starts empty, so its timings are a fresh clone's."""
    if not hasattr(config, "workerinput"):
        path = tempfile.mkdtemp(prefix="rgnn-jax-cache-")
        os.environ[_CACHE_ENV] = path
        config.stash[_CACHE_KEY] = path
    path = os.environ.get(_CACHE_ENV)
    if path:
        jax.config.update("jax_compilation_cache_dir", path)


def pytest_unconfigure(config):
    path = config.stash.get(_CACHE_KEY, None)
    if path:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(autouse=True)
def _strict_rank_promotion():
    with jax.numpy_rank_promotion("raise"):
        yield


@pytest.fixture
def x64():
    """Run the test body with 64-bit floats enabled (and restore the setting afterwards)."""
    with jax.enable_x64(True):
        yield
