"""utils/hf.py and utils/hf_import.py: exports load in Hugging Face transformers with the same logits, greedy text and char ids;
transformers' own GPT2/Llama folders start a fine-tuning run; what has no counterpart is said in one line.
transformers makes the models here (tiny, seeded); nothing is downloaded."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch

import inference
import train
from architectures import ARCHITECTURES
from architectures.gpt2 import GPT2Block
from model import LanguageModel
from parameters import ModelConfig
from tokenizer import ENDOFTEXT, BpeTokenizer, CharTokenizer, Gpt2Tokenizer, gpt2_bpe_files
from rundir.export import load_init_source, save_export
from utils.files import sha256_file
from rundir.hf_export import char_tokenizer_json
from rundir.hf_import import hf_tokenizer

from conftest import TINY_TEXT, call_main, user_error

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: it reads this once
os.environ["TRANSFORMERS_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")

CHARS = CharTokenizer.from_text(TINY_TEXT + "é😀")
CHARS_EOT = CharTokenizer.build([TINY_TEXT, "é😀"], end_of_text=True)
BPE = BpeTokenizer.build(TINY_TEXT.split("\n\n"), vocab_size=300)
TEXT = "All:\n  Speak, speak.  é😀\n\n"


@ARCHITECTURES.register("toy_hf")
class ToyBlock(GPT2Block):
    """A user's own block family: no Hugging Face class computes it."""


