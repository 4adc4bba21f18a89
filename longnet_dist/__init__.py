"""longnet_dist: exact LongNet dilated attention and sequence-parallel training."""

__version__ = "0.1.0"
