"""The library's numerical tests run in float64 by default (references are float64), without
leaking that default into the rest of the session (models built in other tests stay float32)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def float64_default():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)
