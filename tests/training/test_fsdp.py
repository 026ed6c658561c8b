"""parallelism fsdp on CPU (gloo) under torchrun: FSDP2 shards, sharded DCP checkpoints that resume on
other world sizes and layouts, the per-rank memory, and damaged shards."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import inference
import train
from conftest import REPO, call_main, user_error, write_benchmarks
from test_distributed import args, env, export_of

pytestmark = pytest.mark.slow

# Two ranks' gradients are averaged in another order than one process's batch sums them: the exports of
# 20 steps measured up to 1.6e-6 (AdamW) and 2.9e-6 (Muon) apart here.
WEIGHT_TOLERANCE = 1e-5
# Across five layouts, AdamW turns the rounding noise of gradients that are zero in exact arithmetic (the
# key bias: softmax ignores it) into lr-sized steps, so the chain is held to the model's function: each
# step's loss measured at most 1.1e-4 from the straight run's (3.1e-5 on average), against a mean change
# of 1.9e-2 from one step's batch to the next: a batch out of place would stand out 100 times over.
LOSS_TOLERANCE = 5e-4


def torchrun(n: int, *argv: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           str(REPO / "train.py"), *argv]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env())
    assert res.returncode == 0, res.stdout + res.stderr
    return res


def run_dir_of(root: Path) -> Path:
    (run_dir,) = root.iterdir()
    return run_dir


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory) -> dict[str, Path]:
    """One 2-rank fsdp run per optimizer (batch 4 each; adamw with activation checkpointing) and the
    one-process runs with twice the batch that they must equal; shared by the tests below, which copy
    what they change."""
    root = tmp_path_factory.mktemp("fsdp")
    corpus = root / "tiny.txt"
    from conftest import TINY_TEXT
    corpus.write_text(TINY_TEXT, encoding="utf-8")
    runs = {}
    # The AdamW run also samples and scores a benchmark file at each eval (rank 0 alone samples, and the ranks
    # score 5 and 4 items: forwards that only some ranks run), and logs histograms (gathered whole).
    hellaswag = write_benchmarks(root / "bench", n=9)["hellaswag"]
    also = ("--sample-length", "20", "--eval-tasks", str(hellaswag), "--histogram-interval", "10")
    for optimizer, extra in (("adamw", ("--activation-checkpointing", "full", *also)), ("muon", ())):
        common = ("--dtype", "float32", "--optimizer", optimizer)
        torchrun(2, *args(corpus, root, f"fsdp-{optimizer}", "--parallelism", "fsdp", "--batch-size", "4",
                          *common, *extra))
        single = call_main(train.main, *args(corpus, root, f"single-{optimizer}", "--batch-size", "8", *common))
        assert single.returncode == 0, single.stderr
        runs[optimizer] = run_dir_of(root / f"fsdp-{optimizer}")
        runs[f"single-{optimizer}"] = run_dir_of(root / f"single-{optimizer}")
    runs["corpus"] = corpus
    return runs


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_two_fsdp_ranks_equal_one_process_with_twice_the_batch(optimizer: str, fsdp_runs: dict[str, Path]):
    run = fsdp_runs[optimizer]
    log = (run / "logs" / "train.log").read_text()
    assert "(2 ranks, fsdp)" in log and "(fsdp, 1/2 each)" in log
    if optimizer == "adamw":
        assert log.count("hellaswag_own acc_norm") == 5 and "sample:" in log  # evals at steps 0, 5, 10, 15, 20
        (record,) = [json.loads(p.read_text()) for p in (run / "evals").glob("*.json")]
        assert record["items"] == 9
    checkpoint = run / "artifacts" / "checkpoints" / "step_000020"
    meta = json.loads((checkpoint / "meta.json").read_text())
    assert meta["format"] == "sharded" and not (checkpoint / "model.safetensors").exists()
    assert {"sharded/__0_0.distcp", "sharded/__1_0.distcp", "sharded/.metadata", "trainer.pt"} <= set(meta["sha256"])
    fsdp_w, single_w = export_of(run.parent), export_of(fsdp_runs[f"single-{optimizer}"].parent)
    assert fsdp_w.keys() == single_w.keys()
    for k in fsdp_w:  # the export is one whole file, gathered from the shards
        torch.testing.assert_close(fsdp_w[k], single_w[k], rtol=0, atol=WEIGHT_TOLERANCE)
    # The last checkpoint's shards, read whole in one process (as inference.py --checkpoint does), are the export.
    from rundir.export import read_checkpoint_model
    whole = read_checkpoint_model(checkpoint).weights
    assert {k: v for k, v in whole.items() if k in fsdp_w}.keys() == fsdp_w.keys()
    assert all(torch.equal(whole[k], fsdp_w[k]) for k in fsdp_w)


def test_fsdp_shards_a_llama_block_for_another_optimizer(fsdp_runs: dict[str, Path], tmp_path: Path):
    """llama's block (grouped-query attention, QK-norm, rotary buffers, an untied head) with Adagrad: 2 fsdp
    ranks equal one process with twice the batch, as gpt2's block with AdamW and Muon do above."""
    extra = ("--arch", "llama", "--n-kv-head", "1", "--qk-norm", "true", "--tie-embeddings", "false",
             "--optimizer", "adagrad", "--dtype", "float32", "--max-iters", "10")
    torchrun(2, *args(fsdp_runs["corpus"], tmp_path, "fsdp", "--parallelism", "fsdp", "--batch-size", "4", *extra))
    single = call_main(train.main, *args(fsdp_runs["corpus"], tmp_path, "single", "--batch-size", "8", *extra))
    assert single.returncode == 0, single.stderr
    fsdp_w, single_w = export_of(tmp_path / "fsdp"), export_of(tmp_path / "single")
    assert fsdp_w.keys() == single_w.keys() and "lm_head.weight" in fsdp_w
    for k in fsdp_w:
        torch.testing.assert_close(fsdp_w[k], single_w[k], rtol=0, atol=WEIGHT_TOLERANCE)


