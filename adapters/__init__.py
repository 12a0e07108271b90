"""Framework adapters, one module per framework; only that module imports its framework.

Installed as ``qscope_plugin.adapters`` (never as a top-level ``adapters`` package: PyPI's ``adapters``
library owns that name).
"""
