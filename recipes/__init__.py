"""The Qwen-Scope report's methods as reusable recipes, one module per report section.

Installed as ``qscope_plugin.recipes``. Recipes work on activations and accept any backend: every model they run
goes through ``qscope_plugin.backends`` and every texts -> SAE codes pass through ``harvest``.
"""

from qscope_plugin.recipes._harvest import LastFeatures, MaxActivations, TextCodes, harvest
from qscope_plugin.recipes.inspection import FeatureCard, feature_cards
from qscope_plugin.recipes.quality import LayerQuality, QualityReport, evaluate_saes

__all__ = ["FeatureCard", "LastFeatures", "LayerQuality", "MaxActivations", "QualityReport", "TextCodes",
           "evaluate_saes", "feature_cards", "harvest"]
