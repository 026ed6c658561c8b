"""Tracking (utils/tracking.py): the no-op twin, TensorBoard and Aim read back exactly what was logged."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from aim.storage.context import Context

from rundir.tracking import (
    AimTracker, JsonlTracker, MultiTracker, TensorBoardTracker, Tracker, build_tracker, read_aim_run,
)

REPO = Path(__file__).resolve().parents[2]
CONFIG = {"n_layer": 2, "learning_rate": 1e-3, "tokenizer": "char", "bias": True, "aim_repo": "."}
EXTRA = {"git_commit": "abc123", "git_branch": "main", "python": "3.11.0"}


def _model_with_grads() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    model(torch.randn(2, 4)).sum().backward()
    return model


def _log_everything(tracker: Tracker) -> None:
    tracker.log_config(CONFIG, EXTRA)
    tracker.log_scalars(1, {"loss": 2.5, "lr": 1e-4}, subset=None)
    tracker.log_scalars(1, {"loss": 2.0}, subset="train")
    tracker.log_scalars(2, {"loss": torch.tensor(1.5)}, subset="train")
    tracker.log_scalars(2, {"eval_loss": 1.25}, subset="train")
    tracker.log_scalars(2, {"eval_loss": 1.75}, subset="val")
    tracker.log_histograms(2, _model_with_grads())
    tracker.log_text(2, "sample", "ROMEO:\nhello")


def test_noop_tracker_accepts_every_call() -> None:
    with Tracker() as tracker:
        _log_everything(tracker)
    assert tracker.run_hash is None


def _event_accumulator(log_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"histograms": 0, "scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_tensorboard_round_trip(tmp_path: Path) -> None:
    tracker = TensorBoardTracker(tmp_path / "tb")
    _log_everything(tracker)
    tracker.close()
    assert [p.name for p in (tmp_path / "tb").iterdir() if p.is_dir()] == []  # hparams did not split the run
    acc = _event_accumulator(tmp_path / "tb")
    tags = acc.Tags()
    assert sorted(tags["scalars"]) == ["eval_loss/train", "eval_loss/val", "loss", "loss/train", "lr"]
    assert [(e.step, e.value) for e in acc.Scalars("loss/train")] == [(1, 2.0), (2, 1.5)]
    assert [(e.step, e.value) for e in acc.Scalars("eval_loss/val")] == [(2, 1.75)]
    assert acc.Scalars("lr")[0].value == pytest.approx(1e-4)
    assert sorted(tags["histograms"]) == ["grads/bias", "grads/weight", "params/bias", "params/weight"]
    assert acc.Histograms("params/weight")[0].histogram_value.num == 12
    sample = acc.Tensors("sample/text_summary")[0]
    assert sample.step == 2 and "ROMEO:\nhello" in sample.tensor_proto.string_val[0].decode()
    config_text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "n_layer: 2" in config_text and "git_commit: abc123" in config_text
    _assert_hparams(acc)


def _assert_hparams(acc) -> None:
    from tensorboard.plugins.hparams import metadata

    content = acc.PluginTagToContent(metadata.PLUGIN_NAME)[metadata.SESSION_START_INFO_TAG]
    hparams = metadata.parse_session_start_info_plugin_data(content).hparams
    assert hparams["n_layer"].number_value == 2 and hparams["tokenizer"].string_value == "char"
    assert hparams["git_branch"].string_value == "main"


def test_histograms_skip_missing_grads_and_non_finite(tmp_path: Path) -> None:
    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    tracker = TensorBoardTracker(tmp_path)
    tracker.log_histograms(0, model)
    tracker.close()
    acc = _event_accumulator(tmp_path)
    assert sorted(acc.Tags()["histograms"]) == ["params/bias", "params/weight"]
    assert acc.Histograms("params/weight")[0].histogram_value.num == 3


@pytest.fixture(scope="module")
def aim_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One Aim repo for the module: initializing one costs over a second."""
    return tmp_path_factory.mktemp("aim")


def _steps_values(run, name: str, context: dict) -> list[tuple[int, float]]:
    from aim.storage.context import Context

    steps, (values,) = run.get_metric(name, Context(context)).data.view("val").numpy()
    return list(zip(steps.tolist(), values.tolist()))


def test_aim_round_trip_and_resume(aim_repo: Path) -> None:
    tracker = AimTracker(aim_repo, "tests", run_name="20250101_000000_aim")
    _log_everything(tracker)
    tracker.close()
    run = read_aim_run(aim_repo, tracker.run_hash)
    assert run.name == "20250101_000000_aim" and run.experiment == "tests"
    assert _steps_values(run, "loss", {"subset": "train"}) == [(1, 2.0), (2, 1.5)]
    assert _steps_values(run, "loss", {}) == [(1, 2.5)]
    assert _steps_values(run, "eval_loss", {"subset": "val"}) == [(2, 1.75)]
    assert _steps_values(run, "eval_loss", {"subset": "train"}) == [(2, 1.25)]
    assert run["hparams"] == {**CONFIG, **EXTRA}
    from aim.storage.context import Context

    grads = run.get_distribution_sequence("weight", Context({"type": "grads"}))
    (step,), ((dist,),) = grads.data.view("val").items_list()
    assert step == 2 and sum(dist.to_np_histogram()[0]) == 12
    assert run.get_distribution_sequence("bias", Context({"type": "params"})) is not None
    (_,), ((text,),) = run.get_text_sequence("sample", Context({})).data.view("val").items_list()
    assert text.data == "ROMEO:\nhello"

    resumed = AimTracker(aim_repo, "tests", run_hash=tracker.run_hash)
    assert resumed.run_hash == tracker.run_hash
    resumed.log_scalars(3, {"loss": 1.0}, subset="train")
    resumed.close()
    run = read_aim_run(aim_repo, tracker.run_hash)
    assert _steps_values(run, "loss", {"subset": "train"}) == [(1, 2.0), (2, 1.5), (3, 1.0)]


