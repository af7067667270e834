"""sinkd pipelines: Ray Data -> Ray Train + DeepSpeed distillation -> evaluation -> export.

Thin recipes composing the field's libraries; the loss comes from the pure-PyTorch `sinkd` library.
Entry point: `sinkd train|eval|export|tune|submit` (pipelines.cli:main). Layers, one way:
cli -> recipes -> train -> tasks -> config -> sinkd (docs/architecture.md).
"""
