"""Student-generated outputs (SGO): GKD-style mixing (`lm.sgo.mode: mixed`) and DistiLLM-style
replay (`lm.sgo.mode: replay`).

With probability `lm.sgo.fraction` a training micro-batch of prompt/response rows is replaced by
one whose responses the student samples itself from the rows' prompts (Hugging Face `generate`, KV
cache, temperature / top-p / top-k); the live teacher then scores those tokens like any other, and
the objective's KD and Sinkhorn terms run on them (Agarwal et al., GKD, arXiv 2306.13649; TRL's
`lmbda`). The coin is one draw of `numpy.random.default_rng((seed, epoch, micro))`, the same on
every rank, and sampling uses the per-micro-batch torch seed the worker sets, so a resumed run
generates exactly what the first did. Every prompt gets exactly `max_new_tokens` new tokens (the end
token is suppressed): shapes depend on the prompts only. Under ZeRO-3 every forward gathers the
student's parameters from all ranks, so the ranks generate in lockstep: a rank with no prompt in its
micro-batch (padding rows only) still runs `generate` on a placeholder, and whether a buffer has rows
to replay is decided over all ranks.

Replay (Ko et al., DistiLLM, arXiv 2402.03898, its released `finetune.py` with a fixed threshold):
with tau = `fraction` and training progress t in [0, 1), a micro-batch is freshly generated with
probability tau (1 - t) (its rows then join this rank's FIFO buffer of `replay_capacity` rows), is
drawn from the buffer with probability tau t, and is the data's otherwise: early batches sample, later
ones mostly reuse samples of an older student. The buffer is per rank and is saved in every
checkpoint (the worker's `task_state`), so resume stays exact.
"""

from __future__ import annotations

import numpy as np
import torch

from .data import IGNORE
from .models import in_lockstep


FRESH, REPLAY, DATA = "fresh", "replay", "data"
BUFFER = "sgo_buffer"  # the key of the replay rows in the worker's task_state: [[input_ids, labels], ...]


def batch_source(sgo, seed: int, epoch: int, micro: int, progress: float) -> str:
    """FRESH, REPLAY or DATA for one micro-batch, from one draw shared by the ranks (`progress`: the
    share of the stage's micro-batches before this one)."""
    r = np.random.default_rng((seed, epoch, micro)).random()
    if sgo.mode == "mixed":
        return FRESH if r < sgo.fraction else DATA
    if r < sgo.fraction * (1 - progress):
        return FRESH
    return REPLAY if r < sgo.fraction else DATA


def push_rows(buffer: list, batch: dict, capacity: int) -> None:
    """Append the batch's labelled rows (without their padding) to a FIFO of at most `capacity` rows."""
    for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
        if bool((labels != IGNORE).any()):
            n = int(mask.sum())
            buffer.append([ids[:n].tolist(), labels[:n].tolist()])
    del buffer[:max(0, len(buffer) - capacity)]


def rebuilt_batch(batch: dict, rows: dict, pad_id: int) -> dict:
    """The micro-batch with row i replaced by rows[i] = (input_ids, labels), right-padded as LMCollate
    pads (mask 1 on each new row's tokens); the other rows and `ids` stay as they are."""
    n, old = batch["input_ids"].shape
    kept = [i for i in range(n) if i not in rows]
    width = max([len(ids) for ids, _ in rows.values()] + ([old] if kept else []))
    out_ids = torch.full((n, width), pad_id, dtype=batch["input_ids"].dtype)
    out_labels, out_mask = torch.full_like(out_ids, IGNORE), torch.zeros_like(out_ids)
    if kept:  # then width >= the batch's
        out_ids[kept, :old], out_labels[kept, :old] = batch["input_ids"][kept], batch["labels"][kept]
        out_mask[kept, :old] = batch["attention_mask"][kept]
    for i, (ids, labels) in rows.items():
        out_ids[i, :len(ids)], out_labels[i, :len(ids)], out_mask[i, :len(ids)] = torch.as_tensor(ids), torch.as_tensor(labels), 1
    return {**batch, "input_ids": out_ids, "labels": out_labels, "attention_mask": out_mask}


def replayed_batch(buffer: list, batch: dict, pad_id: int, rng: np.random.Generator) -> dict:
    """The micro-batch with each labelled row replaced by a buffer row (drawn without replacement
    while the buffer has enough); padding rows and `ids` stay."""
    real = [i for i, labels in enumerate(batch["labels"]) if bool((labels != IGNORE).any())]
    picks = rng.choice(len(buffer), size=len(real), replace=len(buffer) < len(real))
    return rebuilt_batch(batch, {i: buffer[k] for i, k in zip(real, picks)}, pad_id)


