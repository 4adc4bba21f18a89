"""Peak memory of dilated attention grows linearly with N (no N x N or w x w matrix is built)."""
from __future__ import annotations

import subprocess
import sys

# peak_rss_bytes reads VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss across fork + exec,
# so a child of a large parent (pytest after importing triton and the rest of the suite) would start
# with the parent's peak as its own and under-report its growth.
MEASURE = """
import sys, torch
torch.set_num_threads(1)
from longnet_dist.attention import dilated_attention
from longnet_dist.train.metrics import peak_rss_bytes as peak_rss

def step(n):
    q, k, v = (torch.randn(1, n, 4, 32, requires_grad=True) for _ in range(3))
    dilated_attention(q, k, v, [512, 2048, 8192], [1, 4, 16], causal=True).sum().backward()

step(2048)  # warm-up: libraries, thread pools and allocator arenas go into the baseline
base = peak_rss()
step(int(sys.argv[1]))
print(peak_rss() - base)  # bytes
"""


def peak_growth(n: int) -> int:
    result = subprocess.run([sys.executable, "-c", MEASURE, str(n)], capture_output=True, text=True, check=True)
    return int(result.stdout.split()[-1])


def test_peak_memory_is_linear_in_sequence_length():
    small, large = peak_growth(32768), peak_growth(65536)
    input_bytes = 65536 * 4 * 32 * 4  # one of q, k, v at the larger N
    # Doubling N doubles the peak (allow allocator noise); quadratic growth would give 4x.
    assert 1.5 < large / small < 2.6, (small, large)
    # And it stays a small multiple of the inputs: one (N x N) fp32 score matrix per head would be 2048x q.
    assert large < 40 * input_bytes, (large, input_bytes)
