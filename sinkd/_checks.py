"""Up-front input checks: every error is one line that names the offending argument."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable

import torch


def check_choice(field: str, value: str, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{field}: unknown value {value!r}; valid: {', '.join(choices)}")
    return value


def as_real(value):
    """A Python int / float for a real scalar of any kind (Python, numpy, 0-d tensor or array), else None.
    Booleans (Python, numpy or bool tensors) are not numbers here."""
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item") and "bool" not in str(getattr(value, "dtype", "")):
        return as_real(value.item())
    return None


def _real_in(field: str, value, ok, requirement: str) -> float:
    number = as_real(value)
    if number is None or not math.isfinite(number) or not ok(number):
        raise ValueError(f"{field} must be {requirement}, got {value!r}")
    return float(number)


def check_positive(field: str, value: float) -> float:
    return _real_in(field, value, lambda x: x > 0, "a finite number > 0")


def check_nonnegative(field: str, value: float) -> float:
    return _real_in(field, value, lambda x: x >= 0, "a finite number >= 0")


def check_int_at_least(field: str, value: int, low: int) -> int:
    number = as_real(value)
    if not isinstance(number, int) or number < low:
        raise ValueError(f"{field} must be an integer >= {low}, got {value!r}")
    return number


def check_open_unit(field: str, value: float) -> float:
    return _real_in(field, value, lambda x: 0 < x < 1, "in (0, 1)")


HALF_DTYPES = (torch.float16, torch.bfloat16)


def at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    """float16 / bfloat16 tensors as float32 (softmaxes, costs and the solver run in float32 at least,
    and CPU kernels such as cdist lack the half types); other dtypes unchanged. Differentiable."""
    return tensor.float() if tensor.dtype in HALF_DTYPES else tensor


def check_finite(field: str, tensor: torch.Tensor) -> None:
    # The sum is finite when every entry is (no tensor-sized temporary); only a non-finite or
    # overflowing sum pays for the element-wise look.
    if bool(torch.isfinite(tensor.sum())):
        return
    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        bad = (~finite).nonzero()[0].tolist()
        raise ValueError(f"{field} has non-finite values (first at index {tuple(bad)})")


def check_logit_values(field: str, logits: torch.Tensor) -> None:
    """Logits (..., V): finite or -inf (a masked token: probability 0); NaN and +inf refused, and a row
    must keep at least one token (a row that is -inf everywhere has no distribution). One row-wise max
    (NaN propagates through it): no temporary of the logits' size unless something is wrong."""
    if logits.numel() == 0:
        return
    row_max = logits.detach().amax(-1)
    if not bool(torch.isfinite(row_max).all()):
        bad = torch.isnan(logits) | torch.isposinf(logits)
        if bool(bad.any()):
            where = tuple(bad.nonzero()[0].tolist())
            raise ValueError(f"{field} has non-finite values (first at index {where}): NaN or +inf (only -inf, a masked token, is allowed)")
        row = tuple(torch.isneginf(row_max).nonzero()[0].tolist())
        raise ValueError(f"{field} row {row} is -inf everywhere: no token has probability > 0")


def check_logit_tensor(field: str, t, dims_ok, shape: str) -> None:
    """A floating-point tensor whose number of dimensions passes `dims_ok`; `shape` says which in the error."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{field} must be a torch.Tensor, got {type(t).__name__}")
    if not dims_ok(t.dim()):
        raise ValueError(f"{field} must have shape {shape}, got {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{field} must be floating point, got {t.dtype}")


def check_logits(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> None:
    """Shapes agree (same rows, same vocabulary), at least (N, V), values finite or -inf (masked tokens)."""
    for field, t in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        check_logit_tensor(field, t, lambda d: d >= 2, "(N, V) or (B, L, V)")
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise ValueError(
            f"vocabulary mismatch: student_logits has V={student_logits.shape[-1]}, "
            f"teacher_logits has V={teacher_logits.shape[-1]}"
        )
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"shape mismatch: student_logits {tuple(student_logits.shape)} vs teacher_logits {tuple(teacher_logits.shape)}"
        )
    check_logit_values("student_logits", student_logits)
    check_logit_values("teacher_logits", teacher_logits)


def check_mask(mask: torch.Tensor | None, row_shape: torch.Size) -> torch.Tensor | None:
    """A boolean mask over the rows (all dims but the vocabulary); returns it flattened."""
    if mask is None:
        return None
    if tuple(mask.shape) != tuple(row_shape):
        raise ValueError(f"mask shape {tuple(mask.shape)} must equal the logits' row shape {tuple(row_shape)}")
    return mask.reshape(-1).to(torch.bool)
