"""Hugging Face transformers layout: which gptlab tensor is which transformers tensor, and exports as a
GPT2LMHeadModel, LlamaForCausalLM or (llama with qk_norm) Qwen3ForCausalLM folder. The reverse, a
transformers folder as --init-from's start, is rundir/hf_import.py. Neither imports transformers: the
folder is plain JSON and safetensors, so exporting costs no start-up and works where transformers is
not installed.

    note = write_hf_export(export_dir, model, config, tokenizer)   # export_dir/hf/, or a note why not

    from transformers import AutoModelForCausalLM, AutoTokenizer      # the user's side
    model = AutoModelForCausalLM.from_pretrained("runs/<id>/artifacts/export/hf")

Names: gpt2 keeps GPT-2's own (HF's Conv1D stores weights as (in, out), so c_attn, c_proj and c_fc are
transposed); llama's fused q/k/v rows split into q_proj, k_proj, v_proj and its fused gate/up rows into
gate_proj, up_proj. A char tokenizer becomes a `tokenizers` WordLevel tokenizer.json that splits text
into single code points and joins them back without spaces. A character outside the vocabulary makes
the Hugging Face tokenizer raise ("Missing [UNK] token"), as gptlab refuses it: no id of this model
means "unknown", and a silent substitute would feed the model text it was never given. A char
tokenizer's end-of-text id is the added special token "<|endoftext|>" (which, unlike gptlab's char
encode, Hugging Face's reads in a text as that id). A bpe tokenizer's tokenizer.json is its own.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from torch import Tensor

from parameters import ModelConfig
from tokenizer import (ENDOFTEXT, BpeTokenizer, CharTokenizer, Gpt2Tokenizer, Tokenizer, gpt2_bpe_files,
                       tokenizer_from_dict)
from utils.files import atomic_path, atomic_write_bytes, atomic_write_json

HF_DIR = "hf"
WEIGHTS = "model.safetensors"
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # GPT-2's own activation, the tanh approximation
# Tensors some Hugging Face files carry that are buffers, not weights: causal masks, rotary frequencies.
BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")


@dataclass(frozen=True)
class Link:
    """One gptlab tensor and the Hugging Face tensor(s) it is: split by rows into `theirs` (sizes), and
    transposed first where HF stores it as a Conv1D."""
    ours: str
    theirs: tuple[str, ...]
    transpose: bool = False
    sizes: tuple[int, ...] = ()


def _gpt2_links(cfg: ModelConfig) -> list[Link]:
    names = ["transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight", "transformer.ln_f.bias"]
    links = [Link(n, (n,)) for n in names]
    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}."
        for n in ("ln_1.weight", "ln_1.bias", "attn.c_attn.bias", "attn.c_proj.bias", "ln_2.weight", "ln_2.bias",
                  "mlp.c_fc.bias", "mlp.c_proj.bias"):
            links.append(Link(p + n, (p + n,)))
        for n in ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"):
            links.append(Link(p + n, (p + n,), transpose=True))
    return links + ([] if cfg.tie_embeddings else [Link("lm_head.weight", ("lm_head.weight",))])


def _llama_links(cfg: ModelConfig) -> list[Link]:
    hd = cfg.n_embd // cfg.n_head
    qkv = (cfg.n_head * hd, cfg.kv_heads * hd, cfg.kv_heads * hd)
    links = [Link("transformer.wte.weight", ("model.embed_tokens.weight",)),
             Link("transformer.ln_f.weight", ("model.norm.weight",))]
    for i in range(cfg.n_layer):
        ours, theirs = f"transformer.h.{i}.", f"model.layers.{i}."
        attn, mlp = theirs + "self_attn.", theirs + "mlp."
        links += [
            Link(ours + "ln_1.weight", (theirs + "input_layernorm.weight",)),
            Link(ours + "attn.c_attn.weight", (attn + "q_proj.weight", attn + "k_proj.weight", attn + "v_proj.weight"),
                 sizes=qkv),
            Link(ours + "attn.c_proj.weight", (attn + "o_proj.weight",)),
            Link(ours + "ln_2.weight", (theirs + "post_attention_layernorm.weight",)),
            Link(ours + "mlp.c_fc.weight", (mlp + "gate_proj.weight", mlp + "up_proj.weight"),
                 sizes=(cfg.mlp_hidden, cfg.mlp_hidden)),
            Link(ours + "mlp.c_proj.weight", (mlp + "down_proj.weight",)),
        ]
        if cfg.qk_norm:  # Qwen3's layout: RMSNorm over each head's queries and keys, before rotary
            links += [Link(ours + "attn.q_norm.weight", (attn + "q_norm.weight",)),
                      Link(ours + "attn.k_norm.weight", (attn + "k_norm.weight",))]
    return links + ([] if cfg.tie_embeddings else [Link("lm_head.weight", ("lm_head.weight",))])


LINKS = {"gpt2": _gpt2_links, "llama": _llama_links}


# --- gptlab -> Hugging Face ---------------------------------------------------------------------------

def layout_problem(cfg: ModelConfig, state: dict[str, Tensor]) -> str | None:
    """What keeps this model out of transformers' GPT2/Llama classes (one phrase), or None."""
    if cfg.arch not in LINKS:
        return f"arch '{cfg.arch}'"
    if cfg.qk_norm and cfg.arch == "gpt2":
        return "arch 'gpt2' with qk_norm (transformers' GPT2 does not normalize queries and keys)"
    if cfg.arch == "gpt2" and cfg.kv_heads != cfg.n_head:
        return f"arch 'gpt2' with n_kv_head={cfg.n_kv_head} (transformers' GPT2 has no grouped-query attention)"
    covered = {link.ours for link in LINKS[cfg.arch](cfg)}
    expected = set(state) - ({"lm_head.weight"} if cfg.tie_embeddings else set())
    odd = sorted((expected - covered) | {k for k in covered - expected if not k.endswith(".bias")})
    if odd:
        return f"arch '{cfg.arch}' with parameters outside its layout ({', '.join(odd[:3])})"
    return None


