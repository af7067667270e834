"""Pieces of the generic worker's loop that need no Ray: the per-step terms, the start-up clock."""

from __future__ import annotations


import pytest
import torch

from pipelines.train.worker import StartupClock, StepTerms, Worker


def _rank(world: int = 1) -> Worker:
    return Worker(task=None, cfg=None, stage=None, meta=None, rank=0, world=world, device=torch.device("cpu"),
                  hf=None, engine=None)


def test_step_terms_weight_each_micro_batch_by_its_window_and_average_the_steps():
    terms, w = StepTerms(), _rank()
    terms.add(torch.tensor([1.0, 2.0, 3.0, 4.0]), size=2)  # a window of two micro-batches
    terms.add(torch.tensor([3.0, 4.0, 5.0, 6.0]), size=2)
    first = terms.step(w)
    assert first == {"loss": 2.0, "ce": 3.0, "kd": 4.0, "sinkhorn": 5.0}
    terms.add(torch.tensor([10.0, 0.0, 0.0, 0.0]), size=1)  # the epoch's last, partial window
    second = terms.step(w)
    assert second["loss"] == 10.0 and second["ce"] == 0.0
    assert terms.means() == pytest.approx({"train_loss": 6.0, "train_ce": 1.5, "train_kd": 2.0, "train_sinkhorn": 2.5})


def test_step_terms_divide_the_rank_sum_by_the_world_size():
    """Two ranks: all_sum adds both ranks' windows; the logged value is their mean (here the fake
    world of 2 sums one rank's window only, so the logged value is half of it)."""
    terms = StepTerms()
    terms.add(torch.tensor([4.0, 2.0, 0.0, 0.0]), size=1)
    assert terms.step(_rank(world=1))["loss"] == 4.0
    w2 = _rank(world=2)
    w2.all_sum = lambda values: [2 * v for v in torch.as_tensor(values).tolist()]  # both ranks equal
    terms.add(torch.tensor([4.0, 2.0, 0.0, 0.0]), size=1)
    assert terms.step(w2) == {"loss": 4.0, "ce": 2.0, "kd": 0.0, "sinkhorn": 0.0}


def test_startup_clock_reports_each_phase_once_reached_from_the_fit_call():
    clock = StartupClock(fit_called=100.0)
    clock.marks = {"entered": 103.0}
    clock.mark("setup")
    clock.marks["setup"] = 110.0
    clock.mark("setup")  # a later mark of the same phase keeps the first time
    assert clock.marks["setup"] == 110.0
    assert clock.report() == {"startup_entered_s": 3.0, "startup_setup_s": 10.0}
    clock.marks.update(first_batch=111.5, first_step=114.25)
    assert clock.report() == {"startup_entered_s": 3.0, "startup_setup_s": 10.0, "startup_first_batch_s": 11.5,
                              "startup_first_step_s": 14.25}


def test_a_lone_cpu_rank_does_not_compile_deepspeeds_shared_memory_op(monkeypatch):
    """DeepSpeed's CPU comm backend compiles its shm all-reduce op when it starts (minutes on a fresh
    machine); a one-rank CPU stage marks it incompatible first, so build_shm_op never loads it."""
    import importlib

    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    from pipelines.train.engine import without_shm_comm_op

    ds_torch = importlib.import_module("deepspeed.comm.torch")  # `deepspeed.comm.torch` the attribute is torch itself
    builder = type(get_accelerator().create_op_builder("ShareMemCommBuilder"))
    monkeypatch.setitem(deepspeed.ops.__compatible_ops__, builder.NAME, True)  # buildable here; restored after
    monkeypatch.setattr(builder, "load", lambda self, *args, **kwargs: "compiled op")  # no compiler run
    assert ds_torch.build_shm_op() == "compiled op"
    without_shm_comm_op()
    assert ds_torch.build_shm_op() is None
