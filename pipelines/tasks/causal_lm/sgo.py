"""Student-generated outputs (SGO), GKD-style mixing (`lm.sgo.mode: mixed`).

With probability `lm.sgo.fraction` a training micro-batch of prompt/response rows is replaced by
one whose responses the student samples itself from the rows' prompts (Hugging Face `generate`, KV
cache, temperature / top-p / top-k); the live teacher then scores those tokens like any other, and
the objective's KD and Sinkhorn terms run on them (Agarwal et al., GKD, arXiv 2306.13649; TRL's
`lmbda`). The coin is one draw of `numpy.random.default_rng((seed, epoch, micro))`, the same on
every rank (ranks generate together, which ZeRO-3's gathers would need), and sampling uses the
per-micro-batch torch seed the worker sets, so a resumed run generates exactly what the first did.
Every prompt gets exactly `max_new_tokens` new tokens (the end token is suppressed): shapes depend
on the prompts only.
"""

from __future__ import annotations

import numpy as np
import torch

from .data import IGNORE


def student_generates(seed: int, fraction: float, epoch: int, micro: int) -> bool:
    """Whether micro-batch `micro` of `epoch` is student-generated (identical on every rank)."""
    return bool(np.random.default_rng((seed, epoch, micro)).random() < fraction)


def prompt_lengths(labels: torch.Tensor) -> torch.Tensor:
    """(B,) tokens before each row's first label; 0 for a row without labels (padding)."""
    labelled = labels != IGNORE
    first = labelled.to(torch.int64).argmax(dim=1)
    return torch.where(labelled.any(dim=1), first, torch.zeros_like(first))


def sample_continuations(model, prompts: list[list[int]], pad_id: int, sgo) -> torch.Tensor:
    """(n, sgo.max_new_tokens) tokens the model appends to each prompt: one batched `generate` over
    the prompts left-padded (positions follow the attention mask), in eval mode, without grad."""
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
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
    finally:
        model.train(was_training)
    return out[:, width:]


def generated_batch(model, batch: dict, pad_id: int, sgo) -> dict:
    """The micro-batch with each row's response replaced by the student's sample: prompt + new
    tokens, right-padded as LMCollate pads; labels -100 on the prompt, the new tokens after it.
    Rows without a prompt (padding rows, which have no labels, or a record with an empty prompt)
    stay as they are; `ids` is kept (the epoch's id checksum)."""
    ids, labels = batch["input_ids"], batch["labels"]
    lengths = prompt_lengths(labels).tolist()
    real = [i for i, n in enumerate(lengths) if n > 0]
    if not real:
        return batch
    new = sample_continuations(model, [ids[i, :lengths[i]].tolist() for i in real], pad_id, sgo).cpu()
    n_new = new.shape[1]
    width = max(max(lengths[i] for i in real) + n_new, ids.shape[1] if len(real) < len(lengths) else 0)
    out_ids = torch.full((len(lengths), width), pad_id, dtype=ids.dtype)
    out_labels = torch.full_like(out_ids, IGNORE)
    out_mask = torch.zeros_like(out_ids)
    kept = [i for i in range(len(lengths)) if i not in real]
    old = ids.shape[1]
    out_ids[kept, :old], out_labels[kept, :old], out_mask[kept, :old] = ids[kept], labels[kept], batch["attention_mask"][kept]
    for row, i in enumerate(real):
        n = lengths[i]
        out_ids[i, :n], out_ids[i, n:n + n_new] = ids[i, :n], new[row]
        out_labels[i, n:n + n_new] = new[row]
        out_mask[i, :n + n_new] = 1
    return {**batch, "input_ids": out_ids, "labels": out_labels, "attention_mask": out_mask}
