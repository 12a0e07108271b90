"""The demo: a small trained Qwen3-architecture model with Qwen-Scope-format SAEs, shipped in ``assets/``.

``assets/`` is produced by ``scripts/build_demo.py`` (deterministic; see its docstring for sources and timings) and
``run.py`` is what ``qscope demo`` runs. The SAEs load like any release: ``load_sae("qscope-demo-qwen3-4l", 2)``.
"""
