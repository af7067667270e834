"""The public entry points are documented POT-style, and their docstring examples run."""

import doctest
import importlib

import pytest
import torch

import sinkd

MODULES = ["sinkd.sinkhorn", "sinkd.sinkhorn_loss", "sinkd.divergences", "sinkd.costs", "sinkd.objective", "sinkd.topk", "sinkd.implicit"]
DOCUMENTED = {
    "sinkhorn": sinkd.sinkhorn,
    "sinkhorn_loss": sinkd.sinkhorn_loss,
    "divergence": sinkd.divergence,
    "cost_matrix": sinkd.cost_matrix,
    "DistillationObjective": sinkd.DistillationObjective,
    "DistillationObjective.__call__": sinkd.DistillationObjective.__call__,
    "TopKDistribution.from_logits": sinkd.TopKDistribution.from_logits,
    "TopKDistribution.from_probs": sinkd.TopKDistribution.from_probs,
    "topk_l1_cost": sinkd.topk_l1_cost,
    "implicit.transport_cost_grad": importlib.import_module("sinkd.implicit").transport_cost_grad,
}


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    torch.set_default_dtype(torch.float32)  # as a user's session (the autouse fixture restores float64 after)
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, result
    assert result.attempted > 0, f"{name} has no docstring example"


@pytest.mark.parametrize("name", sorted(DOCUMENTED))
def test_entry_point_documents_parameters_returns_and_more(name):
    doc = DOCUMENTED[name].__doc__ or ""
    sections = ["Parameters", "Returns"] if name.endswith("__call__") else ["Parameters", "Returns", "Examples", ">>> "]
    if name in ("sinkhorn", "sinkhorn_loss", "divergence", "cost_matrix", "DistillationObjective"):
        sections += ["References", "2402.17110"]
    if name == "DistillationObjective":
        sections.remove("Returns")  # the class documents its constructor; __call__ documents the result
    missing = [s for s in sections if s not in doc]
    assert not missing, f"{name}: docstring lacks {missing}"


def test_references_name_cuturi_and_distillm_where_they_apply():
    assert "1306.0895" in sinkd.sinkhorn.__doc__ and "1306.0895" in sinkd.sinkhorn_loss.__doc__
    assert "2402.03898" in sinkd.divergence.__doc__
