"""Test-session setup shared by every test file."""
import os

import torch

# Without a GPU, Triton kernels run on CPU tensors through Triton's interpreter (numpy): the fused
# attention kernels' logic is tested that way. It must be set before the kernels module is imported
# (the jit decorator reads it). On a machine with CUDA the kernels compile and run for real.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
