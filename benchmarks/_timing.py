"""Wall-time helper shared by the benchmark scripts (run as ``python benchmarks/<script>.py``,
which puts this folder on ``sys.path``)."""

import statistics
import time

import jax


def timed(fn, repeats):
    """``(median, min)`` wall time of ``fn()`` over ``repeats`` runs after one compiling run."""
    jax.block_until_ready(fn())  # compile and warm
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times)
