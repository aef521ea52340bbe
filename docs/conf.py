"""Sphinx configuration of rgnn's reference site: the API from the docstrings, and the notebooks.

Build (warnings are errors, so a docstring that breaks the build fails it):

    pip install -e ".[docs]"
    sphinx-build -W --keep-going -b html docs docs/_build/html

The notebooks (``docs/notebooks`` links to ``notebooks/``) are rendered as stored, without
executing them.
"""

import inspect
import os
import sys

sys.path.insert(0, os.path.abspath(".."))

import rgnn  # noqa: E402

project = "rgnn"
author = "the rgnn authors"
copyright = "the rgnn authors"
release = version = rgnn.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "myst_nb",
]

exclude_patterns = ["_build", "notebooks/README.md"]
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}

# autodoc: the names as rgnn exports them, in source order, with the signature's annotations
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_class_signature = "mixed"
autodoc_preserve_defaults = True

# napoleon: Google style (``Args:``, ``Returns:``, ``Attributes:``); attributes as a field list
# of the class, so that a dataclass field is not described twice
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True
napoleon_use_rtype = False

# notebooks: rendered as stored (they are committed without outputs), never executed
nb_execution_mode = "off"
myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 3

html_theme = "alabaster"
html_title = f"rgnn {release}"
html_theme_options = {"description": "The renormalization-group view of neural networks, in JAX"}


def _drop_type_docstring(app, what, name, obj, options, lines):
    """A constant (``rgnn.KNOWN_ACTIVATIONS``) has no docstring of its own: autodoc would show
    its type's (``tuple``'s); the page describes it instead."""
    own = [line.strip() for line in lines if line.strip()]
    typ = [line.strip() for line in (inspect.getdoc(type(obj)) or "").splitlines() if line.strip()]
    if what == "data" and own == typ:
        lines.clear()


def setup(app):
    app.connect("autodoc-process-docstring", _drop_type_docstring)
