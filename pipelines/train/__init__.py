"""Training one stage: the driver side (`fit_stage`: a TorchTrainer over the task's Ray datasets) and
the generic worker it runs on every rank (pipelines.train.worker), with DeepSpeed engines and live
progress. Export and evaluation need only pipelines.train.files."""
