"""Presentation of features: the local web app (`qscope app`) and the self-contained HTML dashboard.

Nothing here computes; it shows what `qscope_plugin.recipes` returns.
"""

GRADIO_MISSING = "the web app needs Gradio; install the extra: pip install 'qscope-plugin[app]'"
