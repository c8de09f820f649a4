"""Test-session set-up shared by every test file."""

import gc
import os

import pytest
import torch

# Triton decides at @triton.jit time whether to compile for CUDA or interpret: without a GPU, the
# Triton kernel tests run their kernels on CPU tensors in the interpreter. Set before any test
# module imports a kernel.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _unfreeze_the_heap():
    """`tritlm generate` / `chat` run in process freeze the heap (tritlm.heap): thaw it after each
    test, so one test's objects are not kept out of later collections."""
    yield
    if gc.get_freeze_count():
        gc.unfreeze()
