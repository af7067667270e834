"""sinkd: knowledge distillation with the batch-wise Sinkhorn objective (SinKD), in plain PyTorch.

    from sinkd import sinkhorn, sinkhorn_loss, divergence, DistillationObjective, ObjectiveConfig
    from sinkd import TopKDistribution  # a logit cache's teacher: TopKDistribution.from_logits(logits, k)
    from sinkd import uld_loss, multilevel_ot_loss  # teacher and student with different vocabularies
    from sinkd import RankedLogits  # a cached teacher for them: RankedLogits.from_logits(logits, width, temperatures)

No Ray or DeepSpeed import here: the objective drops into any training loop.
"""

from .costs import COSTS, ChunkedL1, cost_matrix, l1_cost
from .cross_vocab import MultiLevelOTConfig, MultiLevelOTOutput, multilevel_ot_loss, ranked_probs, uld_loss
from .divergences import DIVERGENCES, divergence, rowwise_divergence
from .ranked import RankedLogits
from .objective import DistillationObjective, ObjectiveConfig, ObjectiveOutput
from .sinkhorn import SinkhornResult, sinkhorn
from .sinkhorn_loss import SinkhornConfig, sinkhorn_loss
from .topk import TopKDistribution, topk_l1_cost

__all__ = [
    "COSTS", "DIVERGENCES", "ChunkedL1", "DistillationObjective", "ObjectiveConfig", "ObjectiveOutput",
    "SinkhornConfig", "SinkhornResult", "cost_matrix", "divergence", "l1_cost", "rowwise_divergence",
    "sinkhorn", "sinkhorn_loss", "TopKDistribution", "topk_l1_cost",
    "MultiLevelOTConfig", "MultiLevelOTOutput", "multilevel_ot_loss", "ranked_probs", "uld_loss", "RankedLogits",
]
__version__ = "0.1.0"
