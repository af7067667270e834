"""`python -m sinkd`: a one-screen demo of the objective on random logits (no model, no data)."""

import argparse
import time

import torch

from . import DistillationObjective, ObjectiveConfig, SinkhornConfig, sinkhorn_loss


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=256, help="rows N (samples or tokens)")
    parser.add_argument("--vocab", type=int, default=8000, help="vocabulary / classes V")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    teacher = 3 * torch.randn(args.rows, args.vocab)
    student = (teacher + 2 * torch.randn_like(teacher)).requires_grad_()
    labels = teacher.argmax(-1)
    print(f"{'loss':<34}{'value':>10}{'fwd+bwd ms':>12}")
    cases = {
        "sinkhorn, paper preset": lambda: sinkhorn_loss(student, teacher, SinkhornConfig.paper()),
        "sinkhorn, uniform, eps=0.05": lambda: sinkhorn_loss(student, teacher, eps=0.05),
        "sinkhorn, groups of 64 rows": lambda: sinkhorn_loss(student, teacher, group_size=64),
        "CE + 1.0*KL + 1.0*Sinkhorn (paper)": lambda: DistillationObjective(ObjectiveConfig.paper())(student, teacher, labels).loss,
    }
    for name, fn in cases.items():
        start = time.perf_counter()
        value = fn()
        value.backward()
        print(f"{name:<34}{value.item():>10.4f}{1000 * (time.perf_counter() - start):>12.1f}")


if __name__ == "__main__":
    main()
