"""Checkpoint readers, one module per input kind.

Each reader validates its input at the edge (raising ``CheckpointError`` with the fix), maps the
source's tensor names to the canonical names of ``quant.formats.tensor_names`` and hands tensors
out a row chunk at a time, so the converter never holds more than one chunk of a tensor.
"""

from .hf import HFCheckpoint, open_hf_checkpoint

__all__ = ["HFCheckpoint", "open_hf_checkpoint"]
