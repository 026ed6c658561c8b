"""The parts every block family is built from, the Block base class, and the ARCHITECTURES registry.

    @ARCHITECTURES.register("mine")
    class MyBlock(Block):
        def __init__(self, cfg: ModelConfig, layer: int) -> None: ...
        def forward(self, x, kv=None, pos=0): ...      # (B, T, C) -> (B, T, C)

LanguageModel (model.py) wraps any registered Block in the same embedding, final norm, LM head, init,
KV-cached generation and FLOPs count, so a new block family gets training, resume, DDP, compile,
export and inference without a line changed elsewhere.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from parameters import ARCHITECTURES, ModelConfig  # noqa: F401  (architectures/ re-exports the registry)



class Block(nn.Module):
    """One transformer block of a family; forward(x (B, T, C), kv: LayerKV | None, pos: int) -> (B, T, C).

    pos is the position of x's first token (0 in training, later in cached generation); kv is this
    layer's cache during generation, None otherwise. Linear layers named c_proj are residual
    projections and get GPT-2's scaled init.
    """
    learned_positions: ClassVar[bool] = False  # add a learned position embedding (wpe) to the token embedding

    @classmethod
    def final_norm(cls, cfg: ModelConfig) -> nn.Module:
        """The norm between the last block and the LM head."""
        return RMSNorm(cfg.n_embd, eps=cfg.norm_eps)


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm computed in float32 and returned in the input's dtype, as CUDA autocast runs norms and
    Hugging Face's Llama and Qwen3 compute them. CPU autocast would hand a bf16 input (QK-norm's queries,
    fresh from a Linear) to the float32 weight: torch then warns that it cannot use its fused kernel and
    normalizes in bf16. A float32 input, the residual stream, is normalized exactly as before."""

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype in (torch.bfloat16, torch.float16):
            return super().forward(x.float()).type_as(x)
        return super().forward(x)


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """F.dropout(x, p, training), with a mask that is the same on every CPU and every run.

    On CPU, torch's dropout draws its mask with `bernoulli_(float)`, whose kernel takes a different
    path by CPU vendor: on Intel it fills the mask with MKL's VSL generator from parallel chunks
    (aten/src/ATen/native/cpu/DistributionKernels.cpp), and on a 2-core Sapphire Rapids that gave
    different weights in about 1 run in 10 with the same seed (issue 8). `bernoulli_(Tensor)` has
    one serial kernel on every CPU, so the mask is a pure function of the RNG state. CUDA and MPS
    keep torch's own fused dropout. Eval mode and p = 0 return x untouched and draw nothing.
    """
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, True)
    keep = 1.0 - p
    mask = torch.empty_like(x).bernoulli_(torch.full((), keep))  # 1 with probability keep, else 0
    return x * mask.div_(keep)


# On a CPU in half precision, SDPA's flash kernel is slow to train short blocks: forward and backward of
# one layer took 12.2 ms against 3.2 written out at the speedrun's shape (24 x 4 heads x T 64 x hd 32) and
# 59.9 against 33.9 at shakespeare_char's (16 x 6 x 256 x 64), bf16 on a Zen 4; at T 512 the two were
# even (53.0 / 46.3 and 147.7 / 203.7 ms), and at T 1024 flash took 102.6 against 256.7 ms.
WRITTEN_OUT_MAX_T = 256


def causal_attention(q: Tensor, k: Tensor, v: Tensor, dropout_p: float, is_causal: bool) -> Tensor:
    """softmax(q k^T / sqrt(hd)) v over (B, nh, T, hd) tensors, with dropout on the probabilities.

    This is F.scaled_dot_product_attention (flash kernels where the device has them), except on a CPU
    in two cases where the same math is written out here: with dropout, where SDPA would draw its mask
    inside torch (see dropout() above; SDPA's CPU flash kernel has no dropout anyway, so torch would take
    this unfused path too); and when training blocks of up to WRITTEN_OUT_MAX_T tokens in half
    precision, where it measured faster.
    """
    cpu = q.device.type == "cpu"
    short_half = q.dtype != torch.float32 and q.size(2) <= WRITTEN_OUT_MAX_T and torch.is_grad_enabled()
    if not cpu or (dropout_p == 0.0 and not short_half):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=is_causal)
    assert is_causal and q.size(2) == k.size(2), "training attends within one block"
    with torch.profiler.record_function("causal_attention"):  # profile_model.py counts it as attention
        return _written_out_attention(q, k, v, dropout_p)


def _written_out_attention(q: Tensor, k: Tensor, v: Tensor, dropout_p: float) -> Tensor:
    B, nh, T, hd = q.shape
    if dropout_p == 0.0:
        # The causal mask added as a bias inside the score matmul (baddbmm): no masked_fill and no mask in the
        # backward, 35.8 against 55.9 ms at shakespeare_char's shape with masked_fill (bf16, Zen 4).
        future = torch.full((T, T), float("-inf"), dtype=q.dtype, device=q.device).triu_(1)  # (T, T)
        att = torch.baddbmm(future.expand(B * nh, T, T), (q * (1.0 / math.sqrt(hd))).reshape(B * nh, T, hd),
                            k.reshape(B * nh, T, hd).transpose(1, 2))  # (B * nh, T, T)
        return F.softmax(att.view(B, nh, T, T), dim=-1) @ v  # (B, nh, T, hd)
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1)))  # (B, nh, T, T)
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu_(1)  # (T, T)
    att = F.softmax(att.masked_fill(future, float("-inf")), dim=-1)  # (B, nh, T, T)
    return dropout(att, dropout_p, True) @ v  # (B, nh, T, hd)


