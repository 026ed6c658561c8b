"""gpt2: GPT-2's block (Radford et al. 2019), the default architecture.

Pre-LayerNorm: x + attn(ln_1(x)), then x + mlp(ln_2(x)); learned absolute positions; a GELU MLP;
biases where cfg.bias asks. With the default knobs this is nanoGPT's model, parameter for parameter.
"""

from __future__ import annotations

from typing import ClassVar

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from architectures.layers import ARCHITECTURES, Block, CausalSelfAttention, LayerKV, dropout
from parameters import ModelConfig


class MLP(nn.Module):
    """Position-wise feed-forward: C -> mlp_hidden -> GELU (exact erf form, not GPT-2's tanh) -> C."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, cfg.mlp_hidden, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.mlp_hidden, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout

    def forward(self, x: Tensor) -> Tensor:
        # F.gelu rather than an nn.GELU module: the same kernel without a module call per step.
        # The tanh form would change the numbers, and on AVX2 CPUs it is ~3x slower than erf.
        return dropout(self.c_proj(F.gelu(self.c_fc(x))), self.dropout, self.training)  # (B, T, C)


@ARCHITECTURES.register("gpt2")
class GPT2Block(Block):
    learned_positions: ClassVar[bool] = True

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg, bias=cfg.bias, rotary=False)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)
        self.mlp = MLP(cfg)

    @classmethod
    def final_norm(cls, cfg: ModelConfig) -> nn.Module:
        return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)

    def forward(self, x: Tensor, kv: LayerKV | None = None, pos: int = 0) -> Tensor:
        x = x + self.attn(self.ln_1(x), kv, pos)  # (B, T, C)
        return x + self.mlp(self.ln_2(x))  # (B, T, C)
