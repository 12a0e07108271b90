"""The Qwen-Scope report's methods as reusable recipes, one module per report section.

Installed as ``qscope_plugin.recipes``. Recipes work on activations and accept any backend.
"""