class LayerKV:
    """One layer's keys and values for one generate call, preallocated at the first write."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.k: Tensor | None = None
        self.v: Tensor | None = None

    def update(self, k: Tensor, v: Tensor, pos: int) -> tuple[Tensor, Tensor]:
        """Store k, v (B, nkv, T, hd) at positions pos..pos+T-1; return what the queries attend to.

        A prefill (pos == 0) attends among its own tokens, so it gets k, v back unchanged; a later
        step gets the cached keys and values of positions 0..pos+T-1.
        """
        if self.k is None:
            B, nkv, _, hd = k.shape
            # dtype of k, not of the parameters: under autocast the keys are bf16/fp16.
            self.k = k.new_empty(B, nkv, self.block_size, hd)  # (B, nkv, block_size, hd)
            self.v = v.new_empty(B, nkv, self.block_size, hd)  # (B, nkv, block_size, hd)
        T = k.size(2)
        self.k[:, :, pos:pos + T] = k
        self.v[:, :, pos:pos + T] = v
        if pos == 0:
            return k, v
        return self.k[:, :, :pos + T], self.v[:, :, :pos + T]  # (B, nkv, pos + T, hd)


class BatchKV:
    """One layer's keys and values for up to `slots` sequences decoded together, each at its own position
    (serve.py's continuous batching). A sequence owns one row: row(i) is a LayerKV over that row for its
    prefill (and re-prefill); a decode step writes one token per row at that row's position and attends
    each row to its own positions. start_step() sets which rows a step decodes, for every layer at once."""

    def __init__(self, slots: int, block_size: int) -> None:
        self.slots, self.block_size = slots, block_size
        self.k: Tensor | None = None
        self.v: Tensor | None = None
        self.rows: Tensor | None = None  # the rows a step decodes, or None for rows 0..B-1 (views, no copy)
        self.length = 0  # positions a step attends to: the furthest row's position + 1
        self.mask: Tensor | None = None  # (B, 1, 1, length): True where a row's query may look; None: all

    def row(self, i: int) -> LayerKV:
        return _RowKV(self, i)

    def allocate(self, like: Tensor) -> None:
        """Storage for every slot, shaped and typed like the first keys written (B, nkv, T, hd)."""
        if self.k is None:
            _, nkv, _, hd = like.shape
            self.k = like.new_zeros(self.slots, nkv, self.block_size, hd)  # (slots, nkv, block_size, hd)
            self.v = like.new_zeros(self.slots, nkv, self.block_size, hd)  # (slots, nkv, block_size, hd)

    def update(self, k: Tensor, v: Tensor, pos: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v (B, nkv, 1, hd) of row b at position pos[b]; return every row's keys and values up
        to self.length (B, nkv, length, hd): views of rows 0..B-1, or a gather of self.rows."""
        B = k.size(0)
        rows = torch.arange(B, device=k.device) if self.rows is None else self.rows  # (B,)
        self.k[rows, :, pos] = k[:, :, 0]
        self.v[rows, :, pos] = v[:, :, 0]
        if self.rows is None:
            return self.k[:B, :, :self.length], self.v[:B, :, :self.length]  # (B, nkv, length, hd)
        return self.k[rows, :, :self.length], self.v[rows, :, :self.length]  # (B, nkv, length, hd)

    def move(self, src: int, dst: int) -> None:
        """Row src's keys and values become row dst's (keeping the decoded rows 0..B-1 contiguous)."""
        if self.k is not None:
            self.k[dst], self.v[dst] = self.k[src], self.v[src]


class _RowKV(LayerKV):
    """A LayerKV whose storage is one row of a BatchKV: a prefill there is a prefill of that sequence."""

    def __init__(self, batch: BatchKV, i: int) -> None:
        super().__init__(batch.block_size)
        self.batch, self.i = batch, i

    def update(self, k: Tensor, v: Tensor, pos: int) -> tuple[Tensor, Tensor]:
        self.batch.allocate(k)
        self.k, self.v = self.batch.k[self.i:self.i + 1], self.batch.v[self.i:self.i + 1]  # (1, nkv, block, hd)
        return super().update(k, v, pos)


def start_step(cache: list[BatchKV], positions: list[int], rows: list[int] | None, device: torch.device) -> Tensor:
    """Point every layer's BatchKV at one decode step: row rows[b] (or b, when rows is None) takes its next
    token at positions[b]. Returns the positions as a (B,) tensor, the `pos` the blocks take."""
    length = max(positions) + 1
    pos = torch.tensor(positions, device=device)  # (B,)
    # Rows at the same position see every stored position up to it: no mask, the unmasked kernel.
    mask = None if min(positions) == max(positions) else (torch.arange(length, device=device) <= pos[:, None])[:, None, None, :]
    index = None if rows is None else torch.tensor(rows, device=device)
    for layer in cache:
        layer.rows, layer.length, layer.mask = index, length, mask
    return pos


class Rotary(nn.Module):
    """Rotary position embedding (Su et al. 2021), in the half-split layout Hugging Face Llama uses:
    the pair rotated together is (x[i], x[i + hd/2]). cos/sin for every position up to block_size
    are computed once, in float32, as buffers that are not saved (they follow from the config)."""

    def __init__(self, head_dim: int, block_size: int, theta: float) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head size, got n_embd/n_head = {head_dim}; "
                             "change n_embd or n_head")
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # (hd/2,)
        angles = torch.outer(torch.arange(block_size, dtype=torch.float64), inv_freq)  # (block_size, hd/2)
        self.register_buffer("cos", angles.cos().float()[:, None, :], persistent=False)  # (block_size, 1, hd/2)
        self.register_buffer("sin", angles.sin().float()[:, None, :], persistent=False)  # (block_size, 1, hd/2)

    def forward(self, x: Tensor, pos: int | Tensor) -> Tensor:
        """x (B, T, nh, hd) at positions pos..pos+T-1 (or row b's one token at pos[b]), rotated: HF's
        x * cos + rotate_half(x) * sin, written per half, which gives the same numbers without building
        rotate_half(x) (a copy of x)."""
        T, half = x.size(1), x.size(-1) // 2
        if isinstance(pos, Tensor):  # (B,) positions, T == 1
            cos, sin = self.cos[pos][:, None].to(x.dtype), self.sin[pos][:, None].to(x.dtype)  # (B, 1, 1, hd/2)
        else:
            cos, sin = self.cos[pos:pos + T].to(x.dtype), self.sin[pos:pos + T].to(x.dtype)  # (T, 1, hd/2)
        x1, x2 = x[..., :half], x[..., half:]  # (B, T, nh, hd/2) each
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)  # (B, T, nh, hd)


class CausalSelfAttention(nn.Module):
    """Causal self-attention with one fused q/k/v projection (rows: n_head query heads, then
    n_kv_head key and n_kv_head value heads); optional grouped-query heads, QK-norm and rotary."""

    def __init__(self, cfg: ModelConfig, bias: bool, rotary: bool) -> None:
        super().__init__()
        self.n_head, self.n_kv_head = cfg.n_head, cfg.kv_heads
        self.head_dim = cfg.n_embd // cfg.n_head
        self.dropout = cfg.dropout
        self.c_attn = nn.Linear(cfg.n_embd, (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias=bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, eps=cfg.norm_eps)
            self.k_norm = RMSNorm(self.head_dim, eps=cfg.norm_eps)
        self.qk_norm = cfg.qk_norm
        self.rotary = Rotary(self.head_dim, cfg.block_size, cfg.rope_theta) if rotary else None

    def forward(self, x: Tensor, kv: LayerKV | BatchKV | None = None, pos: int | Tensor = 0) -> Tensor:
        B, T, C = x.shape
        hd, nkv = self.head_dim, self.n_kv_head
        q, k, v = self.c_attn(x).split([C, nkv * hd, nkv * hd], dim=2)  # (B, T, C), 2 x (B, T, nkv * hd)
        q, k, v = q.view(B, T, self.n_head, hd), k.view(B, T, nkv, hd), v.view(B, T, nkv, hd)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rotary is not None:  # on (B, T, h, hd), before the transpose: elementwise work on dense rows
            q, k = self.rotary(q, pos), self.rotary(k, pos)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, nh, T, hd), 2 x (B, nkv, T, hd)
        if kv is not None:
            k, v = kv.update(k, v, pos)  # (B, nkv, pos + T, hd); a BatchKV step: (B, nkv, kv.length, hd)
        if nkv != self.n_head:  # query head i reads key/value head i // (n_head / nkv), as in HF's repeat_kv
            k = k.repeat_interleave(self.n_head // nkv, dim=1)  # (B, nh, pos + T, hd)
            v = v.repeat_interleave(self.n_head // nkv, dim=1)  # (B, nh, pos + T, hd)
        if isinstance(pos, Tensor):  # one token per row at its own position (a BatchKV step, serve.py)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=kv.mask)  # (B, nh, 1, hd)
        elif pos and T > 1:  # a chunk after cached positions (a shared context's continuations): query i sees
            # the cache and the chunk up to itself. (is_causal would align the mask top-left: wrong here.)
            assert not self.training, "chunks after a cache are for scoring, in eval mode"
            mask = torch.ones(T, pos + T, dtype=torch.bool, device=x.device).tril(diagonal=pos)  # (T, pos + T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, nh, T, hd)
        else:  # a block from position 0 is causal; a single later query may see every cached position
            y = causal_attention(q, k, v, self.dropout if self.training else 0.0, is_causal=pos == 0)  # (B, nh, T, hd)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return dropout(self.c_proj(y), self.dropout, self.training)  # (B, T, C)
