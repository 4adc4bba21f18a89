"""Floor 2: LongNet dilated attention (kernels, one-device algorithm, sequence-parallel sharding)."""
from .branches import geometric_branches
from .functional import dilated_attention, packed_dilated_attention
from .kernels import BACKENDS, attention_backward, attention_forward, select_backend
from .module import DilatedAttention
from .rotary import apply_rotary, rotary_angles, rotate_packed
from .sharding import check_sequence_parallel_config, segment_spans, spanning_ranks

__all__ = [
    "BACKENDS", "DilatedAttention", "apply_rotary", "attention_backward", "attention_forward",
    "check_sequence_parallel_config", "dilated_attention", "geometric_branches", "packed_dilated_attention",
    "rotary_angles", "rotate_packed", "segment_spans", "select_backend", "spanning_ranks",
]
