"""Training state that survives anything: exact resume after SIGINT/SIGTERM/SIGKILL, double Ctrl-C,
non-finite loss, early stopping, target_val_loss, resume rules (Muon's too), fine-tuning, gradient
accumulation, mixed precision."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import time
import weakref
from pathlib import Path
from typing import Callable

import pytest
import safetensors.torch
import torch

import train
from conftest import TINY_TEXT, call_main, resume_target, run_cli, start_cli, user_error, wait_for_line
from model import LanguageModel
from parameters import ModelConfig
from training.step import train_step
from rundir.checkpoint import _digest as checkpoint_digest, find_checkpoints, latest_good, verify
from utils.cpu_probe import probe_half_precision
from utils.device import autocast
from utils.signals import GracefulStop

# A run to be interrupted is started with NEVER iterations, so however late a loaded machine delivers
# the signal, the run is still going; it is resumed with --max-iters ITERS (further if it got that far:
# conftest.resume_target). Resume keeps the recorded schedule (config.resume_config: lr_decay_iters =
# the recorded max_iters), so the uninterrupted reference trains with --lr-decay-iters NEVER: the same
# learning rate at every step. Warmup is the debug preset's 0 in both.
ITERS, NEVER = 20, 100_000


def base_args(corpus: Path, root: Path, max_iters: int = NEVER) -> list[str]:
    return ["--config", "debug", "--data", str(corpus), "--data-dir", str(root / "data"), "--runs-dir",
            str(root / "runs"), "--dropout", "0.1", "--log-interval", "1", "--max-iters", str(max_iters),
            "--eval-interval", "10", "--checkpoint-interval", "10", "--histogram-interval", "0",
            "--sample-length", "0", "--seed", "5"]


def only_run(root: Path) -> Path:
    (run_dir,) = (root / "runs").iterdir()
    return run_dir


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(run_dir / "artifacts" / "export" / "model.safetensors")


def curves(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run_dir / "logs" / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in ("loss/train", "eval_loss/val")}


def jsonl_losses(run_dir: Path) -> list[tuple[int, float]]:
    """(step, value) of the loss lines of logs/metrics.jsonl, in file order."""
    lines = map(json.loads, (run_dir / "logs" / "metrics.jsonl").read_text().splitlines())
    return [(line["step"], line.get("loss/train", line.get("eval_loss/val"))) for line in lines
            if "loss/train" in line or "eval_loss/val" in line]


def after_its_event_files(run_dir: Path) -> None:
    """Wait into the second after the run's newest TensorBoard event file was opened. TensorBoard reads a
    run's files in name order, and a name is the open time in whole seconds, then the pid: a resume in
    this process (older, so a lower pid) in the same second would sort first, and the interrupted run's
    events would then purge the resumed ones. A run started from the shell takes longer than that."""
    opened = [int(p.name.split(".")[3]) for p in (run_dir / "logs" / "tensorboard").glob("events.out.tfevents.*")]
    time.sleep(max(0.0, max(opened) + 1 - time.time()))


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Callable[[int], Path]:
    """The uninterrupted run of a given length that every interrupted one must match; one per length."""
    runs: dict[int, Path] = {}

    def run_to(max_iters: int) -> Path:
        if max_iters not in runs:
            root = tmp_path_factory.mktemp("reference")
            corpus = root / "tiny.txt"
            corpus.write_text(TINY_TEXT)
            res = call_main(train.main, *base_args(corpus, root, max_iters), "--lr-decay-iters", str(NEVER))
            assert res.returncode == 0, res.stderr
            runs[max_iters] = only_run(root)
        return runs[max_iters]

    return run_to


@pytest.mark.slow
@pytest.mark.parametrize("sig,wait_for,code", [
    (signal.SIGINT, f" 12/{NEVER} ", 130), (signal.SIGTERM, f" 15/{NEVER} ", 143),
    (signal.SIGKILL, "saved checkpoint step_000010", -signal.SIGKILL),
])
def test_interrupted_then_resumed_equals_uninterrupted(sig, wait_for, code, reference, tiny_corpus, tmp_path):
    # At the default thread count: with dropout, CPU runs are bit-identical across processes (issue 8).
    proc = start_cli("train.py", *base_args(tiny_corpus, tmp_path))
    out = "".join(wait_for_line(proc, wait_for))
    proc.send_signal(sig)
    out += proc.communicate(timeout=120)[0]
    assert proc.returncode == code, out
    run_dir = only_run(tmp_path)
    if sig != signal.SIGKILL:
        status = json.loads((run_dir / "meta" / "status.json").read_text())
        assert status["state"] == "interrupted" and f"--resume {run_dir}" in out
        assert (run_dir / "artifacts" / "export" / "model.safetensors").is_file()
    target = resume_target(out, ITERS)
    after_its_event_files(run_dir)
    res = call_main(train.main, "--resume", str(run_dir), "--max-iters", str(target))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "resumed from step_" in res.stdout
    ref_w, got_w = weights(reference(target)), weights(run_dir)
    assert ref_w.keys() == got_w.keys() and all(torch.equal(ref_w[k], got_w[k]) for k in ref_w)
    assert curves(run_dir) == curves(reference(target))  # no duplicated or backwards steps, same values
    assert jsonl_losses(run_dir) == jsonl_losses(reference(target))
    status = json.loads((run_dir / "meta" / "status.json").read_text())
    assert status["state"] == "completed" and status["resumed_from"].startswith("step_")
    assert "resumed from" in (run_dir / "logs" / "train.log").read_text()


@pytest.mark.parametrize("inside,code,state,iteration", [
    ("write_meta", 143, "interrupted", 0),  # just after the run directory exists: stopped at once, with a status
    ("build_optimizer", 143, "interrupted", 0),  # during start-up: stopped at once, nothing to save
    ("save_export", 0, "completed", 4),  # while the export is written: the run completes regardless
])
def test_a_signal_outside_the_loop_still_ends_the_run_cleanly(inside, code, state, iteration, tiny_corpus, tmp_path,
                                                              monkeypatch):
    import training.build
    import training.trainer

    module = {"write_meta": train, "build_optimizer": training.build, "save_export": training.trainer}[inside]
    real = getattr(module, inside)

    def signalling(*args, **kwargs):  # the signal lands exactly while this runs, in this process
        handler = signal.getsignal(signal.SIGTERM)
        assert isinstance(getattr(handler, "__self__", None), GracefulStop), f"{inside} runs unguarded"
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, inside, signalling)
    res = call_main(train.main, *base_args(tiny_corpus, tmp_path, max_iters=4))
    assert res.returncode == code, res.stdout + res.stderr
    status = json.loads((only_run(tmp_path) / "meta" / "status.json").read_text())
    assert status["state"] == state and status["iteration"] == iteration
    if state == "interrupted":  # a start-up is stopped promptly: nothing was trained, so nothing is saved
        assert status["stop_reason"] == "SIGTERM during start-up" and "nothing was trained" in res.stderr
        assert not (only_run(tmp_path) / "artifacts" / "export" / "model.safetensors").exists()
        return
    assert (only_run(tmp_path) / "artifacts" / "export" / "model.safetensors").is_file()
    assert latest_good(only_run(tmp_path) / "artifacts" / "checkpoints").iteration == iteration


@pytest.mark.slow
def test_second_ctrl_c_exits_at_once_and_keeps_the_last_good_checkpoint(tiny_corpus, tmp_path):
    proc = start_cli("train.py", *base_args(tiny_corpus, tmp_path), "--checkpoint-interval", "3")
    wait_for_line(proc, "saved checkpoint step_000006")
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 130, out
    run_dir = only_run(tmp_path)
    assert json.loads((run_dir / "meta" / "status.json").read_text())["state"] == "interrupted"
    ckpt_dir = run_dir / "artifacts" / "checkpoints"
    for path in find_checkpoints(ckpt_dir):
        verify(path)
    assert latest_good(ckpt_dir).iteration >= 6


def test_non_finite_loss_stops_with_one_line_and_keeps_the_good_checkpoint(tiny_corpus, tmp_path):
    with user_error("loss is nan at iteration", "learning_rate", "float16") as error:
        train.main([*base_args(tiny_corpus, tmp_path, max_iters=120), "--learning-rate", "1e4", "--grad-clip", "0",
                    "--warmup-iters", "0", "--checkpoint-interval", "1", "--dtype", "float32"])
    bad_at = int(str(error.value).split("at iteration ")[1].split(":")[0])
    run_dir = only_run(tmp_path)
    status = json.loads((run_dir / "meta" / "status.json").read_text())
    assert status["state"] == "failed" and "loss is nan" in status["error"]
    good = latest_good(run_dir / "artifacts" / "checkpoints")
    assert good.iteration == bad_at - 1
    assert all(torch.isfinite(t).all() for t in safetensors.torch.load_file(good.path / "model.safetensors").values())


@pytest.mark.parametrize("grad_clip", ["1.0", "0"])
def test_inf_gradients_with_a_finite_loss_stop_before_the_update(tiny_corpus, tmp_path, monkeypatch, grad_clip):
    """Step 7's loss is finite but its gradients are inf (a hook on the loss): the step must not reach the
    optimizer, with clipping (which would turn inf into NaN) or without it. In float32: any CPU."""
    forward, losses = LanguageModel.forward, weakref.WeakKeyDictionary()  # per model: the estimate times its own

    def poisoned(self, idx, targets=None):
        logits, loss = forward(self, idx, targets)
        if self.training and torch.is_grad_enabled():
            losses.setdefault(self, []).append(loss.item())
            if len(losses[self]) == 7:
                loss.register_hook(lambda g: g * float("inf"))
        return logits, loss

    monkeypatch.setattr(LanguageModel, "forward", poisoned)
    with user_error("gradient norm is ", " at iteration 7: training diverged", "the step was not applied",
                    "Last good checkpoint: ") as error:
        train.main([*base_args(tiny_corpus, tmp_path, max_iters=20), "--dtype", "float32", "--grad-clip", grad_clip,
                    "--checkpoint-interval", "1"])
    (train_calls,) = [calls for calls in losses.values() if len(calls) == 7]
    assert all(map(math.isfinite, train_calls))
    run_dir = only_run(tmp_path)
    good = latest_good(run_dir / "artifacts" / "checkpoints")
    assert good.iteration == 6 and str(good.path) in str(error.value)
    assert [p.name for p in find_checkpoints(run_dir / "artifacts" / "checkpoints")][-1] == "step_000006"
    assert all(torch.isfinite(t).all() for t in safetensors.torch.load_file(good.path / "model.safetensors").values())
    status = json.loads((run_dir / "meta" / "status.json").read_text())
    assert status["state"] == "failed" and "gradient norm is" in status["error"]
    assert not (run_dir / "artifacts" / "export" / "model.safetensors").exists()


def test_early_stopping_exports_the_best_weights(tiny_corpus, tmp_path):
    res = call_main(train.main, *base_args(tiny_corpus, tmp_path, max_iters=60), "--learning-rate", "0.3",
                    "--warmup-iters", "0", "--eval-interval", "2", "--early-stopping-patience", "2")
    assert res.returncode == 0, res.stderr
    run_dir = only_run(tmp_path)
    status = json.loads((run_dir / "meta" / "status.json").read_text())
    assert status["stop_reason"] == "early_stopping" and status["iteration"] < 60
    best = json.loads((run_dir / "artifacts" / "checkpoints" / "best.json").read_text())
    assert best["val_loss"] == pytest.approx(status["best_val_loss"])
    best_w = safetensors.torch.load_file(run_dir / "artifacts" / "checkpoints" / best["checkpoint"] / "model.safetensors")
    assert all(torch.equal(best_w[k], v) for k, v in weights(run_dir).items())
    assert "early stopping" in res.stdout


def test_resume_rules(reference, tmp_path):
    with user_error("--n-layer cannot change when resuming"):
        train.main(["--resume", str(reference(ITERS)), "--n-layer", "3"])
    with user_error("not found", kind=FileNotFoundError):
        train.main(["--resume", str(tmp_path / "nope")])
    with user_error("nothing to resume", kind=FileNotFoundError):
        train.main(["--resume", "latest", "--runs-dir", str(tmp_path)])


def test_resume_extends_max_iters_keeping_the_schedule(trained_run, tmp_path):
    run_dir = tmp_path / trained_run.name
    shutil.copytree(trained_run, run_dir)
    recorded = json.loads((run_dir / "meta" / "full_config.json").read_text())
    assert recorded["lr_decay_iters"] == 0  # decay over max_iters, which the resume extends
    longer = recorded["max_iters"] + 4
    metrics = run_dir / "logs" / "metrics.jsonl"
    before = metrics.read_text()
    with metrics.open("a") as f:  # as if the interrupted session had logged past its last checkpoint (step 20)
        f.write(json.dumps({"step": 22, "tokens_seen": 0, "wall_time": 0.0, "loss/train": -1.0}) + "\n")
    res = call_main(train.main, "--resume", str(run_dir), "--max-iters", str(longer))
    assert res.returncode == 0, res.stderr
    text = metrics.read_text()
    assert text.startswith(before) and "-1.0" not in text
    keyed = [(line["step"], tuple(sorted(line))) for line in map(json.loads, text.splitlines())]
    assert len(keyed) == len(set(keyed)) and keyed[-1][0] == longer  # each step's lines once
    cfg = json.loads((run_dir / "meta" / "full_config.json").read_text())
    assert cfg["max_iters"] == longer and cfg["lr_decay_iters"] == recorded["max_iters"]
    assert f"step {longer}/{longer}" in res.stdout and "lr 1.00e-04" in res.stdout  # past the schedule: min_lr
    assert "eval step 0" not in res.stdout  # the step-0 eval is a fresh run's


def test_fine_tuning_from_a_run(trained_run, tmp_path):
    corpus = tmp_path / "new.txt"
    corpus.write_text("All: Speak, speak. Resolved.\n" * 100)
    args = ["--data", str(corpus), "--data-dir", str(tmp_path / "data"), "--runs-dir", str(tmp_path / "runs"),
            "--max-iters", "4", "--warmup-iters", "1", "--eval-interval", "2", "--init-from", str(trained_run), "--device", "cpu"]
    res = call_main(train.main, *args)
    assert res.returncode == 0, res.stderr
    run_dir = only_run(tmp_path)
    record = json.loads((run_dir / "meta" / "init_from.json").read_text())
    from utils.files import sha256_file
    assert record["model_sha256"] == sha256_file(trained_run / "artifacts" / "export" / "model.safetensors")
    cfg = json.loads((run_dir / "meta" / "full_config.json").read_text())
    source_cfg = json.loads((trained_run / "meta" / "full_config.json").read_text())
    assert all(cfg[k] == source_cfg[k] for k in ("n_layer", "n_embd", "block_size", "tokenizer"))
    assert json.loads((run_dir / "artifacts" / "export" / "tokenizer.json").read_text()) == \
        json.loads((trained_run / "artifacts" / "export" / "tokenizer.json").read_text())
    with user_error("conflicts with --init-from"):
        train.main([*args, "--n-layer", "5"])
    corpus.write_text("Zebra crossing\n" * 100)
    with user_error("'Z'"):
        train.main(args)
    assert list((tmp_path / "runs").iterdir()) == [run_dir]  # neither error made a run directory


def one_update(cfg: ModelConfig, dtype=torch.float32) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = LanguageModel(cfg, 30)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tokens = (torch.arange(3000) * 7 % 30).numpy()
    scaler = torch.amp.GradScaler("cpu", enabled=dtype == torch.float16)
    loss, _ = train_step(model, opt, tokens, 0, cfg, scaler=scaler, ctx=autocast(torch.device("cpu"), dtype),
                          device=torch.device("cpu"))
    assert torch.isfinite(loss)
    return [p.detach().clone() for p in model.parameters()]


def test_gradient_accumulation_equals_the_larger_batch(tiny_cfg):
    whole = one_update(ModelConfig(**{**tiny_cfg.to_dict(), "batch_size": 8, "grad_accum_steps": 1}))
    accum = one_update(ModelConfig(**{**tiny_cfg.to_dict(), "batch_size": 4, "grad_accum_steps": 2}))
    for a, b in zip(whole, accum):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mixed_precision_step_on_cpu(tiny_cfg, dtype):
    # conftest probed both dtypes in a child process and set any ISA cap they need before this process
    # ran a half-precision op: a CPU that cannot run one skips here instead of killing the suite.
    probe = probe_half_precision(str(dtype).removeprefix("torch."))
    if not probe.usable:
        pytest.skip(f"{dtype} cannot run on this CPU: {probe.problem}")
    ref = one_update(tiny_cfg)
    got = one_update(tiny_cfg, dtype)
    assert all(g.dtype == torch.float32 for g in got)  # weights stay float32 under autocast
    for a, b in zip(ref, got):
        torch.testing.assert_close(a, b, rtol=0, atol=0.02)


@pytest.mark.slow
def test_resume_continues_the_same_aim_run(tiny_corpus, tmp_path):
    from aim.storage.context import Context

    from rundir.tracking import read_aim_run
    aim_args = ["--aim-logging", "--aim-repo", str(tmp_path)]
    proc = start_cli("train.py", *base_args(tiny_corpus, tmp_path), *aim_args)
    out = "".join(wait_for_line(proc, "saved checkpoint step_000010"))
    proc.send_signal(signal.SIGKILL)
    out += proc.communicate()[0]
    run_dir = only_run(tmp_path)
    target = resume_target(out, ITERS)
    res = call_main(train.main, "--resume", str(run_dir), "--max-iters", str(target))
    assert res.returncode == 0, res.stderr
    status = json.loads((run_dir / "meta" / "status.json").read_text())
    run = read_aim_run(tmp_path, status["aim_run_hash"])
    steps, _ = run.get_metric("eval_loss", Context({"subset": "val"})).data.view("val").numpy()
    assert list(steps) == list(range(0, target + 1, 10))  # evals (step 0 too) before the kill and after, one Aim run
    steps, _ = run.get_metric("loss", Context({"subset": "train"})).data.view("val").numpy()
    assert list(steps) == list(range(1, target + 1))


def test_target_val_loss_stops_exports_and_records_when(tiny_corpus, tmp_path):
    res = call_main(train.main, *base_args(tiny_corpus, tmp_path, max_iters=200), "--learning-rate", "0.01",
                    "--warmup-iters", "0", "--eval-interval", "5", "--target-val-loss", "2.8")
    assert res.returncode == 0, res.stderr
    run_dir = only_run(tmp_path)
    status = json.loads((run_dir / "meta" / "status.json").read_text())
    at = status["target_reached_at"]
    assert status["state"] == "completed" and status["stop_reason"] == "target_reached"
    assert status["iteration"] == at["step"] < 200 and at["step"] % 5 == 0 and at["val_loss"] <= 2.8
    assert at["tokens"] == at["step"] * 8 * 32 and at["seconds"] > 0  # debug preset: batch 8 x block 32
    assert (run_dir / "artifacts" / "export" / "model.safetensors").is_file()
    assert latest_good(run_dir / "artifacts" / "checkpoints").iteration == at["step"]
    assert f"target reached: val loss {at['val_loss']:.4f} <= target_val_loss 2.8 at step {at['step']}" in res.stdout


def test_llama_with_muon_resumes_bit_identical_and_refuses_another_optimizer(tiny_corpus, tmp_path):
    args = [*base_args(tiny_corpus, tmp_path / "straight", max_iters=8), "--arch", "llama", "--optimizer", "muon",
            "--lr-decay-iters", "8", "--warmup-iters", "2", "--eval-interval", "4", "--checkpoint-interval", "4"]
    assert call_main(train.main, *args).returncode == 0
    halves = [a if a != str(tmp_path / "straight" / "runs") else str(tmp_path / "halves" / "runs") for a in args]
    first = call_main(train.main, *halves, "--max-iters", "4")
    assert first.returncode == 0, first.stderr
    assert "optimizer muon, cosine schedule: Muon lr 0.02 on 8 hidden matrices" in first.stdout
    run_dir = only_run(tmp_path / "halves")
    res = call_main(train.main, "--resume", str(run_dir), "--max-iters", "8")
    assert res.returncode == 0, res.stderr
    straight, resumed = weights(only_run(tmp_path / "straight")), weights(run_dir)
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)
    with user_error("--optimizer cannot change when resuming", "optimizer='muon'", "start a new run"):
        train.main(["--resume", str(run_dir), "--max-iters", "12", "--optimizer", "adamw"])
    cli = run_cli("train.py", "--resume", str(run_dir), "--max-iters", "12", "--optimizer", "adamw")
    assert cli.returncode == 2 and len(cli.stderr.strip().splitlines()) == 1, cli.stderr
    assert "--optimizer cannot change when resuming" in cli.stderr


def test_a_checkpoint_from_before_optimizers_resumes_as_adamw(trained_run, tmp_path):
    run_dir = tmp_path / trained_run.name
    shutil.copytree(trained_run, run_dir)
    ckpt = latest_good(run_dir / "artifacts" / "checkpoints")
    meta = json.loads((ckpt.path / "meta.json").read_text())
    del meta["meta_sha256"]
    for key in ("optimizer", "lr_schedule", "decay_fraction", "muon_lr", "momentum", "target_val_loss"):
        del meta["config"][key]  # as written before these knobs existed
    (ckpt.path / "meta.json").write_text(json.dumps({**meta, "meta_sha256": checkpoint_digest(meta)}))
    res = call_main(train.main, "--resume", str(run_dir), "--max-iters", str(ckpt.iteration + 2), "--optimizer",
                    "adamw")
    assert res.returncode == 0, res.stderr
    assert "optimizer adamw, cosine schedule: AdamW lr" in res.stdout
    assert json.loads((run_dir / "meta" / "full_config.json").read_text())["optimizer"] == "adamw"
