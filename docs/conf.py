"""Sphinx configuration: build with ``sphinx-build -W --keep-going -b html docs docs/_build/html``."""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "_ext"))
sys.path.insert(0, str(HERE.parent))

import entitysync_sync  # noqa: E402

project = "entitysync_sync"
author = "the entitysync_sync authors"
copyright = "the entitysync_sync authors"
release = version = entitysync_sync.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "settings_reference",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]

myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented"
autodoc_default_options = {"members": True}

html_theme = "furo"
html_title = f"entitysync_sync {release}"
html_static_path: list[str] = []
