"""Tests of model.py: causality, init, loss, KV cache against full recompute, sampling, FLOPs.

The behaviour every architecture must have runs once per registered architecture (the `cfg`
fixture), plus llama with grouped-query attention, QK-norm and an untied head.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from architectures import ARCHITECTURES, LayerKV, causal_attention, dropout
from model import LanguageModel, sample_next
from parameters import ModelConfig

VOCAB = 65
VARIANTS = {name: {"arch": name} for name in ARCHITECTURES.names()} | {
    "llama-gqa": {"arch": "llama", "n_kv_head": 1, "qk_norm": True, "tie_embeddings": False, "mlp_ratio": 8 / 3},
}


@pytest.fixture(params=list(VARIANTS))
def cfg(request: pytest.FixtureRequest, tiny_cfg: ModelConfig) -> ModelConfig:
    """tiny_cfg in each registered architecture."""
    return dataclasses.replace(tiny_cfg, **VARIANTS[request.param]).validate()


def make_model(cfg: ModelConfig, seed: int = 0, vocab: int = VOCAB) -> LanguageModel:
    torch.manual_seed(seed)
    return LanguageModel(cfg, vocab).eval()


def scrambled_model(cfg: ModelConfig, seed: int = 0) -> LanguageModel:
    """A model whose greedy output depends on the whole window and its positions.

    At GPT-2 init the tied head makes greedy decoding repeat one token forever, which no cache bug
    would change; with N(0, 1) weights everywhere an off-by-one position or a wrong re-prefill
    changes the tokens.
    """
    model = make_model(cfg, seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 1.0)
    return model


def test_causal_mask(cfg: ModelConfig) -> None:
    model = make_model(cfg)
    idx = torch.randint(0, VOCAB, (2, cfg.block_size))
    logits, _ = model(idx)
    for t in (0, 5, cfg.block_size - 1):
        changed = idx.clone()
        changed[:, t] = (changed[:, t] + 1) % VOCAB
        logits2, _ = model(changed)
        assert torch.equal(logits[:, :t], logits2[:, :t])
        assert not torch.equal(logits[:, t], logits2[:, t])


def test_initial_loss_near_ln_vocab(cfg: ModelConfig) -> None:
    model = make_model(cfg)
    idx = torch.randint(0, VOCAB, (8, cfg.block_size))
    targets = torch.randint(0, VOCAB, (8, cfg.block_size))
    logits, loss = model(idx, targets)
    assert logits.shape == (8, cfg.block_size, VOCAB)
    assert abs(loss.item() - math.log(VOCAB)) < 0.2


def test_ignore_index_leaves_positions_out(cfg: ModelConfig) -> None:
    model = make_model(cfg)
    idx = torch.randint(0, VOCAB, (2, 8))
    targets = torch.randint(0, VOCAB, (2, 8))
    masked = targets.clone()
    masked[:, 4:] = -1
    _, loss_masked = model(idx, masked)
    logits, _ = model(idx)
    expected = torch.nn.functional.cross_entropy(logits[:, :4].reshape(-1, VOCAB), targets[:, :4].reshape(-1))
    torch.testing.assert_close(loss_masked, expected)


def test_gpt2_init_and_tied_head(tiny_cfg: ModelConfig) -> None:
    model = make_model(tiny_cfg)
    expected = 0.02 / math.sqrt(2 * tiny_cfg.n_layer)
    stds = [model.transformer.h[0].attn.c_proj.weight.std().item(),
            model.transformer.h[1].mlp.c_proj.weight.std().item()]
    for std in stds:
        assert abs(std - expected) < 0.15 * expected
    assert abs(model.transformer.h[0].mlp.c_fc.weight.std().item() - 0.02) < 0.002
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()


def test_state_dict_keys_and_retie_on_load(tiny_cfg: ModelConfig) -> None:
    src, dst = make_model(tiny_cfg, seed=0), make_model(tiny_cfg, seed=1)
    sd = src.state_dict()
    assert list(sd)[:3] == ["transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.ln_1.weight"]
    assert "transformer.h.1.attn.c_attn.weight" in sd and "lm_head.weight" in sd
    sd.pop("lm_head.weight")
    result = dst.load_state_dict(sd, strict=False)
    assert result.missing_keys == ["lm_head.weight"] and not result.unexpected_keys
    assert dst.lm_head.weight is dst.transformer.wte.weight
    assert torch.equal(dst.lm_head.weight, src.lm_head.weight)
    idx = torch.randint(0, VOCAB, (1, 8))
    assert torch.equal(dst(idx)[0], src(idx)[0])


def test_no_bias(tiny_cfg: ModelConfig) -> None:
    model = make_model(dataclasses.replace(tiny_cfg, bias=False))
    assert not any(name.endswith("bias") for name, _ in model.named_parameters())


def test_too_long_sequence_raises(cfg: ModelConfig) -> None:
    model = make_model(cfg)
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, cfg.block_size + 1, dtype=torch.long))


def test_num_params_and_flops(tiny_cfg: ModelConfig) -> None:
    model = make_model(tiny_cfg)
    unique = {id(p): p.numel() for p in model.parameters()}
    assert model.num_params() == sum(unique.values())
    C, L, T = tiny_cfg.n_embd, tiny_cfg.n_layer, tiny_cfg.block_size
    assert model.num_params(non_embedding=True) == model.num_params() - T * C
    n_matmul = L * (3 * C * C + C * C + 4 * C * C + 4 * C * C) + VOCAB * C
    assert model.flops_per_token() == 6 * n_matmul + 12 * L * C * T


def test_llama_shapes_params_and_flops(tiny_cfg: ModelConfig) -> None:
    """Grouped-query attention shrinks k/v; SwiGLU has two input matrices; an untied head counts."""
    cfg = dataclasses.replace(tiny_cfg, arch="llama", n_head=4, n_kv_head=2, mlp_ratio=3.0, tie_embeddings=False)
    model = make_model(cfg.validate())
    C, L, T, hd, H = cfg.n_embd, cfg.n_layer, cfg.block_size, cfg.n_embd // 4, int(3.0 * cfg.n_embd)
    assert model.transformer.h[0].attn.c_attn.weight.shape == (C + 2 * 2 * hd, C)
    assert model.transformer.h[0].mlp.c_fc.weight.shape == (2 * H, C)
    assert "wpe" not in model.transformer and not any(n.endswith("bias") for n, _ in model.named_parameters())
    assert model.lm_head.weight is not model.transformer.wte.weight
    n_matmul = L * ((C + 4 * hd) * C + C * C + 3 * H * C) + VOCAB * C
    assert model.flops_per_token() == 6 * n_matmul + 12 * L * C * T
    assert model.num_params(non_embedding=True) == model.num_params() - VOCAB * C
    per_layer = (C + 4 * hd) * C + C * C + 3 * H * C + 2 * C
    assert model.num_params() == L * per_layer + 2 * VOCAB * C + C


def test_rotary_positions_are_relative(tiny_cfg: ModelConfig) -> None:
    """With rotary embeddings, q.k depends on the distance between positions only."""
    from architectures.layers import Rotary
    rot = Rotary(8, 32, 10000.0)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)  # (B, T, nh, hd)
    dots = [(rot(q, p + 3) * rot(k, p)).sum() for p in (0, 5, 20)]
    torch.testing.assert_close(dots[1], dots[0])
    torch.testing.assert_close(dots[2], dots[0])
    with pytest.raises(ValueError, match="even head size"):
        Rotary(7, 32, 10000.0)


@pytest.mark.parametrize("prompt_len", [3, 20])  # 20 > block_size: the prompt itself is cut
def test_kv_cache_matches_full_recompute_greedy(cfg: ModelConfig, prompt_len: int) -> None:
    model = scrambled_model(cfg)
    prompt = torch.randint(0, VOCAB, (2, prompt_len))
    n_new = 3 * cfg.block_size  # crosses the window boundary several times
    cached = model.generate(prompt, n_new, temperature=0, use_cache=True)
    full = model.generate(prompt, n_new, temperature=0, use_cache=False)
    assert cached.shape == (2, prompt_len + n_new)
    assert torch.equal(cached[:, :prompt_len], prompt)
    assert torch.equal(cached, full)
    assert len(cached[0, prompt_len:].unique()) > 3  # not a degenerate repeat of one token


def test_window_rule_past_block_size(cfg: ModelConfig) -> None:
    """A long prompt starts from its last block_size tokens; a full window keeps its last half."""
    model = scrambled_model(cfg)
    bs, half = cfg.block_size, cfg.block_size // 2
    prompt = torch.randint(0, VOCAB, (2, bs + 4))
    out = model.generate(prompt, 2 * bs, temperature=0)
    assert torch.equal(model.generate(prompt[:, -bs:], 2 * bs, temperature=0)[:, bs:], out[:, bs + 4:])
    # The window first overflows when token bs + 4 + 1 arrives: what follows is generated from the
    # last `half` tokens alone, exactly as if they were the prompt.
    cut = bs + 4 + 1
    again = model.generate(out[:, cut - half:cut], out.size(1) - cut, temperature=0)
    assert torch.equal(again[:, half:], out[:, cut:])


def test_kv_cache_matches_full_recompute_sampled(cfg: ModelConfig) -> None:
    model = scrambled_model(cfg)
    prompt = torch.randint(0, VOCAB, (2, 3))
    outs = [
        model.generate(prompt, 3 * cfg.block_size, temperature=1.0, top_k=20, top_p=0.9,
                       generator=torch.Generator().manual_seed(7), use_cache=use_cache)
        for use_cache in (True, False)
    ]
    assert torch.equal(outs[0], outs[1])


def test_cached_step_logits_match_forward(cfg: ModelConfig) -> None:
    """The logits behind the sampled tokens, not only their argmax, agree with a full forward."""
    model = make_model(cfg)
    seq = torch.randint(0, VOCAB, (2, cfg.block_size))
    full, _ = model(seq)
    cache = [LayerKV(model.block_size) for _ in range(model.n_layer)]
    steps = [model.next_logits(seq[:, :3], cache, 0)]
    steps += [model.next_logits(seq[:, p:p + 1], cache, p) for p in range(3, cfg.block_size)]
    torch.testing.assert_close(torch.stack(steps, dim=1), full[:, 2:], atol=1e-5, rtol=0)


def test_shared_context_logits_equal_each_row_computed_whole(cfg: ModelConfig) -> None:
    """Two contexts of 5 tokens, computed once each, serve 3 and 2 continuations of 1 to 4 tokens (right-
    padded): the logits equal a full forward over each context + continuation."""
    model = scrambled_model(cfg)
    assert model.flexible_cache
    contexts = torch.randint(0, VOCAB, (2, 5))
    conts = [torch.randint(0, VOCAB, (n,)) for n in (3, 1, 4, 2, 4)]
    rows = torch.tensor([0, 0, 0, 1, 1])
    padded = torch.zeros(5, 3, dtype=torch.long)
    where = torch.zeros(5, 4, dtype=torch.bool)
    for r, c in enumerate(conts):
        padded[r, :len(c) - 1], where[r, :len(c)] = c[:-1], True
    got = model.shared_context_logits(contexts, rows, padded, where)
    want = torch.cat([model(torch.cat([contexts[g], c])[None, :-1])[0][0, -len(c):] for g, c in zip(rows, conts)])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)


def test_top_k_1_and_tiny_top_p_are_greedy(cfg: ModelConfig) -> None:
    model = scrambled_model(cfg)
    prompt = torch.randint(0, VOCAB, (2, 3))
    greedy = model.generate(prompt, 20, temperature=0)
    top_k = model.generate(prompt, 20, temperature=1.0, top_k=1, generator=torch.Generator().manual_seed(1))
    top_p = model.generate(prompt, 20, temperature=1.0, top_p=1e-9, generator=torch.Generator().manual_seed(2))
    assert torch.equal(top_k, greedy)
    assert torch.equal(top_p, greedy)


def test_top_p_keeps_smallest_nucleus() -> None:
    logits = torch.log(torch.tensor([[0.1, 0.5, 0.3, 0.1]]))
    draws = torch.cat([sample_next(logits, top_p=0.75, generator=torch.Generator().manual_seed(s))
                       for s in range(50)])
    assert set(draws.flatten().tolist()) == {1, 2}  # 0.5 < 0.75 <= 0.5 + 0.3


def test_generate_stream_yields_each_token(cfg: ModelConfig) -> None:
    model = make_model(cfg)
    prompt = torch.randint(0, VOCAB, (3, 2))
    new = list(model.generate_stream(prompt, 7, temperature=0.8, generator=torch.Generator().manual_seed(0)))
    assert len(new) == 7
    assert all(t.shape == (3, 1) and t.dtype == torch.long for t in new)
    assert not any(t.requires_grad for t in new)


def test_generate_rejects_bad_arguments(tiny_cfg: ModelConfig) -> None:
    model = make_model(tiny_cfg)
    prompt = torch.zeros(1, 1, dtype=torch.long)
    for kwargs in ({"temperature": -1.0}, {"top_k": -1}, {"top_p": 0.0}, {"top_p": 1.5}):
        with pytest.raises(ValueError):
            model.generate(prompt, 1, **kwargs)


def test_dropout_active_only_in_train_mode(cfg: ModelConfig) -> None:
    model = make_model(dataclasses.replace(cfg, dropout=0.2))
    idx = torch.randint(0, VOCAB, (2, cfg.block_size))
    model.train()
    assert not torch.equal(model(idx)[0], model(idx)[0])
    model.eval()
    assert torch.equal(model(idx)[0], model(idx)[0])


def test_dropout_equals_the_reference_mask_and_scaling() -> None:
    x = torch.randn(3, 5, 7)
    torch.manual_seed(4)
    got = dropout(x, 0.3, training=True)
    torch.manual_seed(4)
    mask = torch.empty_like(x).bernoulli_(torch.full((), 0.7))
    assert torch.equal(got, x * (mask / 0.7))
    assert 0 < int((got == 0).sum()) < x.numel()
    assert dropout(x, 0.3, training=False) is x and dropout(x, 0.0, training=True) is x


def test_attention_dropout_drops_probabilities_not_outputs() -> None:
    q, k, v = (torch.randn(2, 3, 6, 4) for _ in range(3))
    assert torch.allclose(causal_attention(q, k, v, 0.0, True),
                          torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True), atol=1e-6)
    torch.manual_seed(1)
    got = causal_attention(q, k, v, 0.25, True)
    torch.manual_seed(1)
    probs = torch.softmax((q @ k.transpose(-2, -1) / 2.0).masked_fill(torch.ones(6, 6).triu(1).bool(), -math.inf), -1)
    mask = torch.empty_like(probs).bernoulli_(torch.full((), 0.75))
    torch.testing.assert_close(got, (probs * mask / 0.75) @ v, rtol=0, atol=1e-6)


@pytest.mark.parametrize("T", [8, 300])
def test_half_precision_training_attention_equals_sdpa_written_out_or_not(T: int) -> None:
    """On CPU in bf16 with grad enabled, blocks up to WRITTEN_OUT_MAX_T (256) take the written-out path
    (faster there), longer ones SDPA: either way the output and gradients are SDPA's, to bf16 rounding."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from utils.cpu_probe import probe_half_precision

    if not probe_half_precision("bfloat16").usable:
        pytest.skip(f"bfloat16 cannot run on this CPU: {probe_half_precision('bfloat16').problem}")

    class Ops(TorchDispatchMode):
        names: set[str] = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.add(str(func))
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, T, 16, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    with Ops() as ops:
        got = causal_attention(q, k, v, 0.0, True)
    assert any("flash_attention" in n for n in ops.names) == (T > 256), sorted(ops.names)
    grads = torch.autograd.grad(got.float().square().sum(), (q, k, v))
    want = torch.nn.functional.scaled_dot_product_attention(*(t.float() for t in (q, k, v)), is_causal=True)
    torch.testing.assert_close(got.float(), want, rtol=0.02, atol=0.02)
    for g, w in zip(grads, torch.autograd.grad(want.square().sum(), (q, k, v))):
        torch.testing.assert_close(g.float(), w.float(), rtol=0.05, atol=0.05)


def test_cpu_training_never_draws_from_the_vendor_dependent_kernel(cfg: ModelConfig) -> None:
    """torch's CPU bernoulli_(float) (and so F.dropout and SDPA's dropout) is MKL's parallel VSL
    on Intel and a serial kernel elsewhere; runs with dropout on an Intel Xeon differed from run to
    run (issue 8). The step must only use kernels that are the same on every CPU."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.names: set[str] = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.add(str(func))
            return func(*args, **(kwargs or {}))

    model = make_model(dataclasses.replace(cfg, dropout=0.1)).train()
    x = torch.randint(0, VOCAB, (2, cfg.block_size))
    with Ops() as ops:
        model(x, x)[1].backward()
    assert "aten.bernoulli_.Tensor" in ops.names  # dropout did draw masks
    assert not {n for n in ops.names if n in ("aten.bernoulli_.float", "aten.native_dropout.default")
                or "dropout" in n}, ops.names


def test_overfits_one_batch(cfg: ModelConfig) -> None:
    model = make_model(cfg).train()
    x = torch.randint(0, VOCAB, (4, cfg.block_size))
    y = torch.randint(0, VOCAB, (4, cfg.block_size))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(60):
        _, loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05  # about 0.007 seen