def held(log: str) -> dict[str, float]:
    """A rank's 'rank R holds weights X MB, gradients Y MB, optimizer state Z MB' line, in MB."""
    line = re.search(r"rank \d holds (.*) \(fsdp", log).group(1)
    return {k: float(v.replace(",", "")) for k, v in re.findall(r"([a-z ]+) ([\d.,]+) MB", line.replace(", ", ";"))}


def test_each_fsdp_rank_holds_about_half_of_one_process_state(fsdp_runs: dict[str, Path]):
    """Measured on the tensors: each rank's weights, gradients and AdamW state against what one process
    training the same model holds (model and optimizer built as train.py builds them)."""
    from rundir.export import load_export
    from training.optim import build_optimizer
    from training.parallelize import local_bytes

    model, _, cfg = load_export(fsdp_runs["adamw"])
    optimizer = build_optimizer(model.train(), cfg, torch.device("cpu"))
    x = torch.randint(0, model.vocab_size, (2, cfg.block_size))
    model(x, x)[1].backward()
    optimizer.step()
    one = {"weights": local_bytes(model.parameters()), "gradients": local_bytes(p.grad for p in model.parameters()),
           "optimizer state": local_bytes(t for s in optimizer.state.values() for t in s.values())}
    logs = fsdp_runs["adamw"] / "logs"
    for log in (logs / "train.log", logs / "train.rank1.log"):
        rank = held(log.read_text())
        assert set(rank) == set(one)
        ratio = (rank["weights"] + rank["optimizer state"]) * 1e6 / (one["weights"] + one["optimizer state"])
        assert 0.45 <= ratio <= 0.55, (rank, one)
        assert rank["gradients"] * 1e6 <= 0.55 * one["gradients"]