def tiny(**overrides) -> ModelConfig:
    return ModelConfig(**{"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32, "device": "cpu", **overrides}).validate()


def exported(cfg: ModelConfig, tmp_path: Path, tokenizer=CHARS) -> tuple[LanguageModel, Path]:
    """A seeded model with every weight (norms and biases too) moved off its init, and its export."""
    torch.manual_seed(0)
    model = LanguageModel(cfg, tokenizer.vocab_size).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    save_export(tmp_path / "export", model, cfg.to_dict(), tokenizer.to_dict())
    return model, tmp_path / "export" / "hf"


CONFIGS = {
    "gpt2": {},
    "gpt2-no-bias-untied": {"bias": False, "tie_embeddings": False, "mlp_ratio": 3.0, "norm_eps": 1e-6},
    "llama": {"arch": "llama", "mlp_ratio": 8 / 3},
    "llama-gqa-untied": {"arch": "llama", "n_head": 4, "n_kv_head": 2, "tie_embeddings": False, "rope_theta": 500.0},
    "llama-qk-norm-as-qwen3": {"arch": "llama", "qk_norm": True, "n_head": 4, "n_kv_head": 2, "mlp_ratio": 3.0},
}


@pytest.mark.parametrize("overrides", CONFIGS.values(), ids=CONFIGS.keys())
def test_transformers_computes_the_export_as_gptlab_does(overrides: dict, tmp_path: Path):
    cfg = tiny(**overrides)
    model, hf_dir = exported(cfg, tmp_path)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    expected = "GPT2LMHeadModel" if cfg.arch == "gpt2" else "Qwen3ForCausalLM" if cfg.qk_norm else "LlamaForCausalLM"
    assert type(hf_model).__name__ == expected
    ids = hf_tok(TEXT)["input_ids"]
    assert ids == CHARS.encode(TEXT) and len(ids) <= cfg.block_size
    x = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(hf_model(x).logits, model(x)[0], atol=1e-4, rtol=0)
    prompt = x[:, :8]
    ours = model.generate(prompt, max_new_tokens=20, temperature=0)
    theirs = hf_model.generate(prompt, max_new_tokens=20, do_sample=False)
    assert hf_tok.decode(theirs[0]) == CHARS.decode(ours[0])


def test_greedy_text_equals_inference_py(trained_run: Path):
    hf_dir = trained_run / "artifacts" / "export" / "hf"
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    prompt, n = "All:\n", 24  # within block_size 32: past it gptlab slides its window, transformers cannot
    res = call_main(inference.main, "--run", str(trained_run), "--prompt", prompt, "--temperature", "0",
                    "--max-new-tokens", str(n), "--device", "cpu")
    out = hf_model.generate(torch.tensor([hf_tok(prompt)["input_ids"]]), max_new_tokens=n, do_sample=False)
    assert res.stdout == hf_tok.decode(out[0]) + "\n"


def test_the_char_tokenizer_encodes_and_decodes_like_gptlab(tmp_path: Path):
    _, hf_dir = exported(tiny(), tmp_path)
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    text = "".join(CHARS.chars) + TEXT
    assert hf_tok(text)["input_ids"] == CHARS.encode(text)
    assert hf_tok.decode(CHARS.encode(text)) == text  # no spaces between characters, none cleaned up
    assert len(hf_tok) == CHARS.vocab_size
    with pytest.raises(Exception, match="UNK"):  # as gptlab refuses it: no id stands for "unknown"
        hf_tok("Zebra")


def test_the_gpt2_tokenizer_is_gpt2s(tmp_path: Path):
    _, hf_dir = exported(tiny(n_embd=16, n_layer=1), tmp_path, Gpt2Tokenizer())
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    text = TEXT + " <|endoftext|> it's 2 o'clock\t\n"
    assert hf_tok(text)["input_ids"] == Gpt2Tokenizer().encode(text)
    assert hf_tok.decode(Gpt2Tokenizer().encode(text)) == text
    assert json.loads((hf_dir / "config.json").read_text())["eos_token_id"] == 50256


def test_the_bpe_tokenizer_loads_in_transformers(tmp_path: Path):
    _, hf_dir = exported(tiny(), tmp_path, BPE)
    assert (hf_dir / "tokenizer.json").read_text(encoding="utf-8") == BPE.hf_json()  # its own file, as it is
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    text = TEXT + ENDOFTEXT + " it's 2 o'clock\t\n日本語 🙂\x00"
    ids = hf_tok(text)["input_ids"]
    assert ids == BPE.encode(text) and ids.count(BPE.eot_id) == 1
    assert hf_tok.decode(ids) == text
    assert len(hf_tok) == BPE.vocab_size
    assert (hf_tok.eos_token, hf_tok.eos_token_id, hf_tok.bos_token_id) == (ENDOFTEXT, BPE.eot_id, BPE.eot_id)
    for name in ("config.json", "generation_config.json"):
        saved = json.loads((hf_dir / name).read_text())
        assert saved["eos_token_id"] == saved["bos_token_id"] == BPE.eot_id


def test_a_char_tokenizers_end_of_text_is_the_exports_eos(tmp_path: Path):
    _, hf_dir = exported(tiny(), tmp_path, CHARS_EOT)
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    eot = CHARS_EOT.eot_id
    assert eot == len(CHARS_EOT.chars) and len(hf_tok) == CHARS_EOT.vocab_size
    assert hf_tok(TEXT)["input_ids"] == CHARS_EOT.encode(TEXT)
    ids = [*CHARS_EOT.encode("All:"), eot, *CHARS_EOT.encode("Speak")]
    assert hf_tok.decode(ids) == CHARS_EOT.decode(ids) == f"All:{ENDOFTEXT}Speak"
    assert (hf_tok.eos_token_id, hf_tok.bos_token_id) == (eot, eot)
    assert json.loads((hf_dir / "config.json").read_text())["eos_token_id"] == eot
    _, hf_dir = exported(tiny(), tmp_path, CHARS)  # without end_of_text: no eos at all, as before
    assert json.loads((hf_dir / "config.json").read_text())["eos_token_id"] is None
    assert "eos_token" not in json.loads((hf_dir / "tokenizer_config.json").read_text())


@pytest.mark.parametrize("tok", [BPE, CHARS_EOT], ids=["bpe", "char-eot"])
def test_a_bpe_or_end_of_text_export_loads_back_as_the_same_tokenizer(tok, tmp_path: Path):
    model, hf_dir = exported(tiny(arch="llama"), tmp_path, tok)
    loaded, tokenizer, cfg = load_init_source(hf_dir)
    assert type(tokenizer) is type(tok) and cfg.tokenizer == tok.name
    assert (tokenizer.fingerprint(), tokenizer.eot_id, tokenizer.vocab_size) == (tok.fingerprint(), tok.eot_id,
                                                                                  tok.vocab_size)
    x = torch.tensor([tok.encode(TEXT)[:32]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)[0], model(x)[0], atol=1e-5, rtol=0)
    # transformers' save_pretrained adds an empty post-processor to tokenizer.json: still the same tokenizer
    transformers.AutoTokenizer.from_pretrained(hf_dir).save_pretrained(tmp_path / "resaved")
    assert hf_tokenizer(tmp_path / "resaved").fingerprint() == tok.fingerprint()


def test_a_bpe_tokenizer_that_is_not_gptlabs_is_refused(tmp_path: Path):
    _, hf_dir = exported(tiny(), tmp_path, BPE)
    spec = json.loads((hf_dir / "tokenizer.json").read_text())
    prepend_bos = {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": ENDOFTEXT, "type_id": 0}},
                                                            {"Sequence": {"id": "A", "type_id": 0}}],
                   "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                   "special_tokens": {ENDOFTEXT: {"id": ENDOFTEXT, "ids": [BPE.eot_id], "tokens": [ENDOFTEXT]}}}
    for edit in ({"normalizer": {"type": "NFC"}}, {"post_processor": prepend_bos}):
        (hf_dir / "tokenizer.json").write_text(json.dumps(spec | edit))
        assert transformers.AutoTokenizer.from_pretrained(hf_dir)  # a valid tokenizer.json, but not gptlab's
        with user_error("neither GPT-2's nor a char or bpe tokenizer.json"):
            load_init_source(hf_dir)


@pytest.mark.parametrize("overrides, note", [
    ({"arch": "toy_hf"}, "no Hugging Face layout for arch 'toy_hf'"),
    ({"qk_norm": True}, "arch 'gpt2' with qk_norm"),
    ({"n_kv_head": 1}, "arch 'gpt2' with n_kv_head=1"),
])
def test_a_model_without_a_hugging_face_layout_gets_a_note_and_no_hf_folder(overrides, note, tmp_path, capsys):
    _, hf_dir = exported(tiny(**overrides), tmp_path)
    err = capsys.readouterr().err
    assert note in err and "not written" in err and len(err.strip().splitlines()) == 1
    assert not hf_dir.exists() and (hf_dir.parent / "export.json").is_file()
    assert [p.name for p in hf_dir.parent.iterdir() if p.name.startswith(".")] == []


def test_a_re_export_replaces_hf(tmp_path: Path):
    _, hf_dir = exported(tiny(), tmp_path)
    first = sha256_file(hf_dir / "model.safetensors")
    torch.manual_seed(1)
    model = LanguageModel(tiny(), CHARS.vocab_size)
    save_export(tmp_path / "export", model, tiny().to_dict(), CHARS.to_dict())
    assert sha256_file(hf_dir / "model.safetensors") != first
    hf_state = safetensors.torch.load_file(hf_dir / "model.safetensors")
    torch.testing.assert_close(hf_state["transformer.wte.weight"], model.transformer.wte.weight.detach())
    exported(tiny(qk_norm=True), tmp_path)  # now unmappable: the old hf/ must not outlive its weights
    assert not hf_dir.exists()


def gpt2_hf_dir(tmp_path: Path, activation: str = "gelu") -> tuple[Path, torch.nn.Module]:
    """What transformers writes for a tiny GPT-2 (GPT-2's tokenizer files beside it)."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=32, n_inner=96,
                                     activation_function=activation, vocab_size=50257)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "gpt2")
    vocab, merges = gpt2_bpe_files()
    (tmp_path / "gpt2" / "vocab.json").write_bytes(vocab)
    (tmp_path / "gpt2" / "merges.txt").write_bytes(merges)
    return tmp_path / "gpt2", model


def llama_hf_dir(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    """What transformers writes for a tiny Llama, with a char tokenizer saved back by AutoTokenizer."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=80, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                      vocab_size=CHARS.vocab_size, rope_parameters={"rope_type": "default",
                                                                                     "rope_theta": 1000.0})
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "llama")
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text(json.dumps(char_tokenizer_json(CHARS.chars)))
    (tmp_path / "tok" / "tokenizer_config.json").write_text('{"tokenizer_class": "PreTrainedTokenizerFast"}')
    transformers.AutoTokenizer.from_pretrained(tmp_path / "tok").save_pretrained(tmp_path / "llama")
    return tmp_path / "llama", model


