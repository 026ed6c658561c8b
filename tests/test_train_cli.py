"""train.py: schedule, optimizer groups, the end-to-end run directory, errors, export round trip."""

from __future__ import annotations

import json
import re
import math
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

import train
from conftest import call_main, run_cli, start_cli, user_error, wait_for_line
from model import LanguageModel
from parameters import ModelConfig
from tokenizer import CharTokenizer
from training.optim import build_optimizer, get_lr
from rundir.export import load_export, save_export
from rundir.tracking import read_aim_run


def test_lr_schedule():
    cfg = ModelConfig(learning_rate=1e-3, min_lr=1e-4, warmup_iters=10, max_iters=110)
    lrs = [get_lr(s, cfg) for s in range(120)]
    assert lrs[0] == pytest.approx(1e-3 / 11) and lrs[9] == pytest.approx(1e-3 * 10 / 11)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))        # warmup rises
    assert lrs[10] == pytest.approx(1e-3)                           # peak after warmup
    assert lrs[60] == pytest.approx(1e-4 + 0.5 * 9e-4)              # cosine midpoint
    assert all(a >= b for a, b in zip(lrs[10:110], lrs[11:111]))   # decay never rises
    assert lrs[110] == lrs[119] == pytest.approx(1e-4)              # floor after decay_iters


def test_weight_decay_on_matrices_only(tiny_cfg):
    model = LanguageModel(tiny_cfg, 30)
    decay, no_decay = build_optimizer(model, tiny_cfg, torch.device("cpu")).param_groups
    assert decay["weight_decay"] == tiny_cfg.weight_decay and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_export_round_trip_is_bit_identical(tiny_cfg, tmp_path: Path):
    tok = CharTokenizer.from_text("abcdefghij \n")
    torch.manual_seed(0)
    model = LanguageModel(tiny_cfg, tok.vocab_size).eval()
    save_export(tmp_path / "export", model, tiny_cfg.to_dict(), tok.to_dict())
    loaded, tok2, cfg2 = load_export(tmp_path / "export")
    idx = torch.randint(0, tok.vocab_size, (2, tiny_cfg.block_size))
    assert torch.equal(model(idx)[0], loaded(idx)[0])
    assert cfg2 == tiny_cfg and tok2.to_dict() == tok.to_dict()
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()  # tie survives


def test_run_directory_layout(trained_run: Path):
    for rel in ("artifacts/checkpoints", "artifacts/export/model.safetensors", "artifacts/export/config.json",
                "artifacts/export/tokenizer.json", "logs/train.log", "meta/git.txt", "meta/env.txt",
                "meta/full_config.json", "meta/status.json"):
        assert (trained_run / rel).exists(), rel
    assert list((trained_run / "logs" / "tensorboard").iterdir())
    copies = sorted(p.name for p in (trained_run / "meta" / "configs").iterdir())
    assert [c.split("_", 1)[1] for c in copies] == ["model.yaml", "train.yaml", "debug.yaml"]
    full = json.loads((trained_run / "meta" / "full_config.json").read_text())
    assert full["n_layer"] == 2 and full["run_tag"] == "e2e" and full["seed"] == 7
    assert trained_run.name.endswith("_e2e")


def test_status_and_log(trained_run: Path):
    status = json.loads((trained_run / "meta" / "status.json").read_text())
    assert status["state"] == "completed" and status["iteration"] == 20
    assert math.isfinite(status["val_loss"]) and status["val_loss"] < math.log(30)
    log = (trained_run / "logs" / "train.log").read_text()
    stdout = (trained_run / "stdout.txt").read_text()
    for line in ("step 20/20", "eval step 20", "exported to", "sample:"):
        assert line in log and line in stdout
    (first_eval,) = [line for line in stdout.splitlines() if line.startswith("eval step 0:")]
    n_vocab = int(re.search(r"\(ln\(vocab (\d+)\) = ", first_eval).group(1))
    assert first_eval.endswith(f"(ln(vocab {n_vocab}) = {math.log(n_vocab):.4f})") and n_vocab >= 30
    assert "warning: initial loss" not in stdout
    assert stdout.index(first_eval) < stdout.index("step  1/20")  # before any training
    checkpoints = trained_run / "artifacts" / "checkpoints"
    assert not (checkpoints / "step_000000").exists()
    assert json.loads((checkpoints / "best.json").read_text())["checkpoint"] != "step_000000"


