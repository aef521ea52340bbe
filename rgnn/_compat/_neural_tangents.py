"""Import hook that loads neural-tangents 0.6.5 on current JAX; see ``rgnn._compat``."""

import dataclasses
import importlib
import importlib.abc
import importlib.machinery
import importlib.metadata
import importlib.util
import sys
import threading
import types
from collections.abc import Sequence

__all__ = ["REWRITES", "Rewrite", "import_neural_tangents", "install"]

SUPPORTED_VERSION = "0.6.5"
_PACKAGE = "neural_tangents"
_EXPERIMENTAL = "neural_tangents.experimental"
_INSTALL_HINT = f"pip install --no-deps neural-tangents=={SUPPORTED_VERSION}"
# The rewritten source imports the shims by this absolute name, so it follows this package
# wherever it lives.
_SHIMS = __name__.rpartition(".")[0] + "._jax_shims"


@dataclasses.dataclass(frozen=True)
class Rewrite:
    """One exact textual replacement in one neural-tangents source file.

    Attributes:
      module: dotted name of the module whose source is rewritten.
      old: exact text to replace.
      new: replacement text.
      count: how many times ``old`` must occur; any other number raises ``ImportError``, so a
        rewrite never applies silently to source it was not written for.
      why: what changed in JAX.
    """

    module: str
    old: str
    new: str
    count: int
    why: str

    def __post_init__(self):
        # Equal line counts keep tracebacks pointing at the right line of the installed file.
        if self.old.count("\n") != self.new.count("\n"):
            raise ValueError(f"rewrite of {self.old!r} changes the number of lines")


def _from_extend_core(module: str, names: Sequence[str]) -> list[Rewrite]:
    return [
        Rewrite(
            module,
            f"from jax.core import {name}\n",
            f"from jax.extend.core import {name}\n",
            1,
            f"jax.core.{name} moved to jax.extend.core",
        )
        for name in names
    ]


_EMPIRICAL = "neural_tangents._src.empirical"
_RULES = "neural_tangents._src.utils.rules"
_PREDICT = "neural_tangents._src.predict"

