"""runs.py: the run listing (killed runs told apart, sorted by any column), show, diff, and clean (a
dry run unless --yes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import runs
from model import LanguageModel
from parameters import ModelConfig
from rundir.checkpoint import find_checkpoints, mark_best, save_checkpoint
from utils.files import atomic_write_json
from rundir.lock import RunLock
from rundir.run_dir import RunDir
from rundir.status import RunStatus


def make_run(root: Path, tag: str, state: str, steps: tuple[int, ...] = (), best: int | None = None,
             best_val: float = 1.5, **config: object) -> Path:
    """A run directory in `state` with checkpoints at `steps` (state "killed": left running, no owner)."""
    run_dir = RunDir.create(root, tag).path
    cfg = ModelConfig(**{"n_layer": 1, "n_head": 1, "n_embd": 8, "block_size": 8, "run_tag": tag, **config})
    atomic_write_json(run_dir / "meta" / "full_config.json", cfg.to_dict())
    status = RunStatus(run_dir)
    status.start(iteration=max(steps, default=0), world_size=1, params=1234)
    if state != "killed":
        status.finish(state, best_val_loss=best_val, val_bpb=best_val * 1.1, seconds=90.0)
    model = LanguageModel(cfg, 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ckpt_dir = run_dir / "artifacts" / "checkpoints"
    for step in steps:
        path = save_checkpoint(ckpt_dir, model, optimizer, torch.amp.GradScaler("cpu", enabled=False),
                               {"iteration": step})
        if step == best:
            mark_best(ckpt_dir, path, 1.5)
    return run_dir


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    make_run(root, "done", "completed", (10, 20, 30), best=20, best_val=1.2)
    make_run(root, "paused", "interrupted", (10, 20, 30), best=10, best_val=1.9, arch="llama")
    make_run(root, "broke", "failed", (10,), best_val=1.4)
    make_run(root, "gone", "killed", (10,))
    return root


def names(root: Path) -> dict[str, list[str]]:
    return {p.name.split("_", 2)[2]: [c.name for c in find_checkpoints(p / "artifacts" / "checkpoints")]
            for p in sorted(root.iterdir())}


def test_list_shows_every_run_with_its_real_state(root: Path, capsys):
    assert runs.main(["--runs-dir", str(root), "list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["run", "tag", "state", "arch", "params", "tokens", "best", "val", "val", "bpb", "wall",
                              "started", "(UTC)"]
    rows = {line.split()[1]: line.split() for line in out[1:]}
    assert {tag: row[2] for tag, row in rows.items()} == {"done": "completed", "paused": "interrupted",
                                                         "broke": "failed", "gone": "killed"}
    # 30 steps of batch 12 x block 8 x 1 micro-step x 1 rank = 2,880 tokens seen
    assert rows["paused"][3:9] == ["llama", "0.00M", "2,880", "1.9000", "2.0900", "1m30s"]
    assert rows["gone"][6:9] == ["-", "-", "0s"]  # no eval reported; its wall time: until its last heartbeat
    runs.main(["--runs-dir", str(root), "list", "--state", "killed"])
    assert [line.split()[2] for line in capsys.readouterr().out.splitlines()[1:]] == ["killed"]
    runs.main(["--runs-dir", str(root), "list", "--sort", "best_val"])
    assert [line.split()[1] for line in capsys.readouterr().out.splitlines()[1:]] == ["done", "broke", "paused", "gone"]
    runs.main(["--runs-dir", str(root), "list", "--sort", "best_val", "--reverse", "--tag", "broke"])
    assert [line.split()[1] for line in capsys.readouterr().out.splitlines()[1:]] == ["broke"]
    runs.main(["--runs-dir", str(root), "list", "--sort", "best_val", "--reverse"])
    assert [line.split()[1] for line in capsys.readouterr().out.splitlines()[1:]] == ["paused", "broke", "done", "gone"]


def test_show_tells_everything_the_run_recorded(trained_run: Path, capsys):
    assert runs.main(["--runs-dir", str(trained_run.parent), "show", trained_run.name]) == 0
    out = capsys.readouterr().out
    assert f"run {trained_run}\nstate: completed" in out
    assert "  stop_reason: completed" in out and "  params: " in out and "  seconds: " in out
    assert "  * max_iters: 20\n" in out and "    arch: gpt2\n" in out  # * marks what differs from the defaults
    assert "code (meta/git.txt): commit: " in out and "environment (meta/env.txt): " in out
    assert "(best)" in out and f"export: {trained_run / 'artifacts' / 'export'}" in out
    evals = sorted((trained_run / "evals").glob("*.json"))  # other tests may have evaluated this shared run
    assert f"evals: {len(evals)}" in out and all(f"  {p.name}: " in out for p in evals)


def test_diff_names_the_config_keys_and_the_code_that_differ(tmp_path: Path, capsys):
    a = make_run(tmp_path / "runs", "a", "completed", learning_rate=1e-3)
    b = make_run(tmp_path / "runs", "b", "completed", learning_rate=3e-4, n_layer=2)
    header = "repository: /x\ncommit: {}\nbranch: main\ndirty: True\nuntracked files (0):\n\n" \
             "diff against HEAD (staged + unstaged):\n"
    (a / "meta" / "git.txt").write_text(header.format("abc") + "-x = 1\n+x = 2\n")
    (b / "meta" / "git.txt").write_text(header.format("abc") + "-x = 1\n+x = 3\n")
    assert runs.main(["--runs-dir", str(tmp_path / "runs"), "diff", str(a), b.name]) == 0
    out = capsys.readouterr().out
    assert "config: 2 key(s) differ\n  learning_rate: 0.001 -> 0.0003\n  n_layer: 1 -> 2\n" in out
    assert "code: commit abc in both" in out and "uncommitted changes differ" in out
    assert "-+x = 2\n++x = 3" in out
    with pytest.raises(FileNotFoundError):
        runs.main(["--runs-dir", str(tmp_path / "runs"), "diff", str(a), "nope"])


def test_clean_is_a_dry_run_until_told_otherwise(root: Path, capsys):
    before = names(root)
    runs.main(["--runs-dir", str(root), "clean"])
    out = capsys.readouterr().out
    assert names(root) == before and "would remove" in out and "run again with --yes" in out
    runs.main(["--runs-dir", str(root), "clean", "--yes"])
    assert names(root) == {"done": ["step_000020"], "paused": ["step_000010", "step_000030"]}
    assert all((p / "artifacts").is_dir() for p in root.iterdir())


def test_clean_leaves_a_run_another_process_holds(root: Path, capsys):
    (busy,) = [p for p in root.iterdir() if p.name.endswith("_done")]
    with RunLock(busy):
        runs.main(["--runs-dir", str(root), "clean", "--yes"])
    assert f"skipped {busy.name}" in capsys.readouterr().out
    assert len(find_checkpoints(busy / "artifacts" / "checkpoints")) == 3


def test_a_missing_runs_directory_is_one_line(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="runs directory .* does not exist"):
        runs.main(["--runs-dir", str(tmp_path / "none"), "list"])


def test_plot_reads_metrics_jsonl_and_writes_a_png(tmp_path: Path, capsys):
    a = make_run(tmp_path / "runs", "a", "completed")
    lines = [{"step": 10, "tokens_seen": 960, "wall_time": 1.0, "loss/train": 3.0},
             {"step": 10, "tokens_seen": 960, "wall_time": 1.1, "eval_loss/train": 2.9, "eval_loss/val": 3.1},
             {"step": 20, "tokens_seen": 1920, "wall_time": 2.0, "loss/train": 2.5}]
    (a / "logs").mkdir(parents=True, exist_ok=True)
    (a / "logs" / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"step": 3')  # torn
    assert runs.loss_curves(a) == {"val": ([960], [3.1]), "train": ([960, 1920], [3.0, 2.5])}
    out = tmp_path / "loss.png"
    assert runs.main(["--runs-dir", str(tmp_path / "runs"), "plot", a.name, "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "wrote" in capsys.readouterr().out
    with pytest.raises(ValueError, match="must be a .png file"):
        runs.main(["--runs-dir", str(tmp_path / "runs"), "plot", a.name, "--out", str(tmp_path / "loss.jpg")])
    b = make_run(tmp_path / "runs", "b", "killed")
    (b / "logs").mkdir(parents=True, exist_ok=True)
    (b / "logs" / "metrics.jsonl").write_text("")
    with pytest.raises(ValueError, match="has logged a loss yet"):
        runs.main(["--runs-dir", str(tmp_path / "runs"), "plot", b.name, "--out", str(out)])


def test_plot_falls_back_to_tensorboard_for_older_runs(trained_run: Path, tmp_path: Path):
    """A run without logs/metrics.jsonl: its TensorBoard events, steps turned into tokens seen."""
    import shutil

    old = tmp_path / trained_run.name
    shutil.copytree(trained_run, old)
    (old / "logs" / "metrics.jsonl").unlink(missing_ok=True)
    curves = runs.loss_curves(old)
    config = json.loads((old / "meta" / "full_config.json").read_text())
    per_step = config["batch_size"] * config["block_size"] * config["grad_accum_steps"]
    assert curves["val"][0][-1] == config["max_iters"] * per_step and len(curves["train"][0]) > 1
    status = json.loads((old / "meta" / "status.json").read_text())
    assert min(curves["val"][1]) == pytest.approx(status["best_val_loss"], rel=1e-6)


def test_clean_never_deletes_a_run_whose_status_cannot_be_read(tmp_path: Path, capsys):
    """A completed run with its export, and status.json cut short (`{"state": "completed", "iteration": 600`):
    it read as killed, and `clean --yes` deleted it, export included."""
    from tokenizer import CharTokenizer
    from rundir.export import save_export

    root = tmp_path / "runs"
    done = make_run(root, "done", "completed", (10, 20, 30), best=20)
    cfg = ModelConfig(n_layer=1, n_head=1, n_embd=8, block_size=8)
    tok = CharTokenizer.from_text("abcdefghi\n")
    save_export(done / "artifacts" / "export", LanguageModel(cfg, tok.vocab_size), cfg.to_dict(), tok.to_dict())
    (done / "meta" / "status.json").write_text('{"state": "completed", "iteration": 600')
    killed_with_export = make_run(root, "killed", "killed", (10, 20, 30), best=10)
    save_export(killed_with_export / "artifacts" / "export", LanguageModel(cfg, tok.vocab_size), cfg.to_dict(),
                tok.to_dict())
    runs.main(["--runs-dir", str(root), "list", "--state", "unreadable"])
    assert done.name in capsys.readouterr().out
    runs.main(["--runs-dir", str(root), "clean"])
    out = capsys.readouterr().out
    assert f"kept {done.name}: meta/status.json exists but is not a JSON object" in out and "killed" not in out.split(
        "would remove")[0]
    runs.main(["--runs-dir", str(root), "clean", "--yes"])
    assert names(root) == {"done": ["step_000010", "step_000020", "step_000030"],
                           "killed": ["step_000010", "step_000030"]}  # a verified export: only old checkpoints go
    assert (done / "artifacts" / "export" / "model.safetensors").is_file()
    assert (killed_with_export / "artifacts" / "export" / "model.safetensors").is_file()


def test_runs_py_refuses_an_unknown_state_and_says_when_there_is_nothing_to_clean(tmp_path: Path, capsys):
    make_run(tmp_path / "runs", "done", "completed", (10,), best=10)
    with pytest.raises(ValueError, match="argument --state: invalid choice: 'bogus'"):
        runs.main(["--runs-dir", str(tmp_path / "runs"), "list", "--state", "bogus"])
    runs.main(["--runs-dir", str(tmp_path / "runs"), "clean"])
    assert capsys.readouterr().out.strip() == (f"nothing to clean in '{tmp_path / 'runs'}': no failed or killed runs, "
                                               "no old checkpoints")


def test_the_tokens_column_has_one_format(tmp_path: Path, capsys):
    make_run(tmp_path / "runs", "small", "completed", (10,), best=10)  # 10 steps x 12 x 8: 960 tokens
    make_run(tmp_path / "runs", "big", "completed", (20000,), best=20000)  # 1,920,000 tokens
    runs.main(["--runs-dir", str(tmp_path / "runs"), "list"])
    rows = capsys.readouterr().out.splitlines()[1:]
    assert {row.split()[1]: row.split()[5] for row in rows} == {"small": "960", "big": "1,920,000"}


def test_plot_skips_lines_train_py_did_not_write_and_names_runs_without_a_loss(tmp_path: Path, capsys):
    a, b = make_run(tmp_path / "runs", "a", "completed"), make_run(tmp_path / "runs", "b", "completed")
    (a / "logs").mkdir(parents=True, exist_ok=True)
    (a / "logs" / "metrics.jsonl").write_text('[1, 2]\n"x"\n{"step": 1, "tokens_seen": 96, "loss/train": 3.0}\n'
                                              '{"step": 2, "loss/train": 2.0}\n')
    (b / "logs").mkdir(parents=True, exist_ok=True)
    (b / "logs" / "metrics.jsonl").write_text("")
    assert runs.loss_curves(a)["train"] == ([96], [3.0])
    runs.main(["--runs-dir", str(tmp_path / "runs"), "plot", a.name, b.name, "--out", str(tmp_path / "l.png")])
    assert f"(1 curves from 1 of 2 runs); no loss logged yet in {b.name}" in capsys.readouterr().out


def test_a_reader_that_leaves_early_gets_no_traceback(tmp_path: Path):
    """`python runs.py list | head -1`: the pipe closes under runs.py."""
    import subprocess
    import sys

    from conftest import REPO, cli_env

    for i in range(300):  # rows of ~300 bytes: more than a pipe holds, so runs.py is still writing when it closes
        make_run(tmp_path / "runs", f"r{i:03d}" + "x" * 190, "completed")
    proc = subprocess.Popen([sys.executable, str(REPO / "runs.py"), "--runs-dir", str(tmp_path / "runs"), "list"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env())
    proc.stdout.readline()
    proc.stdout.close()  # as `head -1` exits
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141 and "Traceback" not in err and "BrokenPipe" not in err, err
