"""Load neural-tangents 0.6.5 on current JAX, without TensorFlow.

neural-tangents 0.6.5 (the latest release) no longer imports on current JAX: it imports names
that JAX moved or removed, calls the private ``ad.linearize`` whose signature changed, and its
``__init__`` imports ``neural_tangents.experimental``, which imports TensorFlow through jax2tf.

Design. ``install()`` puts one finder at the front of ``sys.meta_path``. It answers only for
``neural_tangents`` and ``neural_tangents.*``; every other import goes on as before. It loads
each module from the installed package's own source after applying the exact textual rewrites
listed below (each must match the stated number of times, else ``ImportError``; each keeps the
line count, so tracebacks show the right lines of the installed files; no bytecode is cached,
so an import without the hook never sees rewritten code). ``neural_tangents.experimental`` is
replaced by a stub. Nothing is patched into ``jax``, ``neural_tangents`` or any other module at
run time; the only new module is the private ``rgnn._compat._jax_shims``, which the rewritten
source imports for the few removed JAX helpers.

Usage::

    import rgnn._compat

    nt = rgnn._compat.import_neural_tangents()  # or: install(); import neural_tangents

Install neural-tangents with ``pip install --no-deps neural-tangents==0.6.5`` (its declared
tensorflow and tf2jax dependencies are only for ``experimental``); it also needs
``frozendict``. Any other version is refused with an ``ImportError``.

What works: ``stax`` (init/apply/kernel functions), ``empirical_ntk_fn``, ``empirical_nngp_fn``,
``empirical_kernel_fn`` with every ``NtkImplementation``,
``monte_carlo_kernel_fn``, ``batch`` and ``predict``. ``neural_tangents.experimental``
(TensorFlow models) does not: any attribute of it, or import of a submodule, raises an
``ImportError`` that says it needs TensorFlow.

Rewrites of ``neural_tangents/_src/empirical.py``::

    =============================================  ============================================
    rewrite                                        why
    =============================================  ============================================
    ``from jax.core import X`` ->                  ``jax.core.X`` moved to ``jax.extend.core``
    ``from jax.extend.core import X`` for X in
    Jaxpr, JaxprEqn, Literal, Var; and the
    annotation ``core.Primitive`` ->
    ``jax.extend.core.Primitive``
    ``from jax.util import safe_map/safe_zip`` ->  ``jax.util`` was removed
    ``from rgnn._compat._jax_shims import ...``
    ``from jax.extend import linear_util as lu``   imports for the rewrites below; ``lu`` is
    -> ``from jax.extend import                    no longer used
    source_info_util; import
    rgnn._compat._jax_shims as _rgnn_shims``
    ``ad.source_info_util.`` ->                    ``jax.interpreters.ad`` no longer re-exports
    ``source_info_util.`` (3 times)                it (neural-tangents 0.6.6 makes this change)
    ``flatten_fun_nokwargs(lu.wrap_init(fn))`` +   the private ``ad.linearize`` changed its
    ``ad.linearize(...)`` in                       arguments and results; the shim gets the
    ``_get_primals_out_and_pullback`` ->           same (outputs, partial values, linear
    ``_rgnn_shims.linearize_to_jaxpr(fn,           ``Jaxpr``, residual constants) from public
    *primals_in)`` under ``jax.disable_jit()``     ``jax.linearize`` and ``jax.make_jaxpr``
    ``ad.reducing_transposes`` ->                  no longer exported (only collectives, never
    ``_rgnn_shims.reducing_transposes`` (twice)    in a stax network, registered such rules)
    the ``ad.config.jax_enable_checks`` block in   ``ad.config``, ``core.get_aval``,
    ``_write_cotangent`` -> the same check with    ``core.lattice_join`` and named shapes were
    ``jax.config`` and ``jax.typeof``              removed
    ``core.DShapedArray`` ->                       dynamic shapes were removed; the stand-in
    ``_rgnn_shims.DShapedArray``                   class matches no aval, as before for
                                                   static shapes
    ``e.compile().cost_analysis()[0]`` ->          ``cost_analysis()`` returns one dict, not a
    ``e.compile().cost_analysis()``                list (``AUTO`` implementation)
    ``eqn.primitive.call_primitive or              ``Primitive.map_primitive`` was removed
    eqn.primitive.map_primitive`` ->
    ``eqn.primitive.call_primitive``
    ``sum(map(jnp.size, leaves))`` ->              ``jnp.size`` of a ``ShapeDtypeStruct`` is
    ``sum(map(np.size, leaves))``                  deprecated
    ``tree_map(jnp.dtype, params)`` ->             ``np.dtype(jax_array)`` is deprecated
    ``tree_map(_rgnn_shims.dtype_of, params)``
    =============================================  ============================================

Rewrites of ``neural_tangents/_src/utils/rules.py``::

    =============================================  ============================================
    ``from jax.core import X`` ->                  moved to ``jax.extend.core``
    ``from jax.extend.core import X`` for X in
    Jaxpr, JaxprEqn, Literal, Primitive, Var
    the two rules for                              the ``zeros_like`` primitive was removed, so
    ``jax.interpreters.ad.zeros_like_p`` -> a      no jaxpr contains it
    comment
    =============================================  ============================================

Rewrites of ``neural_tangents/_src/predict.py``::

    =============================================  ============================================
    ``from jax.experimental import ode`` -> the    imports the shims used below
    same plus ``import rgnn._compat._jax_shims
    as _rgnn_shims``
    ``with jax.core.eval_context():`` (twice) ->   under stackless tracing, entering
    ``with _rgnn_shims.eval_context_unless_        ``eval_context`` while ``k_train_train`` is a
    traced(k_train_train):``                       tracer of an enclosing ``vmap``/``jit``
                                                   raises ``UnexpectedTracerError``; the shim
                                                   enters it only for concrete input
    ``sp.linalg.eigvalsh(..., eigvals=(...))`` ->  SciPy 1.14 removed ``eigvals=`` (the one
                                                   rewrite that is not about JAX)
    ``subset_by_index=(...)`` (``max_learning_
    rate``)
    =============================================  ============================================

Module replaced: ``neural_tangents.experimental`` -> a stub package whose attributes and
submodules raise ``ImportError`` (it imports TensorFlow via jax2tf).

The exact strings are in ``rgnn._compat._neural_tangents.REWRITES``. The measure is
neural-tangents' own test suite, run with ``tools/run_nt_upstream_tests.py``.
"""

from rgnn._compat._neural_tangents import import_neural_tangents, install

__all__ = ["import_neural_tangents", "install"]
