"""A local Hugging Face transformers model folder (GPT2, Llama or Qwen3: config.json, model.safetensors
and a tokenizer) as gptlab's weights, tokenizer and config: the start of a fine-tuning run (--init-from).
Like the export side (rundir/hf_export.py), it reads plain JSON and safetensors and never imports
transformers.

    weights, tokenizer, config, _ = read_hf_model("path/to/hf_model")    # a rundir/snapshot.Snapshot

What gptlab's blocks would compute differently is refused in one line, never approximated silently;
GPT-2's own tanh GELU is the one exception, accepted with a note.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from torch import Tensor

from parameters import ModelConfig
from tokenizer import ENDOFTEXT, BpeTokenizer, CharTokenizer, Gpt2Tokenizer, gpt2_bpe_files
from utils.files import read_json
from rundir.hf_export import BUFFER_SUFFIXES, LINKS, TANH_GELUS, WEIGHTS, char_tokenizer_json
from rundir.snapshot import Snapshot


def is_hf_model_dir(path: str | Path) -> bool:
    """A folder whose config.json names a transformers model_type (gptlab's own exports never do)."""
    try:
        raw = read_json(Path(path) / "config.json")
    except (OSError, ValueError):  # no such file, or not JSON: not a Hugging Face folder
        return False
    return isinstance(raw, dict) and "model_type" in raw


def read_hf_model(path: str | Path) -> Snapshot:
    """The model of a local transformers GPT2/Llama/Qwen3 folder (config.json + model.safetensors + GPT-2's or
    gptlab's char or bpe tokenizer) as a Snapshot: its weights renamed to gptlab's, its
    tokenizer and config. What gptlab's blocks cannot compute exactly is refused in one line, never
    approximated silently."""
    hf_dir = Path(path)
    raw = _read_json(hf_dir / "config.json")
    arch, notes = gptlab_architecture(raw, f"{hf_dir / 'config.json'}")
    tokenizer = hf_tokenizer(hf_dir)
    if raw.get("vocab_size") != tokenizer.vocab_size:
        raise ValueError(f"{hf_dir / 'config.json'}: vocab_size {raw.get('vocab_size')} differs from its tokenizer's "
                         f"{tokenizer.vocab_size} tokens; gptlab's model has one row per token of its tokenizer")
    try:
        cfg = ModelConfig(**arch, tokenizer=tokenizer.name).validate()
    except ValueError as e:
        raise ValueError(f"{hf_dir / 'config.json'}: {e}") from None
    weights = hf_dir / WEIGHTS
    state = gptlab_state_dict(_read_weights(hf_dir), cfg, weights)
    for note in notes:
        print(note, file=sys.stderr)
    return Snapshot(state, tokenizer, cfg, f"{weights} does not fit its config.json")


def gptlab_architecture(raw: dict, where: str) -> tuple[dict, list[str]]:
    """The ModelConfig architecture keys of a transformers config.json, and notes; a ValueError for
    what gptlab's gpt2 or llama block would compute differently."""
    kind = raw.get("model_type")
    if kind == "gpt2":
        return _gpt2_architecture(raw, where)
    if kind == "llama":
        return _llama_architecture(raw, where), []
    if kind == "qwen3":  # llama with qk_norm
        if raw.get("use_sliding_window"):
            raise ValueError(f"{where}: use_sliding_window=true has no counterpart in gptlab's llama block")
        return {**_llama_architecture(raw, where), "qk_norm": True}, []
    raise ValueError(f"{where}: model_type '{kind}' is not one gptlab can start from; it maps gpt2, llama and "
                     "qwen3 (llama with qk_norm)")


def _gpt2_architecture(raw: dict, where: str) -> tuple[dict, list[str]]:
    act = raw.get("activation_function", "gelu_new")
    if act not in ("gelu", *TANH_GELUS):
        raise ValueError(f"{where}: activation_function '{act}' is not GELU, which gptlab's gpt2 block computes")
    for key, unsupported in (("scale_attn_weights", False), ("scale_attn_by_inverse_layer_idx", True),
                             ("add_cross_attention", True)):
        if raw.get(key, not unsupported) == unsupported:
            raise ValueError(f"{where}: {key}={unsupported} has no counterpart in gptlab's gpt2 block")
    n_embd = _integer(raw, "n_embd", where)
    notes = [f"note: {where} uses activation '{act}' (the tanh approximation of GELU); gptlab's gpt2 computes the "
             "exact GELU, so its outputs differ slightly from the original model's"] if act in TANH_GELUS else []
    return dict(arch="gpt2", n_layer=_integer(raw, "n_layer", where), n_head=_integer(raw, "n_head", where),
                n_embd=n_embd, block_size=_integer(raw, "n_positions", where), bias=True, n_kv_head=0,
                mlp_ratio=_ratio(raw.get("n_inner") or 4 * n_embd, n_embd, where),
                norm_eps=float(raw.get("layer_norm_epsilon", 1e-5)),
                tie_embeddings=bool(raw.get("tie_word_embeddings", True))), notes


def _llama_architecture(raw: dict, where: str) -> dict:
    n_embd, n_head = _integer(raw, "hidden_size", where), _integer(raw, "num_attention_heads", where)
    rope = raw.get("rope_parameters") or {}
    for key, ok in (("hidden_act", raw.get("hidden_act", "silu") == "silu"),
                    ("attention_bias", not raw.get("attention_bias")), ("mlp_bias", not raw.get("mlp_bias")),
                    ("head_dim", raw.get("head_dim") in (None, n_embd // n_head)),
                    ("rope_scaling", not raw.get("rope_scaling")),
                    ("rope_parameters", isinstance(rope, dict) and rope.get("rope_type", "default") == "default"
                     and rope.get("partial_rotary_factor", 1.0) == 1.0)):
        if not ok:
            raise ValueError(f"{where}: {key}={raw.get(key)!r} has no counterpart in gptlab's llama block (SiLU, "
                             "no biases, head_dim = hidden_size / num_attention_heads, plain rotary)")
    n_kv_head = raw.get("num_key_value_heads") or n_head
    return dict(arch="llama", n_layer=_integer(raw, "num_hidden_layers", where), n_head=n_head, n_embd=n_embd,
                block_size=_integer(raw, "max_position_embeddings", where), bias=False,
                n_kv_head=0 if n_kv_head == n_head else n_kv_head,
                mlp_ratio=_ratio(_integer(raw, "intermediate_size", where), n_embd, where),
                norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
                tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
                rope_theta=float(rope.get("rope_theta") or raw.get("rope_theta") or 10000.0))


def _integer(raw: dict, key: str, where: str) -> int:
    value = raw.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{where}: '{key}' is missing or not an integer ({value!r})")
    return value


def _ratio(hidden: int, n_embd: int, where: str) -> float:
    """mlp_ratio such that ModelConfig.mlp_hidden = int(mlp_ratio * n_embd) gives `hidden` back."""
    ratio = hidden / n_embd
    if int(ratio * n_embd) != hidden:
        raise ValueError(f"{where}: an MLP width of {hidden} is not int(mlp_ratio * {n_embd}) for any float mlp_ratio")
    return ratio


def gptlab_state_dict(tensors: dict[str, Tensor], cfg: ModelConfig, weights: Path) -> dict[str, Tensor]:
    """transformers' tensors in gptlab's names and shapes (float32); a tensor left over is an error."""
    if cfg.arch == "gpt2" and "transformer.wte.weight" not in tensors:  # GPT-2's original files: no prefix
        tensors = {k if k.startswith("lm_head.") else f"transformer.{k}": v for k, v in tensors.items()}
    tensors = {k: v for k, v in tensors.items() if not k.endswith(BUFFER_SUFFIXES)}
    if cfg.tie_embeddings:
        tensors.pop("lm_head.weight", None)  # transformers ties it to the embedding, as gptlab does
    state = {}
    for link in LINKS[cfg.arch](cfg):
        missing = [name for name in link.theirs if name not in tensors]
        if missing:
            raise ValueError(f"{weights} has no tensor '{missing[0]}', which its config.json implies")
        t = torch.cat([tensors.pop(name) for name in link.theirs])
        state[link.ours] = (t.t() if link.transpose else t).to(torch.float32).contiguous()
    if tensors:
        raise ValueError(f"{weights} holds tensors outside the {cfg.arch} layout ({', '.join(sorted(tensors)[:3])})")
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["transformer.wte.weight"]
    return state


def _read_weights(hf_dir: Path) -> dict[str, Tensor]:
    weights = hf_dir / WEIGHTS
    if not weights.is_file():
        if (hf_dir / f"{WEIGHTS}.index.json").is_file():
            raise ValueError(f"'{hf_dir}' holds a sharded model; gptlab reads one {WEIGHTS}: save it unsharded "
                             "(save_pretrained(dir, max_shard_size='1000GB'))")
        if (hf_dir / "pytorch_model.bin").is_file():
            raise ValueError(f"'{hf_dir}' has only pytorch_model.bin, a pickle, which gptlab never loads; convert it to "
                             f"{WEIGHTS} (transformers' save_pretrained writes safetensors)")
        raise FileNotFoundError(f"'{hf_dir}' has no {WEIGHTS}")
    try:
        return safetensors.torch.load_file(str(weights))
    except (OSError, safetensors.SafetensorError) as e:
        raise ValueError(f"{weights} is not a readable safetensors file ({' '.join(str(e).split())[:200]})") from None


def hf_tokenizer(hf_dir: Path) -> CharTokenizer | Gpt2Tokenizer | BpeTokenizer:
    """GPT-2's tokenizer (its exact vocabulary and merges), or a char or bpe tokenizer.json in gptlab's form."""
    if (hf_dir / "tokenizer.json").is_file():
        spec = _read_json(hf_dir / "tokenizer.json")
        model = spec.get("model") if isinstance(spec.get("model"), dict) else {}
        if model.get("type") == "WordLevel" and (char := _char_tokenizer(spec)):
            return char
        if model.get("type") == "BPE" and _is_gpt2(model.get("vocab"), model.get("merges")):
            return Gpt2Tokenizer()
        if model.get("type") == "BPE":
            with contextlib.suppress(ValueError):  # a BPE other than GPT-2's or gptlab's: refused below
                return BpeTokenizer.from_hf_json(json.dumps(_without_empty_post_processor(spec)))
    elif (hf_dir / "vocab.json").is_file() and (hf_dir / "merges.txt").is_file():
        lines = (hf_dir / "merges.txt").read_text(encoding="utf-8").split("\n")
        merges = [m for m in lines[1 if lines[0].startswith("#version") else 0:] if m]
        if _is_gpt2(_read_json(hf_dir / "vocab.json"), merges):
            return Gpt2Tokenizer()
    raise ValueError(f"'{hf_dir}': its tokenizer is neither GPT-2's nor a char or bpe tokenizer.json as gptlab writes "
                     "it; gptlab fine-tunes with those only (GPT-2's vocab.json and merges.txt, or such a tokenizer.json)")


def _char_tokenizer(spec: dict) -> CharTokenizer | None:
    """The char tokenizer, if the tokenizer.json is one char_tokenizer_json writes (with or without
    "<|endoftext|>" after the characters)."""
    vocab = spec["model"].get("vocab")
    if not isinstance(vocab, dict) or sorted(vocab.values()) != list(range(len(vocab))):
        return None
    end_of_text = ENDOFTEXT in vocab
    chars = [c for c in sorted(vocab, key=vocab.get) if c != ENDOFTEXT]
    if not chars or any(len(c) != 1 for c in chars):
        return None
    ours, theirs = char_tokenizer_json(chars, end_of_text), spec | {"added_tokens": spec.get("added_tokens") or []}
    same = all(theirs.get(k) == ours[k] for k in ("normalizer", "pre_tokenizer", "decoder", "model", "added_tokens"))
    return CharTokenizer(chars, end_of_text) if same else None


def _without_empty_post_processor(spec: dict) -> dict:
    """The tokenizer.json without the post-processor that transformers' save_pretrained adds to one that
    had none: a TemplateProcessing with no special tokens, which adds no token to any text."""
    post = spec.get("post_processor")
    if isinstance(post, dict) and post.get("type") == "TemplateProcessing" and post.get("special_tokens") == {}:
        return spec | {"post_processor": None}
    return spec


def _is_gpt2(vocab: object, merges: object) -> bool:
    encoder, bpe = gpt2_bpe_files()
    if vocab != json.loads(encoder) or not isinstance(merges, list):
        return False
    return [m if isinstance(m, str) else " ".join(m) for m in merges] == bpe.decode().split("\n")[1:-1]


def _read_json(path: Path) -> dict:
    """A JSON object file of a Hugging Face folder, with one-line errors naming it."""
    value = read_json(path)
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value
