"""The omni MoE model: decoder blocks, MoE FFNs, vision encoder."""

from omnimini.model.layers import KVCache
from omnimini.model.model import ModelOutput, OmniModel

__all__ = ["KVCache", "ModelOutput", "OmniModel"]