def hf_state_dict(state: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """gptlab's state dict in transformers' names and shapes (float32, CPU, unshared: safetensors asks it).
    A gpt2 model without biases gets zero biases, which transformers' GPT2 always has."""
    out = {}
    for link in LINKS[cfg.arch](cfg):
        if link.ours in state:
            t = state[link.ours].detach().to("cpu", torch.float32)
        else:  # bias=False: LayerNorm and Linear biases are zeros of the weight's first dimension
            t = torch.zeros(state[link.ours.removesuffix("bias") + "weight"].shape[0])
        t = t.t() if link.transpose else t
        parts = t.split(list(link.sizes)) if link.sizes else (t,)
        out.update({name: part.contiguous().clone() for name, part in zip(link.theirs, parts)})
    return out


def hf_config(cfg: ModelConfig, vocab_size: int, eos: int | None) -> dict:
    """config.json for GPT2LMHeadModel or LlamaForCausalLM (transformers 5 names)."""
    common = {"vocab_size": vocab_size, "tie_word_embeddings": cfg.tie_embeddings, "bos_token_id": eos,
              "eos_token_id": eos, "pad_token_id": None, "dtype": "float32"}
    if cfg.arch == "gpt2":
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": cfg.n_embd,
                "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_positions": cfg.block_size,
                "n_inner": cfg.mlp_hidden, "activation_function": "gelu", "layer_norm_epsilon": cfg.norm_eps,
                "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
                "scale_attn_weights": True, **common}
    # llama with qk_norm is transformers' Qwen3: Llama's block with q_norm/k_norm (and no sliding window).
    qwen3 = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "use_sliding_window": False,
             "sliding_window": None, "max_window_layers": cfg.n_layer}
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **(qwen3 if cfg.qk_norm else {}),
            "hidden_size": cfg.n_embd,
            "intermediate_size": cfg.mlp_hidden, "num_hidden_layers": cfg.n_layer,
            "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.kv_heads,
            "head_dim": cfg.n_embd // cfg.n_head, "hidden_act": "silu", "max_position_embeddings": cfg.block_size,
            "rms_norm_eps": cfg.norm_eps, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
            "attention_bias": False, "mlp_bias": False, **common}