REWRITES: tuple[Rewrite, ...] = (
    *_from_extend_core(_EMPIRICAL, ["Jaxpr", "JaxprEqn", "Literal", "Var"]),
    Rewrite(
        _EMPIRICAL,
        "from jax.util import safe_map as map\n",
        f"from {_SHIMS} import safe_map as map\n",
        1,
        "jax.util was removed",
    ),
    Rewrite(
        _EMPIRICAL,
        "from jax.util import safe_zip as zip\n",
        f"from {_SHIMS} import safe_zip as zip\n",
        1,
        "jax.util was removed",
    ),
    Rewrite(
        _EMPIRICAL,
        "from jax.extend import linear_util as lu\n",
        f"from jax.extend import source_info_util; import {_SHIMS} as _rgnn_shims\n",
        1,
        "import what the rewrites below use (lu is no longer used)",
    ),
    Rewrite(
        _EMPIRICAL,
        "ad.source_info_util.",
        "source_info_util.",
        3,
        "jax.interpreters.ad no longer re-exports source_info_util (neural-tangents 0.6.6 "
        "makes the same change)",
    ),
    Rewrite(
        _EMPIRICAL,
        """\
  fn_flat, out_tree = jax.api_util.flatten_fun_nokwargs(
      lu.wrap_init(fn), in_tree)

  # TODO(romann): handle call primitives more gracefully.
  with jax.disable_jit():
    outs = ad.linearize(fn_flat, *primals_in_flat, has_aux=False)

  primals_out, pvals, jaxpr, consts = outs
  primals_out = tree_unflatten(out_tree(), primals_out)
""",
        """\
  # rgnn._compat: public jax.linearize in place of the private ad.linearize.

  # TODO(romann): handle call primitives more gracefully.
  with jax.disable_jit():
    primals_out, pvals, jaxpr, consts = _rgnn_shims.linearize_to_jaxpr(
        fn, *primals_in)



""",
        1,
        "the private ad.linearize changed signature and results; use public jax.linearize "
        "and jax.make_jaxpr instead",
    ),
    Rewrite(
        _EMPIRICAL,
        "ad.reducing_transposes",
        "_rgnn_shims.reducing_transposes",
        2,
        "jax.interpreters.ad no longer exports reducing_transposes",
    ),
    Rewrite(
        _EMPIRICAL,
        """\
  if ad.config.jax_enable_checks:
    ct_aval = core.get_aval(ct_env[v])
    joined_aval = core.lattice_join(
        v.aval, ct_aval).strip_weak_type().strip_named_shape()
    assert v.aval.strip_weak_type().strip_named_shape() == joined_aval, (
        prim, v.aval, ct_aval)
""",
        """\
  if jax.config.jax_enable_checks:
    ct_aval = jax.typeof(ct_env[v])
    assert v.aval.strip_weak_type() == ct_aval.strip_weak_type(), (
        prim, v.aval, ct_aval)


""",
        1,
        "ad.config, core.get_aval, core.lattice_join and named shapes were removed",
    ),
    Rewrite(
        _EMPIRICAL,
        "prim: core.Primitive,",
        "prim: jax.extend.core.Primitive,",
        1,
        "jax.core.Primitive moved to jax.extend.core",
    ),
    Rewrite(
        _EMPIRICAL,
        "core.DShapedArray",
        "_rgnn_shims.DShapedArray",
        1,
        "jax.core.DShapedArray (dynamic shapes) was removed",
    ),
    Rewrite(
        _EMPIRICAL,
        "analysis = e.compile().cost_analysis()[0]",
        "analysis = e.compile().cost_analysis()",
        1,
        "Compiled.cost_analysis() returns one dict, not a list of per-device dicts",
    ),
    Rewrite(
        _EMPIRICAL,
        "if eqn.primitive.call_primitive or eqn.primitive.map_primitive:",
        "if eqn.primitive.call_primitive:",
        1,
        "Primitive.map_primitive was removed (with pmap's xla_pmap_p as a map primitive)",
    ),
    Rewrite(
        _EMPIRICAL,
        "ndim = sum(map(jnp.size, leaves))",
        "ndim = sum(map(np.size, leaves))",
        1,
        "jnp.size of a ShapeDtypeStruct is deprecated; np.size reads its .size",
    ),
    Rewrite(
        _EMPIRICAL,
        "tree_map(jnp.dtype, params)",
        "tree_map(_rgnn_shims.dtype_of, params)",
        1,
        "jnp.dtype(array) (numpy's implicit array-to-dtype conversion) is deprecated",
    ),
    Rewrite(
        _PREDICT,
        "from jax.experimental import ode\n",
        f"from jax.experimental import ode; import {_SHIMS} as _rgnn_shims\n",
        1,
        "import the shims used below",
    ),
    Rewrite(
        _PREDICT,
        "    with jax.core.eval_context():\n",
        "    with _rgnn_shims.eval_context_unless_traced(k_train_train):\n",
        2,
        "under stackless tracing, jax.core.eval_context() makes tracers of an enclosing "
        "transformation (e.g. vmap over predictions) escape; enter it only for concrete input",
    ),
    Rewrite(
        _PREDICT,
        "eigvals=(ntk_train_train.shape[0] - 1,",
        "subset_by_index=(ntk_train_train.shape[0] - 1,",
        1,
        "scipy.linalg.eigvalsh's eigvals= argument was removed in SciPy 1.14",
    ),
    *_from_extend_core(_RULES, ["Jaxpr", "JaxprEqn", "Literal", "Primitive", "Var"]),
    Rewrite(
        _RULES,
        """\
STRUCTURE_RULES[jax.interpreters.ad.zeros_like_p] = _eye_s
JACOBIAN_RULES[jax.interpreters.ad.zeros_like_p] = _zeros_like_j
""",
        "# rgnn._compat: zeros_like_p was removed from JAX.\n\n",
        1,
        "the zeros_like primitive was removed, so it needs no rule",
    ),
)


def _rewrite_source(module: str, source: str) -> str:
    for rewrite in REWRITES:
        if rewrite.module != module:
            continue
        found = source.count(rewrite.old)
        if found != rewrite.count:
            raise ImportError(
                f"rgnn._compat: expected {rewrite.count} occurrence(s) of {rewrite.old!r} in "
                f"{module}, found {found}; is neural-tangents {SUPPORTED_VERSION} installed "
                f"unmodified? Reinstall with `{_INSTALL_HINT}`."
            )
        source = source.replace(rewrite.old, rewrite.new)
    return source


