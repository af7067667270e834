"""A DeepSpeed checkpoint of a run -> a Hugging Face model directory (save_pretrained + tokenizer).

ZeRO-partitioned weights are consolidated with DeepSpeed's own zero_to_fp32; stage 0 checkpoints
hold the module whole. The result reloads with the Auto class of its task's model kind
(sinkd_task.json records the kind and, for T5-style classifiers, the label token ids).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..config import ConfigError
from ..config.uris import is_object_store, open_storage, short_reason, shown
from ..tasks import task_for_kind
from ..tasks.common import TASK_FILE, quiet_transformers
from ..train.files import DS_TAG, META_DIR, STATE_FILE


def latest_checkpoint(stage_dir: str | Path) -> Path:
    """The newest checkpoint Ray Train recorded for a stage in a local directory (RUN_DIR/ray/<stage>)."""
    stage_dir = Path(stage_dir)
    if not stage_dir.is_dir():
        raise FileNotFoundError(f"no training run at {stage_dir}")
    return Path(stage_checkpoint(str(stage_dir)).path)


def stage_checkpoint(stage_uri: str, filesystem=None):
    """The newest ray.train.Checkpoint of a stage's run, local or remote (`<ray.storage_path>/<stage>`,
    e.g. s3://bucket/run/sinkd); read it with `export_checkpoint`, which downloads it when remote."""
    from ray.train import Result

    try:
        result = Result.from_path(stage_uri, storage_filesystem=filesystem)
    except (FileNotFoundError, RuntimeError, OSError) as e:  # OSError: pyarrow's remote-storage errors
        raise FileNotFoundError(f"no training run at {stage_uri} ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if result.checkpoint is None:
        raise FileNotFoundError(f"{stage_uri}: the run has no checkpoint yet")
    return result.checkpoint


def consolidated_state_dict(checkpoint_dir: Path) -> dict:
    ds_dir = checkpoint_dir / DS_TAG
    if any(ds_dir.glob("*optim_states.pt")) and any(ds_dir.glob("zero_pp_rank_*")):
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with contextlib.redirect_stdout(io.StringIO()):  # its progress prints are not for our users
            state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=DS_TAG)
    else:  # ZeRO stage 0: the module's weights are whole in the model-states file
        state = torch.load(ds_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    return state


def split_module_state(state: dict) -> tuple[dict, dict[str, dict]]:
    """The DeepSpeed module is the task's wrapper (Classifier, CausalLM, PairLM) around `.model`:
    (the Hugging Face model's weights, prefix stripped; {other submodule: its weights}, e.g. DSKD's
    projectors, which are saved beside the model as <name>.pt)."""
    model, others = {}, {}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        if head == "model":
            model[rest] = value
        else:
            others.setdefault(head, {})[rest] = value
    return model, others


def export_checkpoint(checkpoint, out_dir: str | Path) -> Path:
    """Write a checkpoint's student (a local directory, or a ray.train.Checkpoint on any storage: it is
    read through `as_directory`, a download when remote) as a Hugging Face model in out_dir."""
    if isinstance(checkpoint, (str, Path)):
        return _export_dir(Path(checkpoint), Path(out_dir), str(checkpoint))
    with checkpoint.as_directory() as local:
        return _export_dir(Path(local), Path(out_dir), checkpoint_uri(checkpoint))


def export_to(checkpoint, out: str | Path) -> str:
    """export_checkpoint to a local directory, or to a storage URI (`s3://bucket/models/sinkd`):
    written locally first, then uploaded file by file, sinkd_task.json last (a reader that finds it
    finds a complete model). Returns where the model is."""
    out = str(out)
    if not is_object_store(out):
        return str(export_checkpoint(checkpoint, out))
    import pyarrow.fs

    fs, path = open_storage(out, "--out")
    with tempfile.TemporaryDirectory(prefix="sinkd-export-") as tmp:
        local = export_checkpoint(checkpoint, Path(tmp) / "model")
        task_file = (local / TASK_FILE).read_bytes()
        (local / TASK_FILE).unlink()
        try:
            fs.create_dir(path, recursive=True)
            pyarrow.fs.copy_files(str(local), path, destination_filesystem=fs)
            with fs.open_output_stream(f"{path.rstrip('/')}/{TASK_FILE}") as f:
                f.write(task_file)
        except (OSError, ValueError) as e:
            raise ConfigError(f"--out: cannot write to {shown(out)} ({short_reason(e)})") from None
    return shown(out)


def checkpoint_uri(checkpoint) -> str:
    """Where a checkpoint lives, as users would write it (s3://bucket/...; a plain path when local)."""
    import pyarrow.fs

    fs = checkpoint.filesystem
    if fs is None or isinstance(fs, pyarrow.fs.LocalFileSystem):
        return checkpoint.path
    return f"{fs.type_name}://{checkpoint.path.lstrip('/')}"


def _export_dir(checkpoint_dir: Path, out_dir: Path, source: str) -> Path:
    """Written beside out_dir, then moved into place, so an interrupted export never leaves a
    half-written model where a complete one is expected."""
    quiet_transformers()
    meta_dir = checkpoint_dir / META_DIR
    task = json.loads((meta_dir / TASK_FILE).read_text())
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(meta_dir)
    model = task_for_kind(task["kind"]).model_class(task["kind"]).from_config(config)
    weights, beside = split_module_state(consolidated_state_dict(checkpoint_dir))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = getattr(model, "_tied_weights_keys", None) or {}  # e.g. T5's lm_head -> shared embedding
    missing = [k for k in missing if k not in set(tied)]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {source} does not match the student: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    model.save_pretrained(tmp)
    for name, module_state in beside.items():  # trained with the student, not part of it
        torch.save(module_state, tmp / f"{name}.pt")
    AutoTokenizer.from_pretrained(meta_dir).save_pretrained(tmp)
    state = json.loads((checkpoint_dir / STATE_FILE).read_text())
    task.update(global_step=state["global_step"], epoch=state["epoch"], checkpoint=source)
    (tmp / TASK_FILE).write_text(json.dumps(task, indent=1))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir
