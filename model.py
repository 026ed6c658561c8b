"""LanguageModel: a decoder-only transformer of any registered block family, and its sampler.

    model = LanguageModel(cfg, vocab_size=65)            # cfg.arch: gpt2 (default), llama, or your own
    logits, loss = model(x, y)                           # x, y: (B, T) int64, T <= cfg.block_size
    out = model.eval().generate(prompt, max_new_tokens=100, temperature=0.8, top_k=200)

Layout, shared by every family: token embedding (wte) [+ learned position embedding (wpe) where the
family asks for one], dropout, n_layer blocks from architectures/ (gpt2: LayerNorm, GELU, biases;
llama: RMSNorm, rotary, SwiGLU, grouped-query attention), the family's final norm, and an lm_head
that shares its weight with wte unless tie_embeddings is off. Init follows GPT-2 for every family:
N(0, 0.02) for every Linear and Embedding, N(0, 0.02 / sqrt(2 * n_layer)) on the residual
projections (Linear layers named c_proj), so the residual stream's variance does not grow with depth
(GPT-2 paper, section 2.3).

Generation uses a KV cache allocated per call (nothing is kept on the module between calls): the
prompt is prefilled in one forward, then each new token costs one position.

Context window past block_size. Positions are absolute (a learned table, or rotary angles that
the cached keys already carry), so a full cache cannot slide by one token: every cached key was
computed at its old position. The rule, the same for every family and identical with and without
the cache, is:
- the window is tokens[window_start:]; the next token is predicted from the window alone;
- the first window is the whole prompt, or its last block_size tokens if it is longer;
- when appending a token would make the window longer than block_size, window_start jumps forward
  so that only the last max(block_size // 2, 1) tokens are kept, and the cache is re-prefilled
  from them.
use_cache=False computes the same windows with a full forward over tokens[window_start:] for every
new token (the reference); under greedy decoding both paths give the same tokens.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from architectures import ARCHITECTURES, BatchKV, LayerKV, dropout
from architectures.layers import CausalSelfAttention
from parameters import ModelConfig


class LanguageModel(nn.Module):
    """Embedding -> n_layer blocks of the cfg.arch family -> final norm -> LM head; reads only the
    architecture fields of the config."""

    def __init__(self, cfg: ModelConfig, vocab_size: int) -> None:
        super().__init__()
        block = ARCHITECTURES.lookup(cfg.arch)
        self.block_size = cfg.block_size
        self.n_layer = cfg.n_layer
        self.n_embd = cfg.n_embd
        self.vocab_size = vocab_size
        self.dropout = cfg.dropout
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab_size, cfg.n_embd),
            **({"wpe": nn.Embedding(cfg.block_size, cfg.n_embd)} if block.learned_positions else {}),
            h=nn.ModuleList(block(cfg, i) for i in range(cfg.n_layer)),
            ln_f=block.final_norm(cfg),
        ))
        self.lm_head = nn.Linear(cfg.n_embd, vocab_size, bias=False)
        if cfg.tie_embeddings:
            # Weight tying (Press & Wolf 2017). Tied by attribute, so load_state_dict copies into the one
            # shared tensor and a state_dict holding only transformer.wte.weight restores both.
            self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)
        residual_std = 0.02 / math.sqrt(2 * cfg.n_layer)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=residual_std)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Logits (B, T, vocab) for every position of idx (B, T); mean cross-entropy if targets given.

        Targets equal to -1 are ignored in the loss.
        """
        T = idx.size(1)
        if T > self.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size={self.block_size}; "
                             f"pass at most block_size tokens (or build the model with a larger block_size)")
        logits = self.lm_head(self._hidden(idx))  # (B, T, V)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def logits_at(self, idx: Tensor, where: Tensor) -> Tensor:
        """Logits (N, vocab) at the N positions of idx (B, T) where `where` (B, T) is True, in row-major
        order: the LM head runs on those positions only (scoring a few targets of a 50k vocabulary)."""
        return self.lm_head(self._hidden(idx)[where])  # (N, V)

    @property
    def flexible_cache(self) -> bool:
        """Whether every block attends through CausalSelfAttention, which takes a chunk of tokens after a
        cache (shared_context_logits) and a BatchKV step of rows at their own positions (serve.py); a
        block of your own may not."""
        return all(isinstance(getattr(b, "attn", None), CausalSelfAttention) for b in self.transformer.h)

    def shared_context_logits(self, contexts: Tensor, rows: Tensor, continuations: Tensor, where: Tensor) -> Tensor:
        """Logits (N, vocab) of continuations that share contexts, each context computed once: contexts (G, L)
        are prefilled into a KV cache whose row rows[r] then serves continuation row r (R, W), fed at
        positions L..L+W-1. `where` (R, W + 1) marks the positions whose logits are returned (row-major):
        column 0 is the context's last position (which predicts a continuation's first token), column
        j > 0 the continuation's (j-1)-th token. L + W must be at most block_size."""
        cache = [LayerKV(self.block_size) for _ in range(self.n_layer)]
        last = self._hidden(contexts, cache, 0)[:, -1]  # (G, C)
        for layer in cache:  # each continuation row reads its context's keys and values
            layer.k, layer.v = layer.k.index_select(0, rows), layer.v.index_select(0, rows)  # (R, nkv, block, hd)
        h = last.index_select(0, rows)[:, None]  # (R, 1, C)
        if continuations.size(1):
            h = torch.cat([h, self._hidden(continuations, cache, contexts.size(1))], dim=1)  # (R, W + 1, C)
        return self.lm_head(h[where])  # (N, V)

    def _hidden(self, idx: Tensor, cache: list[LayerKV] | list[BatchKV] | None = None, pos: int | Tensor = 0) -> Tensor:
        """Final-LayerNorm hidden states (B, T, C) of idx (B, T) placed at positions pos..pos+T-1, or, with
        a (B,) tensor pos and a BatchKV cache (T == 1), row b's token at position pos[b]."""
        T = idx.size(1)
        x = self.transformer.wte(idx)  # (B, T, C)
        if "wpe" in self.transformer:
            # A slice of the table is the embedding of positions pos..pos+T-1, without an arange per call.
            where = self.transformer.wpe.weight[pos][:, None] if isinstance(pos, Tensor) else self.transformer.wpe.weight[pos:pos + T]
            x = x + where  # (B, T, C)
        x = dropout(x, self.dropout, self.training)  # (B, T, C)
        for i, block in enumerate(self.transformer.h):
            x = block(x, None if cache is None else cache[i], pos)  # (B, T, C)
        return self.transformer.ln_f(x)  # (B, T, C)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count; a tied wte/lm_head weight counts once.

        non_embedding=True leaves out the lookup tables: the position embedding, and the token
        embedding unless it is also the lm_head's weight; as in nanoGPT and the GPT-2/Kaplan
        scaling-law counts.
        """
        n = sum(p.numel() for p in self.parameters())  # parameters() yields a shared tensor once
        if non_embedding:
            if "wpe" in self.transformer:
                n -= self.transformer.wpe.weight.numel()
            if self.lm_head.weight is not self.transformer.wte.weight:
                n -= self.transformer.wte.weight.numel()
        return n

    def flops_per_token(self) -> int:
        """Training FLOPs (forward + backward) per token at sequence length block_size.

            6 * N_matmul + 12 * n_layer * n_embd * block_size

        N_matmul counts the weights of every Linear, whatever the block family (for gpt2, per layer
        12 * n_embd**2: c_attn 3C*C, attn c_proj C*C, c_fc 4C*C, mlp c_proj 4C*C), plus the lm_head's
        vocab * n_embd. Each weight costs 2 FLOPs forward and 4 backward; the second term is
        attention's QK^T and AV matmuls (n_head * head_dim = n_embd, with or without grouped keys).
        Convention of PaLM (Chowdhery et al. 2022, appendix B) and nanoGPT's estimate_mfu; biases,
        LayerNorms, softmax and embedding lookups are left out.
        """
        n_matmul = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        return 6 * n_matmul + 12 * self.n_layer * self.n_embd * self.block_size

    @torch.no_grad()
    def generate(self, idx: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, generator: torch.Generator | None = None,
                 use_cache: bool = True) -> Tensor:
        """The prompt idx (B, T) followed by max_new_tokens sampled tokens: (B, T + max_new_tokens)."""
        new = list(self.generate_stream(idx, max_new_tokens, temperature, top_k, top_p, generator, use_cache))
        return torch.cat([idx, *new], dim=1)  # (B, T + max_new_tokens)

    @torch.no_grad()
    def generate_stream(self, idx: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
                        top_p: float = 1.0, generator: torch.Generator | None = None,
                        use_cache: bool = True) -> Iterator[Tensor]:
        """Yield each new token batch (B, 1) as soon as it is sampled.

        temperature 0 is greedy; top_k=0 and top_p=1.0 disable those filters. The window rule past
        block_size is in the module docstring. Dropout follows the module's mode: call .eval() first.
        """
        _check_generate_args(idx, max_new_tokens, temperature, top_k, top_p)
        B = idx.size(0)
        # Only the window is kept, never the whole output: a long generation costs no memory per token.
        window = idx.new_empty(B, self.block_size + 1)  # (B, block_size + 1): tokens[window_start:]
        n = min(idx.size(1), self.block_size)
        window[:, :n] = idx[:, -n:]
        keep = max(self.block_size // 2, 1)
        cache = [LayerKV(self.block_size) for _ in range(self.n_layer)] if use_cache else None
        logits = self.next_logits(window[:, :n], cache, 0)  # (B, V)
        for i in range(max_new_tokens):
            next_token = sample_next(logits, temperature, top_k, top_p, generator)  # (B, 1)
            yield next_token
            if i == max_new_tokens - 1:
                return
            window[:, n] = next_token[:, 0]
            n += 1
            if n > self.block_size:
                window[:, :keep] = window[:, n - keep:n].clone()
                n = keep
                logits = self.next_logits(window[:, :n], cache, 0)  # re-prefill
            elif cache is None:
                logits = self.next_logits(window[:, :n], None, 0)  # full recompute
            else:
                logits = self.next_logits(next_token, cache, n - 1)  # one position

    def next_logits(self, idx: Tensor, cache: list[LayerKV] | list[BatchKV] | None, pos: int | Tensor) -> Tensor:
        """Logits (B, V) after the last token of idx (B, T) placed at pos (see _hidden); the lm_head sees
        only that position. The KV-cached step of generate_stream, and of serve.py's batched decoding."""
        h = self._hidden(idx, cache, pos)  # (B, T, C)
        return self.lm_head(h[:, -1, :])  # (B, V)

    def chunk_logits(self, idx: Tensor, cache: list[LayerKV], pos: int) -> Tensor:
        """Logits (B, T, V) at every position of idx (B, T), a chunk fed after cached positions 0..pos-1:
        checking several drafted tokens in one forward (serve.py's speculative decoding)."""
        return self.lm_head(self._hidden(idx, cache, pos))  # (B, T, V)


def grow_vocab(state: dict[str, Tensor], vocab_size: int) -> dict[str, Tensor]:
    """The state dict with its token embedding and LM head grown to vocab_size rows. The new ids come
    last (e.g. an end-of-text id added for fine-tuning on pairs); each starts as the mean of the old rows,
    so its logit starts near the average one rather than at a random extreme (Hewitt, "Initializing
    New Word Embeddings for Pretrained Language Models", 2021)."""
    grown = dict(state)
    for key in ("transformer.wte.weight", "lm_head.weight"):
        weight = state.get(key)
        if weight is not None and weight.shape[0] < vocab_size:
            extra = weight.mean(dim=0, keepdim=True).expand(vocab_size - weight.shape[0], -1)
            grown[key] = torch.cat([weight, extra])  # (vocab_size, C)
    return grown


def _check_generate_args(idx: Tensor, max_new_tokens: int, temperature: float, top_k: int,
                         top_p: float) -> None:
    if idx.dim() != 2 or idx.size(1) == 0:
        raise ValueError(f"prompt must be (batch, time) with at least one token, got shape {tuple(idx.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 disables), got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (1 disables), got {top_p}")
    if not math.isfinite(temperature):
        raise ValueError(f"temperature must be finite, got {temperature}")


def sample_next(logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> Tensor:
    """Sample one token per row of logits (B, V): greedy at temperature 0, else top-k, top-p, draw."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)  # (B, 1)
    logits = logits.float()
    # Shifted so the largest logit is 0 before dividing: a tiny temperature then gives -inf, never inf - inf.
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / temperature  # (B, V)
    if 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))  # (B, V)
    if top_p < 1.0:
        logits = _nucleus(logits, top_p)  # (B, V)
    probs = F.softmax(logits, dim=-1)  # (B, V)
    return torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)


def _nucleus(logits: Tensor, top_p: float) -> Tensor:
    """Mask all but the smallest set of most likely tokens whose total probability reaches top_p
    (Holtzman et al. 2019); the most likely token always stays."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
    probs = F.softmax(sorted_logits, dim=-1)  # (B, V)
    # A token goes when the tokens ranked above it already reach top_p; the first never does (said
    # outright: a top_p below float32's smallest value would round to 0 and drop it too).
    drop_sorted = probs.cumsum(dim=-1) - probs >= top_p  # (B, V)
    drop_sorted[:, 0] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # (B, V) back in vocabulary order
    return logits.masked_fill(drop, float("-inf"))  # (B, V)
