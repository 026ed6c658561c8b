"""Block families, by name: `arch: gpt2` or `arch: llama` picks one; README 'Add your own block'."""

from architectures import gpt2, llama  # noqa: F401  (importing a family registers it)
from architectures.layers import ARCHITECTURES, BatchKV, Block, LayerKV, causal_attention, dropout, start_step

__all__ = ["ARCHITECTURES", "BatchKV", "Block", "LayerKV", "causal_attention", "dropout", "start_step"]