class _RewritingLoader(importlib.machinery.SourceFileLoader):
    """Loads a neural-tangents module from its installed source after applying ``REWRITES``.

    It never reads or writes ``__pycache__``: a cached file would carry the rewritten code to
    an import without the hook, and a stale one would skip the rewrites.
    """

    def path_stats(self, path: str) -> dict[str, float]:
        raise OSError("rgnn._compat compiles neural-tangents without bytecode caching")

    def source_to_code(self, data, path, *, _optimize=-1):
        source = _rewrite_source(self.name, importlib.util.decode_source(data))
        return super().source_to_code(source, path, _optimize=_optimize)


class _ExperimentalStub(types.ModuleType):
    """Stands in for ``neural_tangents.experimental``, which imports TensorFlow."""

    def __getattr__(self, name: str):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        raise ImportError(_experimental_message(f"{_EXPERIMENTAL}.{name}"))


def _experimental_message(what: str) -> str:
    return (
        f"{what} is not available under rgnn._compat: neural_tangents.experimental converts "
        "TensorFlow models with jax2tf and needs tensorflow and tf2jax, which rgnn does not "
        "install. Use the JAX functions (neural_tangents.empirical_ntk_fn, ...) instead."
    )


class _ExperimentalLoader(importlib.abc.Loader):
    def create_module(self, spec):
        return _ExperimentalStub(spec.name, "Stub; attribute access raises ImportError.")

    def exec_module(self, module) -> None:
        module.__path__ = []  # a package, so that submodule imports reach the finder


class _NeuralTangentsFinder(importlib.abc.MetaPathFinder):
    """Finds ``neural_tangents`` and ``neural_tangents.*``; every other import is left alone."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != _PACKAGE and not fullname.startswith(_PACKAGE + "."):
            return None
        if fullname == _EXPERIMENTAL:
            return importlib.machinery.ModuleSpec(fullname, _ExperimentalLoader(), is_package=True)
        if fullname.startswith(_EXPERIMENTAL + "."):
            raise ImportError(_experimental_message(fullname), name=fullname)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or not isinstance(spec.loader, importlib.machinery.SourceFileLoader):
            return spec
        spec.loader = _RewritingLoader(fullname, spec.origin)
        spec.cached = None
        return spec


_FINDER = _NeuralTangentsFinder()
_LOCK = threading.Lock()


def _check_installed_version() -> None:
    try:
        version = importlib.metadata.version("neural-tangents")
    except importlib.metadata.PackageNotFoundError:
        raise ImportError(
            "neural-tangents is not installed; rgnn needs version "
            f"{SUPPORTED_VERSION} without its TensorFlow dependencies: `{_INSTALL_HINT}`."
        ) from None
    if version != SUPPORTED_VERSION:
        raise ImportError(
            f"rgnn._compat supports neural-tangents {SUPPORTED_VERSION} only, found {version}; "
            f"install the supported version with `{_INSTALL_HINT}`."
        )


def install() -> None:
    """Installs the neural-tangents import hook; a second call does nothing.

    Raises:
      ImportError: neural-tangents is missing, is not version 0.6.5, or was already imported
        without the hook (restart Python and call ``install()`` before importing it).
    """
    with _LOCK:
        if _FINDER in sys.meta_path:
            return
        _check_installed_version()
        loaded = sorted(
            name for name in sys.modules if name == _PACKAGE or name.startswith(_PACKAGE + ".")
        )
        if loaded:
            raise ImportError(
                f"{loaded[0]} was imported before rgnn._compat.install(), so it was loaded "
                "without the compatibility rewrites. Call rgnn._compat.install() (or "
                "import_neural_tangents()) before the first import of neural_tangents."
            )
        sys.meta_path.insert(0, _FINDER)


def import_neural_tangents() -> types.ModuleType:
    """Calls ``install()`` and returns the imported ``neural_tangents`` module."""
    install()
    return importlib.import_module(_PACKAGE)
