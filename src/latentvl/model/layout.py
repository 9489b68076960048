"""Re-export of :mod:`latentvl.segments` (the segment checks and the shifted step layout live there)."""

from ..segments import LatentInputError, Layout, build_layout, check_latent_inputs, segment_problems

__all__ = ["Layout", "LatentInputError", "build_layout", "check_latent_inputs", "segment_problems"]
