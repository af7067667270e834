"""Up-front input checks: every error is one line that names the offending argument."""

from __future__ import annotations

import math
from typing import Iterable

import torch


def check_choice(field: str, value: str, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{field}: unknown value {value!r}; valid: {', '.join(choices)}")
    return value


def check_positive(field: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{field} must be a finite number > 0, got {value!r}")
    return float(value)


def check_nonnegative(field: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{field} must be a finite number >= 0, got {value!r}")
    return float(value)


def check_int_at_least(field: str, value: int, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{field} must be an integer >= {low}, got {value!r}")
    return value


def check_open_unit(field: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ValueError(f"{field} must be in (0, 1), got {value!r}")
    return float(value)


def check_finite(field: str, tensor: torch.Tensor) -> None:
    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        bad = (~finite).nonzero()[0].tolist()
        raise ValueError(f"{field} has non-finite values (first at index {tuple(bad)})")


def check_logits(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> None:
    """Shapes agree (same rows, same vocabulary), at least (N, V), all values finite."""
    for field, t in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{field} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() < 2:
            raise ValueError(f"{field} must have shape (N, V) or (B, L, V), got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{field} must be floating point, got {t.dtype}")
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise ValueError(
            f"vocabulary mismatch: student_logits has V={student_logits.shape[-1]}, "
            f"teacher_logits has V={teacher_logits.shape[-1]}"
        )
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"shape mismatch: student_logits {tuple(student_logits.shape)} vs teacher_logits {tuple(teacher_logits.shape)}"
        )
    check_finite("student_logits", student_logits)
    check_finite("teacher_logits", teacher_logits)


def check_mask(mask: torch.Tensor | None, row_shape: torch.Size) -> torch.Tensor | None:
    """A boolean mask over the rows (all dims but the vocabulary); returns it flattened."""
    if mask is None:
        return None
    if tuple(mask.shape) != tuple(row_shape):
        raise ValueError(f"mask shape {tuple(mask.shape)} must equal the logits' row shape {tuple(row_shape)}")
    return mask.reshape(-1).to(torch.bool)
