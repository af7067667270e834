"""Without CUDA the Triton kernels run through Triton's CPU interpreter, which must be switched on
before triton is first imported (triton.jit reads TRITON_INTERPRET when a kernel is defined).
With CUDA the same tests run the compiled kernels on the GPU."""

import os
import sys

import torch

if not torch.cuda.is_available():
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise RuntimeError("tests/kernels: triton was imported before TRITON_INTERPRET=1 could be set; "
                           "run these tests in their own process (pytest tests/kernels)")
    os.environ["TRITON_INTERPRET"] = "1"