def char_tokenizer_json(chars: list[str], end_of_text: bool = False) -> dict:
    """A `tokenizers` tokenizer.json with gptlab's char ids: every code point is a piece ([\\s\\S] matches
    newlines too), looked up in a WordLevel vocabulary whose unk token is not in it (so an unknown
    character is an error, as in gptlab), and decoded by Fuse (no spaces between characters). With
    end_of_text, "<|endoftext|>" is id len(chars), in the vocabulary and as an added special token."""
    vocab = {c: i for i, c in enumerate(chars)} | ({ENDOFTEXT: len(chars)} if end_of_text else {})
    added = [{"id": len(chars), "content": ENDOFTEXT, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True}] if end_of_text else []
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
            "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "[\\s\\S]"}, "behavior": "Isolated",
                              "invert": False},
            "post_processor": None, "decoder": {"type": "Fuse"},
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}}


def hf_tokenizer_files(tokenizer: Tokenizer, block_size: int) -> dict[str, bytes] | None:
    """The files AutoTokenizer.from_pretrained loads for this tokenizer, or None if it has no HF form."""
    config = {"clean_up_tokenization_spaces": False, "model_max_length": block_size}
    fast = config | {"tokenizer_class": "PreTrainedTokenizerFast"}
    if tokenizer.eot_id is not None:
        fast |= {"bos_token": ENDOFTEXT, "eos_token": ENDOFTEXT}
    if isinstance(tokenizer, CharTokenizer):
        spec = char_tokenizer_json(tokenizer.chars, tokenizer.end_of_text)
        return {"tokenizer.json": _json_bytes(spec), "tokenizer_config.json": _json_bytes(fast)}
    if isinstance(tokenizer, BpeTokenizer):
        return {"tokenizer.json": tokenizer.hf_json().encode("utf-8"), "tokenizer_config.json": _json_bytes(fast)}
    if isinstance(tokenizer, Gpt2Tokenizer):
        vocab, merges = gpt2_bpe_files()
        config |= {"tokenizer_class": "GPT2Tokenizer", "add_prefix_space": False, "bos_token": "<|endoftext|>",
                   "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
        return {"vocab.json": vocab, "merges.txt": merges, "tokenizer_config.json": _json_bytes(config)}
    return None


def _json_bytes(obj: object) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def remove_hf_export(export_dir: Path) -> None:
    """Drop export_dir/hf and any temp folder a stopped writer left: new weights never sit beside old hf/."""
    for path in [export_dir / HF_DIR, *export_dir.glob(f".{HF_DIR}.*.tmp")]:
        shutil.rmtree(path, ignore_errors=True)


def write_hf_export(export_dir: Path, model: torch.nn.Module, config: dict, tokenizer: dict) -> str | None:
    """Write export_dir/hf (built in a temp folder, then renamed in: never half there); return a one-line
    note when the model (or its tokenizer) has no Hugging Face form, else None."""
    cfg = ModelConfig(**{k: v for k, v in config.items() if k in ModelConfig.__dataclass_fields__})
    state = model.state_dict()
    target = export_dir / HF_DIR
    if problem := layout_problem(cfg, state):
        return f"note: no Hugging Face layout for {problem}; {target}/ not written"
    tok = tokenizer_from_dict(tokenizer)
    tokenizer_files = hf_tokenizer_files(tok, cfg.block_size)
    eos = tok.eot_id
    vocab_size = state["transformer.wte.weight"].shape[0]
    tmp = export_dir / f".{HF_DIR}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    tmp.mkdir()
    try:
        with atomic_path(tmp / WEIGHTS) as path:
            safetensors.torch.save_file(hf_state_dict(state, cfg), str(path), metadata={"format": "pt"})
        atomic_write_json(tmp / "config.json", hf_config(cfg, vocab_size, eos))
        atomic_write_json(tmp / "generation_config.json", {"bos_token_id": eos, "eos_token_id": eos,
                                                           "pad_token_id": eos})
        for name, data in (tokenizer_files or {}).items():
            atomic_write_bytes(tmp / name, data)
        shutil.rmtree(target, ignore_errors=True)  # a directory cannot be replaced by rename: the old one goes
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if tokenizer_files is None:
        return f"note: no Hugging Face tokenizer for tokenizer '{tokenizer.get('type')}'; {target}/ holds the model only"
    return None