def test_aim_unknown_run_hash_starts_a_new_run(aim_repo: Path, capsys: pytest.CaptureFixture) -> None:
    tracker = AimTracker(aim_repo, "tests", run_hash="0123456789abcdef01234567")
    tracker.close()
    assert tracker.run_hash != "0123456789abcdef01234567"
    assert "starting a new Aim run" in capsys.readouterr().err


def test_aim_process_exits_promptly_after_close(aim_repo: Path) -> None:
    code = (
        "import sys; from rundir.tracking import AimTracker\n"
        "t = AimTracker(sys.argv[1], 'tests'); t.log_scalars(1, {'loss': 1.0}, subset='train'); t.close()\n"
        "print(t.run_hash)\n"
    )
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code, str(aim_repo)], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert time.perf_counter() - start < 30
    assert _steps_values(read_aim_run(aim_repo, done.stdout.strip()), "loss", {"subset": "train"}) == [(1, 1.0)]


def test_build_tracker(tmp_path: Path, aim_repo: Path) -> None:
    local = build_tracker(tmp_path, config=CONFIG, extra=EXTRA, aim_logging=False, aim_repo=aim_repo, experiment="tests")
    assert [type(t) for t in local.trackers] == [TensorBoardTracker, JsonlTracker] and local.run_hash is None
    local.close()
    both = build_tracker(tmp_path / "run", config=CONFIG, extra=EXTRA, aim_logging=True, aim_repo=aim_repo, experiment="tests")
    assert isinstance(both, MultiTracker) and both.run_hash
    both.log_scalars(1, {"loss": 3.0}, subset="train")
    both.close()
    assert read_aim_run(aim_repo, both.run_hash)["hparams"]["git_commit"] == "abc123"
    assert _event_accumulator(tmp_path / "run" / "logs" / "tensorboard").Tags()["scalars"] == ["loss/train"]


class _Failing(Tracker):
    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True
        raise RuntimeError("disk full")


class _Recording(Tracker):
    def __init__(self) -> None:
        self.calls: list[str] = []

    def log_scalars(self, step: int, scalars: dict[str, float], subset: str | None = None) -> None:
        self.calls.append(f"{step}:{subset}:{sorted(scalars)}")

    def close(self) -> None:
        self.calls.append("close")


def test_multi_tracker_fans_out_and_closes_all() -> None:
    first, second, failing = _Recording(), _Recording(), _Failing()
    multi = MultiTracker([first, failing, second])
    multi.log_scalars(5, {"loss": 1.0}, subset="val")
    with pytest.raises(RuntimeError, match="disk full"):
        multi.close()
    assert first.calls == second.calls == ["5:val:['loss']", "close"] and failing.closed


STARTS_AIM_RUN = """
import os, sys, time
sys.path.insert(0, {repo!r})
from rundir.tracking import AimTracker
print("imported", flush=True)
while not os.path.exists({go!r}):  # every process starts its run at (nearly) the same instant
    time.sleep(0.005)
tracker = AimTracker({repo_dir!r}, "race")
tracker.log_scalars(1, {{"loss": 1.0}})
print(tracker.run_hash)
tracker.close()
"""


@pytest.mark.slow
def test_runs_starting_at_once_in_a_new_aim_repo_all_start(tmp_path: Path) -> None:
    """3 of 4 such runs died in Aim's set-up of .aim/ before it was done under a lock."""
    from conftest import REPO
    go = tmp_path / "go"
    code = STARTS_AIM_RUN.format(repo=str(REPO), go=str(go), repo_dir=str(tmp_path / "aim"))
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    for proc in procs:  # past their imports
        assert proc.stdout.readline().strip() == "imported"
    go.touch()
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], [err for _, err in outputs]
    hashes = {out.strip() for out, _ in outputs}  # what each printed after "imported"
    assert len(hashes) == 4
    for run_hash in hashes:
        assert read_aim_run(tmp_path / "aim", run_hash).get_metric("loss", Context({})) is not None


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_jsonl_tracker_writes_a_flushed_line_per_call(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "metrics.jsonl"
    tracker = JsonlTracker(path, tokens_per_step=64, clock=lambda: 1.5)
    tracker.log_scalars(10, {"loss": 2.5}, subset="train")
    assert _lines(path) == [{"step": 10, "tokens_seen": 640, "wall_time": 1.5, "loss/train": 2.5}]  # before close
    tracker.log_scalars(10, {"lr": 1e-3, "grad_norm": 0.5})
    tracker.close()
    assert _lines(path)[1] == {"step": 10, "tokens_seen": 640, "wall_time": 1.5, "lr": 1e-3, "grad_norm": 0.5}


def test_jsonl_tracker_on_resume_drops_the_lines_after_the_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    first = JsonlTracker(path, tokens_per_step=1, clock=lambda: 0.0)
    for step in (5, 10, 15):
        first.log_scalars(step, {"loss": float(step)})
    first.close()
    with path.open("a") as f:
        f.write('{"step": 16, "los')  # a kill mid-line
    resumed = JsonlTracker(path, tokens_per_step=1, clock=lambda: 0.0, purge_step=11)  # checkpoint at step 10
    resumed.log_scalars(15, {"loss": -1.0})
    resumed.close()
    assert [(line["step"], line["loss"]) for line in _lines(path)] == [(5, 5.0), (10, 10.0), (15, -1.0)]