def qwen3_hf_dir(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    """A tiny Qwen3 (Llama with QK-norm), with the char tokenizer: it loads as gptlab's llama with qk_norm."""
    torch.manual_seed(0)
    config = transformers.Qwen3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, head_dim=8, max_position_embeddings=32,
                                      vocab_size=CHARS.vocab_size)
    model = transformers.Qwen3ForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "qwen3")
    (tmp_path / "qwen3" / "tokenizer.json").write_text(json.dumps(char_tokenizer_json(CHARS.chars)))
    return tmp_path / "qwen3", model


@pytest.mark.parametrize("make", [gpt2_hf_dir, llama_hf_dir, qwen3_hf_dir], ids=["gpt2", "llama", "qwen3"])
def test_init_from_a_transformers_folder_starts_from_its_logits_and_trains(make, tmp_path: Path):
    hf_dir, hf_model = make(tmp_path)
    model, tokenizer, cfg = load_init_source(hf_dir)
    x = torch.tensor([tokenizer.encode(TEXT)[:32]])
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], hf_model(x).logits, atol=1e-4, rtol=0)
    corpus = tmp_path / "tiny.txt"
    corpus.write_text(TINY_TEXT, encoding="utf-8")
    res = call_main(train.main, "--init-from", str(hf_dir), "--data", str(corpus), "--runs-dir", str(tmp_path / "runs"),
                    "--data-dir", str(tmp_path / "data"), "--device", "cpu", "--max-iters", "2", "--warmup-iters", "0",
                    "--eval-interval", "2", "--eval-iters", "1", "--batch-size", "2", "--sample-length", "0")
    assert res.returncode == 0, res.stdout + res.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    record = json.loads((run_dir / "meta" / "init_from.json").read_text())
    assert record["model_sha256"] == sha256_file(hf_dir / "model.safetensors")
    trained = json.loads((run_dir / "meta" / "full_config.json").read_text())
    assert (trained["arch"], trained["tokenizer"], trained["n_layer"]) == (cfg.arch, cfg.tokenizer, 2)
    assert (run_dir / "artifacts" / "export" / "hf" / "model.safetensors").is_file()  # and back out again


