"""Scores as GLUE reports them, and batch inference of exported models with Ray Data.

Metrics come from scikit-learn and SciPy (the implementations GLUE's own evaluation uses).
`evaluate_model` runs an exported Hugging Face model over a split with `map_batches` and a callable
class (one model load per actor), then scores the predictions on the driver.
"""

from __future__ import annotations

import numpy as np

# The metrics GLUE reports per task; the first one is the headline score.
GLUE_METRICS = {
    "cola": ["matthews"],
    "sst2": ["accuracy"],
    "mrpc": ["f1", "accuracy"],
    "qqp": ["f1", "accuracy"],
    "stsb": ["pearson", "spearman"],
    "mnli": ["accuracy"],
    "qnli": ["accuracy"],
    "rte": ["accuracy"],
    "wnli": ["accuracy"],
}


def metric_names(task: str | None, num_labels: int) -> list[str]:
    if task and task.lower() in GLUE_METRICS:
        return GLUE_METRICS[task.lower()]
    return ["accuracy", "f1", "matthews"] if num_labels > 1 else ["pearson", "spearman"]


def compute_metrics(names: list[str], predictions, labels) -> dict[str, float]:
    """predictions: class ids (or scores for pearson/spearman); f1 is binary for 2 classes, else macro."""
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    p, y = np.asarray(predictions), np.asarray(labels)
    out = {}
    for name in names:
        if name == "accuracy":
            out[name] = float(accuracy_score(y, p))
        elif name == "f1":
            out[name] = float(f1_score(y, p, average="binary" if len(np.unique(y)) <= 2 and y.max(initial=0) <= 1 else "macro",
                                       zero_division=0))
        elif name == "matthews":
            out[name] = float(matthews_corrcoef(y, p))
        elif name == "pearson":
            out[name] = float(pearsonr(p, y)[0])
        elif name == "spearman":
            out[name] = float(spearmanr(p, y)[0])
        else:
            raise ValueError(f"unknown metric {name!r}")
    return out


class Predictor:
    """Ray Data callable class: an exported model, loaded once per actor, predicting padded batches."""

    def __init__(self, model_dir: str, num_threads: int | None = None, meta: dict | None = None, device: str = "cpu"):
        """meta: num_labels, label_names, label_token_ids (default: the model's sinkd_task.json);
        device: "cuda" in an actor given a GPU."""
        import torch

        from ..shipping import fetch
        from .data import PadCollate
        from .models import Classifier, load_pretrained, model_kind, read_task_file

        if num_threads:
            torch.set_num_threads(num_threads)
        model_dir = fetch(model_dir)  # a shipped folder: this node's copy
        meta = meta or read_task_file(model_dir) or {}
        kind = model_kind(model_dir)
        num_labels = meta.get("num_labels") or 2
        hf = load_pretrained(model_dir, kind, num_labels, meta.get("label_names"))
        self.device = device
        self.model = Classifier(hf, kind, meta.get("label_token_ids")).to(device).eval()
        self.collate = PadCollate(hf.config.pad_token_id if hf.config.pad_token_id is not None else 0)

    def __call__(self, batch) -> dict:
        import torch

        from .models import model_inputs

        tensors = self.collate(batch)
        with torch.no_grad():
            logits = self.model(**model_inputs(tensors, self.device)).float().cpu()
        return {"id": tensors["ids"].numpy(), "label": tensors["labels"].numpy(),
                "pred": logits.argmax(-1).numpy(), "logits": logits.numpy()}


def predict(model_dir: str, tokens, batch_size: int = 64, cpus: float = 1.0, actors: int = 1, meta: dict | None = None,
            gpus: float = 0.0):
    """Predictions (and logits) of a model over a tokenised Arrow table (ClassificationData.tokenized),
    by up to `actors` Ray Data actors of `cpus` CPUs (and `gpus` GPUs) each (as many as fit start;
    one is enough to finish); meta: what Predictor needs when the model has no sinkd_task.json."""
    from ray.data import ActorPoolStrategy

    from ..common import PAD_ID, actor_resources, to_frame
    from .data import to_ray

    ds = to_ray(tokens, 1, blocks=max(1, min(64, tokens.num_rows // batch_size)))  # work for every actor
    out = ds.map_batches(Predictor, fn_constructor_kwargs={"model_dir": model_dir, "num_threads": max(1, int(cpus)), "meta": meta,
                                                           "device": "cuda" if gpus else "cpu"},
                         batch_size=batch_size, batch_format="pyarrow", **actor_resources(cpus, gpus),
                         compute=ActorPoolStrategy(min_size=1, max_size=actors))
    frame = to_frame(out)
    frame = frame[frame["id"] != PAD_ID].sort_values("id")
    return frame


def evaluate_model(model_dir: str, tokens, names: list[str], batch_size: int = 64,
                   cpus: float = 1.0, actors: int = 1, gpus: float = 0.0) -> dict[str, float]:
    frame = predict(model_dir, tokens, batch_size, cpus, actors, gpus=gpus)
    return compute_metrics(names, frame["pred"].to_numpy(), frame["label"].to_numpy())