def test_tensorboard_events(trained_run: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(trained_run / "logs" / "tensorboard"),
                           size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    assert {"loss/train", "eval_loss/train", "eval_loss/val", "lr", "grad_norm", "tokens_per_sec"} <= scalars
    assert [e.step for e in acc.Scalars("loss/train")] == [5, 10, 15, 20]
    assert [e.step for e in acc.Scalars("eval_loss/val")] == [0, 10, 20]
    status = json.loads((trained_run / "meta" / "status.json").read_text())
    assert acc.Scalars("eval_loss/val")[-1].value == pytest.approx(status["val_loss"], rel=1e-6)
    histograms = set(acc.Tags()["histograms"])
    assert "params/transformer.wte.weight" in histograms and "grads/transformer.wte.weight" in histograms
    n_params = len(list(LanguageModel(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=32), 30)
                        .named_parameters()))
    assert len([h for h in histograms if h.startswith("params/")]) == n_params
    assert any("sample" in t for t in acc.Tags()["tensors"])


def test_aim_run_holds_the_metrics(tmp_path: Path, tiny_corpus: Path):
    res = call_main(train.main, "--config", "debug", "--data", str(tiny_corpus), "--runs-dir", str(tmp_path / "runs"),
                    "--data-dir", str(tmp_path / "data"), "--aim-logging", "--aim-repo", str(tmp_path),
                    "--max-iters", "10", "--eval-interval", "5", "--histogram-interval", "5")
    assert res.returncode == 0, res.stderr
    status = json.loads(next((tmp_path / "runs").iterdir()).joinpath("meta", "status.json").read_text())
    from aim.storage.context import Context
    run = read_aim_run(tmp_path, status["aim_run_hash"])
    assert run["hparams"]["n_layer"] == 2 and run["hparams"]["max_iters"] == 10
    assert run["hparams"]["python"] and run["hparams"]["git"]
    steps, (values,) = run.get_metric("eval_loss", Context({"subset": "val"})).data.view("val").numpy()
    assert list(steps) == [0, 5, 10] and values[-1] == pytest.approx(status["val_loss"], rel=1e-6)
    steps, _ = run.get_metric("loss", Context({"subset": "train"})).data.view("val").numpy()
    assert list(steps) == [5, 10]
    assert run.get_metric("lr", Context({})) is not None
    grads = run.get_distribution_sequence("transformer.wte.weight", Context({"type": "grads"}))
    steps, _ = grads.data.view("val").items_list()
    assert list(steps) == [5, 10]


