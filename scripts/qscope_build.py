"""The project's build backend: setuptools' own (``setuptools.build_meta``), with a quiet editable install.

pyproject.toml maps the top-level ``adapters/`` and ``recipes/`` folders into ``qscope_plugin`` (PyPI's
``adapters`` library owns that name), so setuptools installs ``pip install -e .`` through a meta path finder that
maps exactly ``qscope_plugin``, ``qscope_plugin.adapters`` and ``qscope_plugin.recipes`` to their folders. For
every install of that kind it emits the notice "Please be careful with folders in your working directory with the
same name as your package as they may take precedence during imports". Here the only such folder is
``qscope_plugin/`` itself, the very source the finder maps, and nothing else becomes importable; so this backend
drops that one notice and nothing else (tests/test_packaging.py builds an editable wheel and checks its mapping
and its silence). Everything else, and every non-editable build, is setuptools' unchanged.
"""

from __future__ import annotations

import warnings

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F403  (the PEP 517 / 660 hooks, re-exported)


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Editable installation\.")
        return _setuptools.build_editable(wheel_directory, config_settings, metadata_directory)
