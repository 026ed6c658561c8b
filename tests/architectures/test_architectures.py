"""A user's own block family is one class plus one registry entry, and then every stage works with it:
train, resume exactly, export, generate (the README's 'Add your own block', run as a test)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import safetensors.torch
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

import inference
import train
from architectures import ARCHITECTURES, Block, LayerKV
from architectures.layers import CausalSelfAttention
from conftest import call_main
from parameters import ModelConfig
from rundir.export import load_export


@ARCHITECTURES.register("relu2")
class ReluSquaredBlock(Block):
    """RMSNorm, rotary attention and a squared-ReLU MLP (Primer, So et al. 2021)."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.ln_1 = nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.attn = CausalSelfAttention(cfg, bias=False, rotary=True)
        self.ln_2 = nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.c_fc = nn.Linear(cfg.n_embd, cfg.mlp_hidden, bias=False)
        self.c_proj = nn.Linear(cfg.mlp_hidden, cfg.n_embd, bias=False)

    def forward(self, x: Tensor, kv: LayerKV | None = None, pos: int = 0) -> Tensor:
        x = x + self.attn(self.ln_1(x), kv, pos)  # (B, T, C)
        return x + self.c_proj(F.relu(self.c_fc(self.ln_2(x))).square())  # (B, T, C)


def args(corpus: Path, root: Path, *extra: str) -> list[str]:
    return ["--config", "debug", "--arch", "relu2", "--data", str(corpus), "--data-dir", str(root / "data"),
            "--runs-dir", str(root / "runs"), "--dropout", "0.1", "--eval-interval", "5", "--sample-length", "8",
            "--histogram-interval", "0", "--device", "cpu", "--seed", "3", *extra]


def exported(root: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    (run_dir,) = (root / "runs").iterdir()
    return run_dir, safetensors.torch.load_file(run_dir / "artifacts" / "export" / "model.safetensors")


def test_own_architecture_trains_resumes_exports_and_generates(tiny_corpus: Path, tmp_path: Path) -> None:
    straight = call_main(train.main, *args(tiny_corpus, tmp_path / "a", "--max-iters", "10", "--lr-decay-iters", "5"))
    assert straight.returncode == 0, straight.stderr
    _, reference = exported(tmp_path / "a")
    assert "transformer.h.0.c_fc.weight" in reference and "transformer.wpe.weight" not in reference

    first = call_main(train.main, *args(tiny_corpus, tmp_path / "b", "--max-iters", "5"))
    assert first.returncode == 0, first.stderr
    run_dir, _ = exported(tmp_path / "b")
    resumed = call_main(train.main, "--resume", str(run_dir), "--max-iters", "10")
    assert resumed.returncode == 0, resumed.stderr
    _, weights = exported(tmp_path / "b")
    assert weights.keys() == reference.keys()
    assert all(torch.equal(weights[k], reference[k]) for k in reference)  # resumed exactly

    model, tokenizer, cfg = load_export(run_dir)
    assert cfg.arch == "relu2" and isinstance(model.transformer.h[0], ReluSquaredBlock)
    prompt = torch.tensor([tokenizer.encode("the")])
    expected = tokenizer.decode(model.generate(prompt, 12, temperature=0)[0, 1 + 2:].tolist())
    out = call_main(inference.main, "--run", str(run_dir), "--prompt", "the", "--temperature", "0",
                    "--max-new-tokens", "12")
    assert out.returncode == 0 and expected in out.stdout, out.stdout


def readme_block() -> str:
    from conftest import REPO

    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("**Add your own block.**"):]
    start = section.index("```python\n# my_blocks.py\n") + len("```python\n")
    return section[start:section.index("\n```", start)] + "\n"


@pytest.mark.slow
def test_an_outside_module_joins_through_imports_in_every_stage(tiny_corpus: Path, tmp_path: Path) -> None:
    """The README's my_blocks.py in a folder of its own (the working directory), named by --imports once:
    train, resume, inference and evaluate each run in a fresh process, which imports it from the run's
    recorded config."""
    from conftest import run_cli

    own = tmp_path / "own"
    own.mkdir()
    (own / "my_blocks.py").write_text(readme_block(), encoding="utf-8")
    common = ("--data", str(tiny_corpus), "--data-dir", str(tmp_path / "data"), "--runs-dir", str(tmp_path / "runs"),
              "--device", "cpu")
    res = run_cli("train.py", "--config", "debug", "--imports", "my_blocks", "--arch", "relu2", "--max-iters", "5",
                  "--sample-length", "0", *common, cwd=own)
    assert res.returncode == 0, res.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert json.loads((run_dir / "meta" / "full_config.json").read_text())["imports"] == ["my_blocks"]
    res = run_cli("train.py", "--resume", str(run_dir), "--max-iters", "8", cwd=own)
    assert res.returncode == 0 and "resumed from step_000005" in res.stdout, res.stderr
    res = run_cli("inference.py", "--run", str(run_dir), "--prompt", "the", "--temperature", "0", "--max-new-tokens",
                  "5", cwd=own)
    assert res.returncode == 0 and res.stdout.startswith("the"), res.stderr
    res = run_cli("evaluate.py", "--run", str(run_dir), "--data", str(tiny_corpus), "--data-dir",
                  str(tmp_path / "data"), cwd=own)
    assert res.returncode == 0 and "loss" in res.stdout, res.stderr
    res = run_cli("train.py", "--config", "debug", "--imports", "no_such_blocks", *common, cwd=own)
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [
        "error: imports: cannot import 'no_such_blocks' (ModuleNotFoundError: No module named 'no_such_blocks'); "
        "put the module on PYTHONPATH, in the working directory, or install it"]