def test_metrics_jsonl_holds_what_tensorboard_and_status_recorded(trained_run: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    lines = [json.loads(line) for line in (trained_run / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert all({"step", "tokens_seen", "wall_time"} <= line.keys() for line in lines)
    assert [line["step"] for line in lines] == sorted(line["step"] for line in lines)
    assert [line["wall_time"] for line in lines] == sorted(line["wall_time"] for line in lines)
    full = json.loads((trained_run / "meta" / "full_config.json").read_text())
    assert all(line["tokens_seen"] == line["step"] * full["batch_size"] * full["block_size"] for line in lines)
    acc = EventAccumulator(str(trained_run / "logs" / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    for tag in ("loss/train", "lr", "grad_norm", "tokens_per_sec", "tokens_seen", "eval_loss/train", "eval_loss/val"):
        logged = [(line["step"], line[tag]) for line in lines if tag in line and (tag != "tokens_seen" or "lr" in line)]
        assert [s for s, _ in logged] == [e.step for e in acc.Scalars(tag)], tag
        assert [v for _, v in logged] == pytest.approx([e.value for e in acc.Scalars(tag)], rel=1e-6), tag
    status = json.loads((trained_run / "meta" / "status.json").read_text())
    last_eval = [line for line in lines if "eval_loss/val" in line][-1]
    assert last_eval["step"] == 20 and last_eval["eval_loss/val"] == status["val_loss"]


@pytest.mark.parametrize("args,message,kind", [
    (["--data", "/nonexistent/corpus.txt"], "data path '/nonexistent/corpus.txt' does not exist", FileNotFoundError),
    (["--block-size", "4000"], "split has", ValueError),
    (["--nlayer", "2"], "unknown option '--nlayer' (did you mean '--n-layer'?)", ValueError),
    (["--dropout", "1.5"], "dropout: must be in [0, 1)", ValueError),
    (["--grad-clip", "nan"], "grad_clip: must be a finite number, got nan", ValueError),
    (["--min-lr", "inf"], "min_lr: must be a finite number, got inf", ValueError),
    (["--seed", str(2**64)], "seed: must be in [0, 2**63)", ValueError),
    (["--run-tag", "a\nb"], "run_tag: 'a\\nb' must be non-empty", ValueError),
    (["--run-tag", "x" * 300], "at most 200 bytes", ValueError),
    (["--runs-dir", "/proc/self/gptlab-runs"], "cannot create --runs-dir directory '/proc/self/gptlab-runs'", ValueError),
    (["--sample-prompt", "\U0001F642"], "sample_prompt '\U0001F642' cannot start a sample", ValueError),
    (["--n-layer", "1000000"], "this run needs about", ValueError),
    (["--aim-logging", "--aim-repo", "/proc/version"], "--aim-repo '/proc/version' is a file", ValueError),
])
def test_errors_are_one_line_and_create_no_run(args, message, kind, tmp_path: Path, tiny_corpus: Path):
    base = ["--config", "debug", "--data", str(tiny_corpus), "--runs-dir", str(tmp_path / "runs"),
            "--data-dir", str(tmp_path / "data")]
    with user_error(message, kind=kind):
        train.main([*base, *args])
    assert not (tmp_path / "runs").exists()


def test_cli_error_is_one_line_on_stderr_exit_2_and_creates_no_run(tmp_path: Path, tiny_corpus: Path):
    """The CLI contract, once through a real process: a FileNotFoundError from the data stage."""
    res = run_cli("train.py", "--config", "debug", "--data", "/nonexistent/corpus.txt", "--runs-dir",
                  str(tmp_path / "runs"), "--data-dir", str(tmp_path / "data"))
    assert res.returncode == 2, res.stderr
    assert res.stderr.startswith("error: data path '/nonexistent/corpus.txt' does not exist")
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr and res.stdout == ""
    assert not (tmp_path / "runs").exists()


def test_empty_corpus_is_an_error(tmp_path: Path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with user_error("empty"):
        train.main(["--config", "debug", "--data", str(empty), "--runs-dir", str(tmp_path / "runs")])
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("clang++")), reason="inductor on CPU needs a C++ compiler")
def test_a_compiled_run_exports_and_resumes_uncompiled(tiny_corpus: Path, tmp_path: Path):
    """`--torch-compile true` on CPU is inductor, as users run it; its files load without compile.
    Nearly all of its time is inductor building 15 C++ kernels for three graphs (training forward and
    backward, eval forward): about 40 s on two cores with a cold inductor cache, 6 s with a warm one."""
    import safetensors.torch
    args = ["--config", "debug", "--data", str(tiny_corpus), "--data-dir", str(tmp_path / "data"), "--runs-dir",
            str(tmp_path / "runs"), "--n-layer", "1", "--max-iters", "4", "--eval-interval", "4",
            "--checkpoint-interval", "2", "--sample-length", "0", "--histogram-interval", "0", "--device", "cpu"]
    try:
        res = call_main(train.main, *args, "--torch-compile", "true")
        assert res.returncode == 0, res.stderr
        assert "| compile on |" in res.stdout
        (run_dir,) = (tmp_path / "runs").iterdir()
        assert json.loads((run_dir / "meta" / "status.json").read_text())["compiled"] is True
        ckpt = run_dir / "artifacts" / "checkpoints" / "step_000004" / "model.safetensors"
        assert not any("_orig_mod" in k for k in safetensors.torch.load_file(ckpt))
        load_export(run_dir, "cpu")  # strict state-dict load into a plain LanguageModel
        res = call_main(train.main, "--resume", str(run_dir), "--max-iters", "6", "--torch-compile", "auto")
        assert res.returncode == 0, res.stderr
        assert "resumed from step_000004" in res.stdout and "| compile off (auto) |" in res.stdout
        assert json.loads((run_dir / "meta" / "status.json").read_text())["compiled"] is False
    finally:
        torch._dynamo.reset()  # the suite's process goes on: drop the compiled graphs and their guards


def test_compiled_training_exports_load_into_an_uncompiled_model(tiny_cfg, tmp_path: Path):
    """The export is saved from the raw module, so no `_orig_mod.` prefix leaks into it (nanoGPT's bug)."""
    from training.batches import get_batch
    tok = CharTokenizer.from_text("abcdefghij \n")
    torch.manual_seed(0)
    raw = LanguageModel(tiny_cfg, tok.vocab_size)
    compiled = torch.compile(raw, backend="aot_eager")  # the backend train.py uses on MPS; fast to build
    opt = build_optimizer(raw, tiny_cfg, torch.device("cpu"))
    x, y = get_batch((torch.arange(500) % tok.vocab_size).numpy(), 4, tiny_cfg.block_size, seed=0, step=0)
    compiled(x, y)[1].backward()
    opt.step()
    save_export(tmp_path / "export", raw, tiny_cfg.to_dict(), tok.to_dict())
    loaded, _, _ = load_export(tmp_path / "export")
    assert not any("_orig_mod" in k for k in loaded.state_dict())
    raw.eval()
    assert torch.equal(raw(x)[0], loaded(x)[0]) and torch.allclose(compiled(x)[0], loaded(x)[0], atol=1e-6)
    torch._dynamo.reset()


def test_a_data_dir_that_is_a_file_is_one_line(tmp_path: Path, tiny_corpus: Path):
    (tmp_path / "data").write_text("not a directory")
    with user_error("cannot write the data cache", "pass --data-dir with a writable directory"):
        train.main(["--config", "debug", "--data", str(tiny_corpus), "--runs-dir", str(tmp_path / "runs"),
                    "--data-dir", str(tmp_path / "data")])
    assert not (tmp_path / "runs").exists()


def test_a_corpus_without_the_default_prompt_samples_from_its_first_character(tmp_path: Path):
    corpus = tmp_path / "one_line.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog " * 60)  # no newline anywhere
    res = call_main(train.main, "--config", "debug", "--data", str(corpus), "--runs-dir", str(tmp_path / "runs"),
                    "--data-dir", str(tmp_path / "data"), "--max-iters", "10")  # evaluates and samples at 10
    assert res.returncode == 0, res.stderr
    assert "the default sample prompt '\\n' is not in this corpus' vocabulary; samples start from 't'" in res.stdout
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert json.loads((run_dir / "meta" / "full_config.json").read_text())["sample_prompt"] == "t"


def test_the_console_shows_the_first_step_an_estimate_and_a_summary(trained_run: Path):
    out = (trained_run / "stdout.txt").read_text()
    assert re.search(r"^estimate: memory ~[\d.,]+ [MG]B of [\d.,]+ GB available \| ~[\d,]+ ms/step", out, re.M)
    assert re.search(r"^step  1/20 \| loss \d\.\d{4} \| first step [\d.]+ s; then a line every 5 steps$", out, re.M)
    summary = out.strip().splitlines()[-2:]
    assert re.match(r"done in \S+: 20 steps, 5,120 tokens; best val loss \d\.\d{4} at step 20; export ", summary[0])
    assert summary[1].startswith(f"next: python inference.py --run {trained_run}")


def test_a_resume_with_nothing_left_to_train_says_so_and_changes_nothing(trained_run: Path, tmp_path: Path):
    run_dir = tmp_path / trained_run.name
    shutil.copytree(trained_run, run_dir)
    def files() -> dict[Path, int]:  # all but meta/lock, which names whoever holds the run
        return {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file() and p.name != "lock"}

    before = files()
    res = call_main(train.main, "--resume", str(run_dir))
    assert res.returncode == 0 and "nothing left to train; pass --max-iters N (more than 20)" in res.stdout
    assert files() == before


def test_status_json_is_strict_json_before_any_eval(tmp_path: Path, tiny_corpus: Path):
    """best_val_loss is infinite until the first eval; status.json says null, which every JSON reader takes."""
    res = call_main(train.main, "--config", "debug", "--data", str(tiny_corpus), "--runs-dir", str(tmp_path / "runs"),
                    "--data-dir", str(tmp_path / "data"), "--max-iters", "3", "--eval-interval", "100",
                    "--early-stopping-patience", "0")
    assert res.returncode == 0, res.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    text = (run_dir / "meta" / "status.json").read_text()
    assert "Infinity" not in text and "NaN" not in text
    json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in status.json"))


def test_help_shows_the_value_a_run_will_use_and_where_it_comes_from():
    text = " ".join(call_main(_help, "--help").stdout.split())
    assert "every this many steps (default: 50, from configs/train.yaml)" in text  # log_interval, not the dataclass' 10
    assert "0 disables (default: 300, from configs/train.yaml)" in text  # sample_length, not 200
    assert "batch k is a function of seed, k) (default: 1337)" in text  # seed: no file sets it
    text = " ".join(call_main(_help, "--config", "debug", "--help").stdout.split())
    assert "every this many steps (default: 5, from configs/presets/debug.yaml)" in text


def _help(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as done:
        train.main(argv)
    return done.value.code


@pytest.mark.slow
def test_a_console_closed_early_does_not_stop_training(tmp_path: Path, tiny_corpus: Path):
    """`python train.py ... | head -3` used to mark the run failed with a BrokenPipeError."""
    proc = start_cli("train.py", "--config", "debug", "--data", str(tiny_corpus), "--runs-dir", str(tmp_path / "runs"),
                     "--data-dir", str(tmp_path / "data"), "--log-interval", "1")
    for _ in range(3):
        proc.stdout.readline()
    proc.stdout.close()  # what `head -3` does once it has its lines
    assert proc.wait(timeout=120) == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert json.loads((run_dir / "meta" / "status.json").read_text())["state"] == "completed"
    log = (run_dir / "logs" / "train.log").read_text()
    assert "step 20/20" in log and "done in" in log


def test_a_short_try_of_a_preset_trains_and_says_what_it_scaled(tmp_path: Path, tiny_corpus: Path):
    """`--config shakespeare_char --max-iters 30` (here with a model small enough for a test)."""
    res = call_main(train.main, "--config", "shakespeare_char", "--max-iters", "4", "--data", str(tiny_corpus),
                    "--runs-dir", str(tmp_path / "runs"), "--data-dir", str(tmp_path / "data"), "--device", "cpu",
                    "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "16", "--batch-size", "4",
                    "--eval-iters", "2", "--sample-length", "0")
    assert res.returncode == 0, res.stderr
    assert ("--max-iters 4 is shorter than the 5000 planned (configs/presets/shakespeare_char.yaml): warmup_iters "
            "100 -> 0, eval_interval 250 -> 4, to fit; set them on the command line to choose") in res.stdout
    (run_dir,) = (tmp_path / "runs").iterdir()
    recorded = json.loads((run_dir / "meta" / "full_config.json").read_text())
    assert (recorded["max_iters"], recorded["warmup_iters"], recorded["eval_interval"]) == (4, 0, 4)
    assert json.loads((run_dir / "meta" / "status.json").read_text())["state"] == "completed"


def forced_cpu_run(root: Path, corpus: Path, dtype: str) -> tuple[subprocess.CompletedProcess, dict]:
    res = call_main(train.main, "--config", "debug", "--data", str(corpus), "--runs-dir", str(root), "--data-dir",
                    str(root / "data"), "--device", "cpu", "--dtype", dtype, "--sample-length", "0", "--seed", "3")
    assert res.returncode == 0, res.stderr
    (run_dir,) = (p for p in root.iterdir() if p.name != "data")
    return res, json.loads((run_dir / "meta" / "status.json").read_text())


@pytest.mark.parametrize("cpu, chosen", [("faster", "bfloat16"), ("slower", "float32"), ("crashes", "bfloat16"),
                                         ("unusable", "float32")])
def test_dtype_auto_trains_as_each_kind_of_cpu_would(cpu, chosen, monkeypatch, tmp_path: Path, tiny_corpus: Path,
                                                     isa_cap_restored):
    """GPTLAB_CPU_PROBE makes this machine answer as a Zen 5 (faster), a Zen 3 (slower), a Sapphire Rapids VM
    (crashes uncapped) or a CPU whose half precision cannot run at all. In float32 the run is the float32
    run, bit for bit; in bfloat16 its val loss is float32's within bf16's rounding (a wrong run misses it)."""
    _, reference = forced_cpu_run(tmp_path / "float32", tiny_corpus, "float32")
    monkeypatch.setenv("GPTLAB_CPU_PROBE", cpu)
    res, status = forced_cpu_run(tmp_path / cpu, tiny_corpus, "auto")
    assert status["dtype"] == chosen and status["state"] == "completed"
    assert (f"dtype auto: bfloat16, whose matmuls run {dict(faster=4.37, crashes=2.0).get(cpu, 0):.2f}x float32's "
            f"(as GPTLAB_CPU_PROBE={cpu} says)" in res.stdout) == (chosen == "bfloat16")
    if cpu == "crashes":
        assert "oneDNN capped at ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16" in res.stdout
    first_eval = float(re.search(r"eval step 0: train loss [\d.]+, val loss ([\d.]+)", res.stdout).group(1))
    if chosen == "float32":
        assert status["best_val_loss"] == reference["best_val_loss"]
    else:  # measured (Zen 4): bf16 ends 8e-5 from float32; another seed 4e-3 to 4e-2; training moves it 0.3
        assert abs(status["best_val_loss"] - reference["best_val_loss"]) < 2e-3
        assert first_eval - status["best_val_loss"] > 0.2


def test_a_bf16_run_prints_no_torch_warnings(tmp_path: Path, tiny_corpus: Path):
    """QK-norm's RMSNorm meets bf16 queries under CPU autocast; torch warned once per process that it could
    not use its fused kernel. A process of its own: torch warns only once, so an earlier test would hide it."""
    from utils.cpu_probe import probe_half_precision
    if not probe_half_precision("bfloat16").usable:
        pytest.skip(f"bfloat16 cannot run on this CPU: {probe_half_precision('bfloat16').problem}")
    res = run_cli("train.py", "--config", "debug", "--arch", "llama", "--qk-norm", "true", "--dtype", "bfloat16",
                  "--max-iters", "2", "--data", str(tiny_corpus), "--runs-dir", str(tmp_path / "runs"), "--data-dir",
                  str(tmp_path / "data"), "--device", "cpu", "--sample-length", "5")
    assert res.returncode == 0 and "| bfloat16 |" in res.stdout, res.stderr
    assert "Warning" not in res.stdout + res.stderr, res.stderr


def test_fine_tuning_counts_its_starting_weights_as_the_first_best(trained_run: Path, tmp_path: Path,
                                                                     tiny_corpus: Path):
    """A fine-tune that only makes the model worse: the start is the best, and early stopping exports it."""
    res = call_main(train.main, "--init-from", str(trained_run), "--data", str(tiny_corpus), "--runs-dir",
                    str(tmp_path / "runs"), "--data-dir", str(tmp_path / "data"), "--device", "cpu", "--dtype", "float32",
                    "--max-iters", "40", "--warmup-iters", "0", "--learning-rate", "0.5", "--eval-interval", "5",
                    "--early-stopping-patience", "2", "--sample-length", "0")
    assert res.returncode == 0, res.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    status = json.loads((run_dir / "meta" / "status.json").read_text())
    start = float(re.search(r"eval step 0: train loss [\d.]+, val loss ([\d.]+)", res.stdout).group(1))
    assert status["stop_reason"] == "early_stopping" and status["best_val_loss"] == pytest.approx(start, abs=1e-4)
    assert "best val loss" not in res.stdout or "at step 0" in res.stdout
    best = json.loads((run_dir / "artifacts" / "checkpoints" / "best.json").read_text())
    assert best["checkpoint"] == "step_000000"
    started = load_export(trained_run).model.state_dict()
    exported = load_export(run_dir).model.state_dict()
    assert all(torch.equal(started[k], exported[k]) for k in started)  # the start, exported


def test_a_bpe_vocabulary_the_corpus_leaves_short_is_said_and_recorded(tmp_path: Path, tiny_corpus: Path):
    res = call_main(train.main, "--config", "debug", "--tokenizer", "bpe", "--vocab-size", "5000", "--data",
                    str(tiny_corpus), "--runs-dir", str(tmp_path / "runs"), "--data-dir", str(tmp_path / "data"),
                    "--device", "cpu", "--max-iters", "2", "--sample-length", "0")
    assert res.returncode == 0, res.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    real = json.loads((run_dir / "artifacts" / "export" / "tokenizer.json").read_text())
    n_ids = len(real["tokenizer"]["model"]["vocab"])
    assert n_ids < 5000
    assert f"the bpe tokenizer learned {n_ids:,} ids, not vocab_size 5,000" in res.stdout
    assert json.loads((run_dir / "meta" / "full_config.json").read_text())["vocab_size"] == n_ids
    with user_error("vocab_size 1,000,000,000 is more than a byte-level BPE can learn from"):
        train.main(["--config", "debug", "--tokenizer", "bpe", "--vocab-size", "1000000000", "--data", str(tiny_corpus),
                    "--runs-dir", str(tmp_path / "runs2"), "--data-dir", str(tmp_path / "data"), "--device", "cpu"])


def test_a_prepared_corpus_with_no_document_in_val_says_so(tmp_path: Path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(3):  # none of these three hashes below val_fraction 0.1
        (corpus / f"{i}.txt").write_text(f"document {i}: " + "some words here " * 20, encoding="utf-8")
    with user_error("landed in the val split", "3 documents left it empty", "add documents, or pass another "
                    "--val-fraction"):
        train.main(["--config", "debug", "--data", str(corpus), "--tokenizer", "gpt2", "--runs-dir",
                    str(tmp_path / "runs"), "--data-dir", str(tmp_path / "data"), "--device", "cpu"])


def test_the_estimate_of_a_small_model_is_timed_on_the_model(trained_run: Path):
    out = (trained_run / "stdout.txt").read_text()
    assert re.search(r"estimate: memory ~[\d.,]+ MB of .* \| ~[\d,]+ ms/step, .* \(a step of this model timed here\)",
                     out), out


def test_help_says_what_auto_and_init_from_really_do():
    res = run_cli("train.py", "--help")
    flat = " ".join(res.stdout.split())
    assert "on a CPU whose bf16 matmuls measured >= 1.2x float32's" in flat
    assert "Hugging Face GPT-2, Llama or Qwen3 model folder" in flat


def test_ctrl_c_during_a_long_step_0_eval_stops_at_once(tmp_path: Path, tiny_corpus: Path):
    proc = start_cli("train.py", "--config", "debug", "--data", str(tiny_corpus), "--runs-dir", str(tmp_path / "runs"),
                     "--data-dir", str(tmp_path / "data"), "--device", "cpu", "--eval-iters", "100000")
    wait_for_line(proc, "tokens/step")  # the model line: the step-0 eval comes next
    time.sleep(0.5)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    try:
        out = proc.communicate(timeout=30)[0]
    finally:
        proc.kill()  # the eval would otherwise go on for an hour
    assert time.monotonic() - t0 < 20 and proc.returncode == 130, out
    assert "SIGINT during the step-0 eval: stopped before the first step; nothing was trained" in out
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert json.loads((run_dir / "meta" / "status.json").read_text())["state"] == "interrupted"


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.0, 0.3])
def test_a_signal_after_a_completed_run_keeps_exit_0(delay: float, tmp_path: Path, tiny_corpus: Path):
    """Right after "done" the trackers close (Aim's take a while), then the interpreter shuts down: a Ctrl-C
    there gave exit 130 (or "finishing this step...") for a run that status.json rightly calls completed."""
    proc = start_cli("train.py", "--config", "debug", "--data", str(tiny_corpus), "--runs-dir", str(tmp_path / "runs"),
                     "--data-dir", str(tmp_path / "data"), "--device", "cpu", "--aim-logging", "true", "--aim-repo",
                     str(tmp_path))
    wait_for_line(proc, "done in ")
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    out = proc.communicate(timeout=60)[0]
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert json.loads((run_dir / "meta" / "status.json").read_text())["state"] == "completed"
    assert proc.returncode == 0 and "SIGINT" not in out and "interrupted" not in out, out