def prompt_lengths(labels: torch.Tensor) -> torch.Tensor:
    """(B,) tokens before each row's first label; 0 for a row without labels (padding)."""
    labelled = labels != IGNORE
    first = labelled.to(torch.int64).argmax(dim=1)
    return torch.where(labelled.any(dim=1), first, torch.zeros_like(first))


def sample_continuations(model, prompts: list[list[int]], pad_id: int, sgo, synced: bool = False) -> torch.Tensor:
    """(n, sgo.max_new_tokens) tokens the model appends to each prompt: one batched `generate` over
    the prompts left-padded (positions follow the attention mask), in eval mode, without grad.
    synced: the model is ZeRO-3-partitioned over several ranks (`generate(synced_gpus=True)`)."""
    from transformers import GenerationConfig

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    device = next(model.parameters()).device
    greedy = sgo.temperature == 0
    config = GenerationConfig(do_sample=not greedy, temperature=None if greedy else sgo.temperature,
                              top_p=None if greedy else sgo.top_p, top_k=None if greedy else sgo.top_k,
                              max_new_tokens=sgo.max_new_tokens, min_new_tokens=sgo.max_new_tokens,
                              eos_token_id=model.generation_config.eos_token_id, pad_token_id=pad_id, use_cache=True)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config,
                                 synced_gpus=synced)
    finally:
        model.train(was_training)
    return out[:, width:]


def generated_batch(model, batch: dict, pad_id: int, sgo, synced: bool = False) -> dict:
    """The micro-batch with each row's response replaced by the student's sample: prompt + new
    tokens (rebuilt_batch); labels -100 on the prompt, the new tokens after it.
    Rows without a prompt (padding rows, which have no labels, or a record with an empty prompt)
    stay as they are; `ids` is kept (the epoch's id checksum). synced (ZeRO-3 over several ranks):
    a batch without prompts still runs `generate`, on one placeholder token, whose output is dropped."""
    ids, labels = batch["input_ids"], batch["labels"]
    lengths = prompt_lengths(labels).tolist()
    real = [i for i, n in enumerate(lengths) if n > 0]
    if not real:
        if synced:  # the other ranks' generate gathers parameters from this one at every new token
            sample_continuations(model, [[pad_id]], pad_id, sgo, synced=True)
        return batch
    new = sample_continuations(model, [ids[i, :lengths[i]].tolist() for i in real], pad_id, sgo, synced).cpu()
    rows = {}
    for row, i in enumerate(real):
        prompt = ids[i, :lengths[i]]
        rows[i] = (torch.cat([prompt, new[row].to(ids.dtype)]), torch.cat([torch.full_like(prompt, IGNORE), new[row].to(ids.dtype)]))
    return rebuilt_batch(batch, rows, pad_id)


def sgo_batch(w, batch: dict) -> tuple[dict, bool]:
    """(the micro-batch to train on, whether the student generated it) for a worker (WorkerContext):
    the data's batch, the student's fresh samples of its prompts, or (replay) rows of this rank's buffer."""
    sgo = w.cfg.lm.sgo
    if sgo.mode is None or w.stage.objective is None:  # fine-tuning stages never sample
        return batch, False
    epoch, micro = w.position
    per_epoch = w.meta.batches_per_epoch
    source = batch_source(sgo, w.cfg.seed, epoch, micro, (epoch * per_epoch + micro) / (per_epoch * w.stage.train.epochs))
    if source == DATA:
        return batch, False
    synced = in_lockstep(w)  # ZeRO-3: the ranks generate together or not at all
    buffer = w.task_state.setdefault(BUFFER, []) if sgo.mode == "replay" else None
    if source == REPLAY and replayable(w, buffer, synced):  # an empty buffer (the first draws) samples afresh instead
        return replayed_batch(buffer, batch, w.meta.pad_token_id, np.random.default_rng((w.cfg.seed, epoch, micro, w.rank))), True
    out = generated_batch(w.engine.module.model, batch, w.meta.pad_token_id, sgo, synced)
    if buffer is not None:
        push_rows(buffer, out, sgo.replay_capacity)
    return out, True


def replayable(w, buffer: list, synced: bool) -> bool:
    """Whether this micro-batch replays buffered rows: the buffer has some, on every rank when the
    ranks must generate together (a rank whose micro-batches held only padding rows has none)."""
    if not synced:
        return bool(buffer)
    return w.all_sum([0.0 if buffer else 1.0])[0] == 0
