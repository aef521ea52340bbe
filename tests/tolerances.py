"""The suite's one tolerance table, keyed by dtype, and the Monte Carlo rules.

* ``EXACT``: two evaluations of the same mathematics (closed form vs closed form, the same
  quadrature rule in two codes, jit vs no jit); only floating-point roundoff separates them.
  Kernels pass through at most ~11 layers of O(10) flops each, so roundoff stays within a few
  hundred ulps: 1e-9 in float64 (the issue's contract) is that with a wide margin.
* ``QUADRATURE``: a quadrature result against a closed form; the measured convergence of the
  rule (order vs 2*order) on the tested kernels is below 1e-11 for the smooth activations.
* ``MC_SIGMAS``: a Monte Carlo mean agrees with its prediction within this many standard
  errors (computed from the sample itself, never tuned); with ~50 independent comparisons per
  test a 4-sigma rule gives a false-alarm rate below 0.5%.
"""

import jax.numpy as jnp

EXACT = {
    jnp.dtype("float64"): dict(rtol=1e-9, atol=1e-12),
    jnp.dtype("float32"): dict(rtol=2e-5, atol=1e-6),
}
QUADRATURE = {
    jnp.dtype("float64"): dict(rtol=1e-9, atol=1e-11),
    jnp.dtype("float32"): dict(rtol=1e-4, atol=1e-5),
}
MC_SIGMAS = 4.0


def tol(table, dtype):
    """The ``rtol``/``atol`` keyword arguments for ``dtype`` from ``table``."""
    return table[jnp.dtype(dtype)]
