"""Hugging Face transformers layout: exports as a GPT2LMHeadModel or LlamaForCausalLM folder, and a local
Hugging Face model folder as the start of a fine-tuning run (--init-from). Neither direction imports
transformers: the folder is plain JSON and safetensors, so exporting costs no start-up and works where
transformers is not installed.

    note = write_hf_export(export_dir, model, config, tokenizer)   # export_dir/hf/, or a note why not
    model, tokenizer, config = load_hf_model("path/to/hf_model")     # config.json + model.safetensors

    from transformers import AutoModelForCausalLM, AutoTokenizer      # the user's side
    model = AutoModelForCausalLM.from_pretrained("runs/<id>/artifacts/export/hf")

Names: gpt2 keeps GPT-2's own (HF's Conv1D stores weights as (in, out), so c_attn, c_proj and c_fc are
transposed); llama's fused q/k/v rows split into q_proj, k_proj, v_proj and its fused gate/up rows into
gate_proj, up_proj. A char tokenizer becomes a `tokenizers` WordLevel tokenizer.json that splits text
into single code points and joins them back without spaces. A character outside the vocabulary makes
the Hugging Face tokenizer raise ("Missing [UNK] token"), as gptlab refuses it: no id of this model
means "unknown", and a silent substitute would feed the model text it was never given.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from torch import Tensor

from model import LanguageModel
from parameters import ModelConfig
from tokenizer import CharTokenizer, Gpt2Tokenizer, Tokenizer, gpt2_bpe_files
from utils.files import atomic_path, atomic_write_bytes, atomic_write_json

HF_DIR = "hf"
WEIGHTS = "model.safetensors"
ENDOFTEXT_ID = 50256
MAX_JSON_BYTES = 64 << 20
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


def char_tokenizer_json(chars: list[str]) -> dict:
    """A `tokenizers` tokenizer.json with gptlab's char ids: every code point is a piece ([\\s\\S] matches
    newlines too), looked up in a WordLevel vocabulary whose unk token is not in it (so an unknown
    character is an error, as in gptlab), and decoded by Fuse (no spaces between characters)."""
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
            "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "[\\s\\S]"}, "behavior": "Isolated",
                              "invert": False},
            "post_processor": None, "decoder": {"type": "Fuse"},
            "model": {"type": "WordLevel", "vocab": {c: i for i, c in enumerate(chars)}, "unk_token": "<unk>"}}


def hf_tokenizer_files(tokenizer: dict, block_size: int) -> dict[str, bytes] | None:
    """The files AutoTokenizer.from_pretrained loads for this tokenizer, or None if it has no HF form."""
    config = {"clean_up_tokenization_spaces": False, "model_max_length": block_size}
    if tokenizer.get("type") == "char":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        return {"tokenizer.json": _json_bytes(char_tokenizer_json(tokenizer["chars"])),
                "tokenizer_config.json": _json_bytes(config)}
    if tokenizer.get("type") == "gpt2":
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
    tokenizer_files = hf_tokenizer_files(tokenizer, cfg.block_size)
    eos = ENDOFTEXT_ID if tokenizer.get("type") == "gpt2" else None
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


# --- Hugging Face -> gptlab ---------------------------------------------------------------------------

def is_hf_model_dir(path: str | Path) -> bool:
    """A folder whose config.json names a transformers model_type (gptlab's own exports never do)."""
    try:
        raw = json.loads((Path(path) / "config.json").read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(raw, dict) and "model_type" in raw


def load_hf_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[LanguageModel, Tokenizer, ModelConfig]:
    """(model in eval mode on device, tokenizer, config) from a local transformers GPT2/Llama folder
    (config.json + model.safetensors + GPT-2's or gptlab's char tokenizer), as load_export returns them.
    What gptlab's blocks cannot compute exactly is refused in one line, never approximated silently."""
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
    model = LanguageModel(cfg, tokenizer.vocab_size)
    weights = hf_dir / WEIGHTS
    try:
        model.load_state_dict(gptlab_state_dict(_read_weights(hf_dir), cfg, weights), strict=True)
    except RuntimeError as e:  # shapes that are not this config's
        raise ValueError(f"{weights} does not fit its config.json: {' '.join(str(e).split())[:300]}") from None
    for note in notes:
        print(note, file=sys.stderr)
    return model.to(device).eval(), tokenizer, cfg


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


def hf_tokenizer(hf_dir: Path) -> CharTokenizer | Gpt2Tokenizer:
    """GPT-2's tokenizer (its exact vocabulary and merges) or a char tokenizer.json in gptlab's form."""
    if (hf_dir / "tokenizer.json").is_file():
        spec = _read_json(hf_dir / "tokenizer.json")
        model = spec.get("model") if isinstance(spec.get("model"), dict) else {}
        if model.get("type") == "WordLevel" and (chars := _char_vocabulary(spec)):
            return CharTokenizer(chars)
        if model.get("type") == "BPE" and _is_gpt2(model.get("vocab"), model.get("merges")):
            return Gpt2Tokenizer()
    elif (hf_dir / "vocab.json").is_file() and (hf_dir / "merges.txt").is_file():
        lines = (hf_dir / "merges.txt").read_text(encoding="utf-8").split("\n")
        merges = [m for m in lines[1 if lines[0].startswith("#version") else 0:] if m]
        if _is_gpt2(_read_json(hf_dir / "vocab.json"), merges):
            return Gpt2Tokenizer()
    raise ValueError(f"'{hf_dir}': its tokenizer is neither GPT-2's nor a char tokenizer.json as gptlab writes it; "
                     "gptlab fine-tunes with those only (GPT-2's vocab.json and merges.txt, or such a tokenizer.json)")


def _char_vocabulary(spec: dict) -> list[str] | None:
    """The characters in id order, if the tokenizer.json is the one char_tokenizer_json writes."""
    vocab = spec["model"].get("vocab")
    if not isinstance(vocab, dict) or sorted(vocab.values()) != list(range(len(vocab))) \
            or any(len(c) != 1 for c in vocab):
        return None
    chars = sorted(vocab, key=vocab.get)
    ours = char_tokenizer_json(chars)
    same = all(spec.get(k) == ours[k] for k in ("normalizer", "pre_tokenizer", "decoder", "model"))
    return chars if same and not spec.get("added_tokens") else None


def _is_gpt2(vocab: object, merges: object) -> bool:
    encoder, bpe = gpt2_bpe_files()
    if vocab != json.loads(encoder) or not isinstance(merges, list):
        return False
    return [m if isinstance(m, str) else " ".join(m) for m in merges] == bpe.decode().split("\n")[1:-1]


def _read_json(path: Path) -> dict:
    """A JSON object file of a Hugging Face folder, with one-line errors naming it."""
    if not path.is_file():
        raise FileNotFoundError(f"'{path}' is missing")
    if path.stat().st_size > MAX_JSON_BYTES:
        raise ValueError(f"{path} is larger than {MAX_JSON_BYTES >> 20} MB; not a config or tokenizer file")
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"{path} is not valid JSON ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value
