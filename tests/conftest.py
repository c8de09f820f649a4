"""Test-session set-up shared by every test file."""

import os

import torch

# Triton decides at @triton.jit time whether to compile for CUDA or interpret: without a GPU, the
# Triton kernel tests run their kernels on CPU tensors in the interpreter. Set before any test
# module imports a kernel.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