def test_resharding_chain_continues_as_a_straight_run(fsdp_runs: dict[str, Path], tmp_path: Path):
    """Steps 0-5 on 2 fsdp ranks, 5-10 in one process, 10-15 on 2 fsdp ranks, 15-20 on 4, 20-24 on 2 DDP
    ranks: every layout and world size resumes the others' checkpoints (sharded or full) and each step's
    loss equals a straight one-process run's, to summation order: the global batch is kept (batch_size
    per rank rescaled) and each step's batch is a pure function of (seed, step), so the data continues."""
    corpus = fsdp_runs["corpus"]
    base = ("--batch-size", "8", "--lr-decay-iters", "24", "--checkpoint-interval", "5", "--eval-interval", "5")
    straight = call_main(train.main, *args(corpus, tmp_path, "straight", *base, "--max-iters", "24"))
    assert straight.returncode == 0, straight.stderr
    torchrun(2, *args(corpus, tmp_path, "chain", *base, "--batch-size", "4", "--max-iters", "5",
                      "--parallelism", "fsdp"))
    run = run_dir_of(tmp_path / "chain")
    resumed = call_main(train.main, "--resume", str(run), "--max-iters", "10")
    assert "batch_size 4 -> 8 per rank, keeping the global batch of 8" in resumed.stdout
    torchrun(2, "--resume", str(run), "--max-iters", "15")  # a full checkpoint, into shards
    four = torchrun(4, "--resume", str(run), "--max-iters", "20")
    assert "batch_size 4 -> 2 per rank" in four.stdout and "(fsdp, 1/4 each)" in four.stdout
    ddp = torchrun(2, "--resume", str(run), "--max-iters", "24", "--parallelism", "ddp")
    assert "(ddp, whole on every rank)" in ddp.stdout

    def losses(run_dir: Path) -> dict[int, float]:
        rows = [json.loads(line) for line in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss/train"] for r in rows if "loss/train" in r}

    chained, reference = losses(run), losses(run_dir_of(tmp_path / "straight"))
    assert sorted(chained) == sorted(reference) == list(range(1, 25))
    for step in reference:
        assert chained[step] == pytest.approx(reference[step], abs=LOSS_TOLERANCE), step
    apart = sum(abs(chained[s] - reference[s]) for s in reference) / len(reference)
    next_batch = sum(abs(reference[s + 1] - reference[s]) for s in range(1, 24)) / 23
    assert apart < next_batch / 50, (apart, next_batch)
    val = [json.loads((r / "meta" / "status.json").read_text())["val_loss"] for r in (run, run_dir_of(tmp_path / "straight"))]
    assert val[0] == pytest.approx(val[1], abs=LOSS_TOLERANCE)

    sharded = run / "artifacts" / "checkpoints" / "step_000020"  # written by 4 ranks
    assert json.loads((sharded / "meta.json").read_text())["format"] == "sharded"
    res = call_main(inference.main, "--run", str(sharded), "--prompt", "the ", "--max-new-tokens", "8")
    assert res.returncode == 0 and "checkpoint step_000020" in res.stdout + res.stderr, res.stdout + res.stderr


def test_a_damaged_shard_is_refused_and_resume_falls_back(fsdp_runs: dict[str, Path], tmp_path: Path):
    run = Path(shutil.copytree(fsdp_runs["adamw"], tmp_path / "runs" / fsdp_runs["adamw"].name))
    shard = run / "artifacts" / "checkpoints" / "step_000020" / "sharded" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with user_error("step_000020", "sharded/__1_0.distcp does not match its recorded SHA-256 (damaged)"):
        call_main(inference.main, "--run", str(run), "--checkpoint", "step_20", "--prompt", "a")
    res = call_main(train.main, "--resume", str(run), "--max-iters", "22")
    assert res.returncode == 0, res.stderr  # in one process: its checkpoints are full ones
    assert "sharded/__1_0.distcp does not match its recorded SHA-256 (damaged); falling back" in res.stdout
    assert "resumed from step_000015 at iteration 15" in res.stdout
    assert json.loads((run / "artifacts" / "checkpoints" / "step_000022" / "meta.json").read_text())["format"] == "full"


def test_fsdp_refuses_float16_in_one_line(tiny_corpus: Path, tmp_path: Path):
    with user_error("parallelism", "use --dtype bfloat16"):
        call_main(train.main, *args(tiny_corpus, tmp_path, "x", "--parallelism", "fsdp", "--dtype", "float16"))
