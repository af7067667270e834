"""sinkd pipelines: Ray Data -> Ray Train + DeepSpeed distillation -> evaluation -> export.

Thin recipes composing the field's libraries; the loss comes from the pure-PyTorch `sinkd` library.
Entry point: `sinkd train|eval|export` (pipelines.cli:main).
"""
