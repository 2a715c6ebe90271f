"""The configurable transformer: norms, positions, attention, MLP, blocks, and the parameter estimate."""

from llmlab.model.cache import KVCache
from llmlab.model.transformer import Block, Transformer, build_model

__all__ = ["Transformer", "Block", "KVCache", "build_model"]
