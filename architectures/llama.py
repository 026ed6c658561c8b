"""llama: the Llama block (Touvron et al. 2023), as Hugging Face's LlamaForCausalLM computes it.

Pre-RMSNorm: x + attn(input_norm(x)), then x + mlp(post_attention_norm(x)); rotary positions
(rope_theta) instead of a position table; grouped-query attention (n_kv_head); a SwiGLU MLP
(Shazeer 2020); no biases anywhere (cfg.bias is ignored). The gate and up projections are one fused
Linear (rows: gate, then up), as q/k/v are: one matmul instead of two.
"""

from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from architectures.layers import ARCHITECTURES, Block, CausalSelfAttention, LayerKV, RMSNorm, dropout
from parameters import ModelConfig


class SwiGLU(nn.Module):
    """C -> (gate, up) -> silu(gate) * up -> C, hidden width mlp_hidden."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 2 * cfg.mlp_hidden, bias=False)
        self.c_proj = nn.Linear(cfg.mlp_hidden, cfg.n_embd, bias=False)
        self.dropout = cfg.dropout

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.c_fc(x).chunk(2, dim=-1)  # 2 x (B, T, hidden)
        return dropout(self.c_proj(F.silu(gate) * up), self.dropout, self.training)  # (B, T, C)


@ARCHITECTURES.register("llama")
class LlamaBlock(Block):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.ln_1 = RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.attn = CausalSelfAttention(cfg, bias=False, rotary=True)
        self.ln_2 = RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x: Tensor, kv: LayerKV | None = None, pos: int = 0) -> Tensor:
        x = x + self.attn(self.ln_1(x), kv, pos)  # (B, T, C)
        return x + self.mlp(self.ln_2(x))  # (B, T, C)