def test_gpt2s_own_tanh_gelu_loads_with_a_note(tmp_path: Path, capsys):
    hf_dir, _ = gpt2_hf_dir(tmp_path, activation="gelu_new")
    _, _, cfg = load_init_source(hf_dir)
    err = capsys.readouterr().err
    assert "gelu_new" in err and "exact GELU" in err and cfg.mlp_hidden == 96


@pytest.mark.parametrize("edit, fragments", [
    (lambda c: c | {"model_type": "mistral"}, ["model_type 'mistral'", "gpt2, llama and qwen3"]),
    (lambda c: c | {"model_type": "qwen3", "use_sliding_window": True}, ["use_sliding_window=true"]),
    (lambda c: c | {"attention_bias": True}, ["attention_bias=True", "no counterpart"]),
    (lambda c: c | {"mlp_bias": True}, ["mlp_bias=True"]),
    (lambda c: c | {"head_dim": 16}, ["head_dim=16"]),
    (lambda c: c | {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}, ["rope_parameters"]),
    (lambda c: c | {"hidden_act": "gelu"}, ["hidden_act='gelu'"]),
    (lambda c: c | {"vocab_size": 64}, ["vocab_size 64 differs"]),
])
def test_what_gptlabs_llama_cannot_compute_is_refused_in_one_line(edit, fragments, tmp_path: Path):
    hf_dir, _ = llama_hf_dir(tmp_path)
    config = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps(edit(config)))
    with user_error(*fragments):
        load_init_source(hf_dir)


def test_pickles_and_foreign_tokenizers_are_refused(tmp_path: Path):
    hf_dir, _ = gpt2_hf_dir(tmp_path)
    config = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps(config | {"scale_attn_by_inverse_layer_idx": True}))
    with user_error("scale_attn_by_inverse_layer_idx=True"):
        load_init_source(hf_dir)
    (hf_dir / "config.json").write_text(json.dumps(config))
    (hf_dir / "merges.txt").write_text("#version: 0.2\nx y\n")
    with user_error("neither GPT-2's nor a char or bpe tokenizer.json"):
        load_init_source(hf_dir)
    (hf_dir / "merges.txt").write_bytes(gpt2_bpe_files()[1])
    shutil.move(hf_dir / "model.safetensors", hf_dir / "pytorch_model.bin")
    with user_error("pytorch_model.bin, a pickle"):
        load_init_source(hf_dir)


@pytest.mark.parametrize("damage", ["broken", "missing"])
def test_a_model_folder_without_a_readable_config_is_one_line_and_no_note(damage, tmp_path: Path, capsys):
    """It was taken for an old gptlab export: a note that it loads unverified, then the error."""
    hf_dir, _ = gpt2_hf_dir(tmp_path)
    if damage == "broken":
        (hf_dir / "config.json").write_text('{"model_type": "gpt2", "n_embd": ')
    else:
        (hf_dir / "config.json").unlink()
    with user_error(f"'{hf_dir}' has model.safetensors but no readable config.json",
                    "neither a gptlab export nor a Hugging Face model folder"):
        load_init_source(hf_dir)
    assert "note:" not in capsys.readouterr().err


def test_the_readme_snippet_runs(trained_run: Path, monkeypatch, capsys):
    """README's "Use an export with Hugging Face transformers", run as it says, on a run's hf/ folder."""
    from conftest import REPO

    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("### Use an export with Hugging Face transformers"):]
    start = section.index("```python\n") + len("```python\n")
    snippet = section[start:section.index("\n```", start)].replace('"ROMEO:"', '"All:"')  # the corpus' characters
    monkeypatch.setattr("sys.argv", ["use_hf.py", str(trained_run / "artifacts" / "export" / "hf")])
    exec(compile(snippet, "use_hf.py", "exec"), {"__name__": "__main__"})
    greedy = call_main(inference.main, "--run", str(trained_run), "--prompt", "All:", "--temperature", "0",
                       "--max-new-tokens", "20", "--device", "cpu")
    assert capsys.readouterr().out == greedy.stdout
