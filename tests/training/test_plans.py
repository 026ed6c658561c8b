"""Plans (train.py --plan): stages chained through their exports, the plan directory's record, checks of the
whole file before any stage trains, and Ctrl-C then --resume continuing the stage that was running."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import yaml

import train
from conftest import REPO, call_main, resume_target, run_cli, start_cli, user_error, wait_for_line, write_pairs
from training.plans import load_plan

NEVER = 100_000


def write_plan(path: Path, corpus: Path, pairs: Path, finetune_iters: int = 20) -> Path:
    plan = {"name": "chain", "config": "debug", "settings": {"sample_length": 0, "histogram_interval": 0},
            "stages": [{"name": "pretrain", "data": str(corpus), "max_iters": 20},
                       {"name": "finetune", "data": str(pairs), "max_iters": finetune_iters, "eval_interval": 10,
                        "log_interval": 1, "checkpoint_interval": 5},
                       {"name": "score", "evaluate": {"data": str(pairs), "split": "val"}}]}
    path.write_text(yaml.safe_dump(plan, sort_keys=False), encoding="utf-8")
    return path


def flags(tmp_path: Path) -> list[str]:
    return ["--runs-dir", str(tmp_path / "runs"), "--data-dir", str(tmp_path / "data"), "--device", "cpu"]


def plan_dir(tmp_path: Path) -> Path:
    (root,) = (tmp_path / "runs" / "plans").iterdir()
    return root


def test_a_plan_chains_its_stages_and_records_them(tmp_path, tiny_corpus, pairs_file):
    plan = write_plan(tmp_path / "chain.yaml", tiny_corpus, pairs_file)
    res = call_main(train.main, "--plan", str(plan), *flags(tmp_path))
    assert res.returncode == 0, res.stderr
    root = plan_dir(tmp_path)
    state = json.loads((root / "state.json").read_text())
    assert [(s["name"], s["kind"], s["state"]) for s in state["stages"]] == [
        ("pretrain", "train", "completed"), ("finetune", "train", "completed"), ("score", "evaluate", "completed")]
    pretrain, finetune = (Path(s["run"]) for s in state["stages"][:2])
    assert pretrain.name.endswith("_chain-pretrain") and finetune.name.endswith("_chain-finetune")
    assert state["stages"][2]["run"] == str(finetune)  # the evaluation scores the last trained stage
    status = json.loads((finetune / "meta" / "status.json").read_text())
    assert status["init_from"].startswith(str(pretrain))  # initialised from the stage before
    config = json.loads((finetune / "meta" / "full_config.json").read_text())
    assert config["data"] == str(pairs_file) and config["max_iters"] == 20 and config["run_tag"] == "chain-finetune"
    assert (root / "plan.yaml").read_text() == plan.read_text()
    assert list((finetune / "evals").glob("*_pairs.json")) and "exact_match" in state["stages"][2]["results"]
    assert "finetune       completed" in res.stdout  # the summary


@pytest.mark.parametrize("change,fragments", [
    ({"stages": [{"name": "a", "n_layr": 2}]}, ("stage 'a'", "n_layr", "n_layer")),
    ({"stages": [{"name": "a"}, {"name": "a"}]}, ("stage names must differ", "'a'")),
    ({"stages": [{"name": "a", "evaluate": {"data": "x"}}]}, ("the first stage must train",)),
    ({"stages": [{"name": "a"}, {"name": "e", "evaluate": {"data": "x", "splt": "val"}}]}, ("evaluate option splt",)),
    ({"stages": [{"name": "a"}, {"name": "b", "warmup_iters": 50, "max_iters": 10}]}, ("warmup_iters",)),
    ({"stages": [], "extra": 1}, ("unknown key 'extra'",)),
])
def test_a_bad_plan_is_refused_before_anything_trains(tmp_path, change, fragments):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"config": "debug", **change}), encoding="utf-8")
    with user_error(*fragments):
        call_main(train.main, "--plan", str(path), *flags(tmp_path))
    assert not (tmp_path / "runs").exists()


def test_a_missing_plan_names_the_shipped_ones(tmp_path):
    with user_error("plan file", "does not exist", "plans/reverse_words.yaml", kind=FileNotFoundError):
        call_main(train.main, "--plan", str(tmp_path / "nope.yaml"), *flags(tmp_path))


@pytest.mark.slow
def test_ctrl_c_then_resume_continues_the_running_stage(tmp_path, tiny_corpus):
    pairs = write_pairs(tmp_path / "pairs.jsonl", 200)
    plan = write_plan(tmp_path / "chain.yaml", tiny_corpus, pairs, finetune_iters=NEVER)
    proc = start_cli("train.py", "--plan", str(plan), *flags(tmp_path))
    wait_for_line(proc, "stage 2/3")
    out = "".join(wait_for_line(proc, f" 12/{NEVER} "))
    proc.send_signal(signal.SIGINT)
    out += proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, out
    root = plan_dir(tmp_path)
    assert f"continue with: python train.py --resume {root}" in out and out.count("continue with") == 1, out
    stages = json.loads((root / "state.json").read_text())["stages"]
    assert [s["state"] for s in stages] == ["completed", "interrupted", "pending"]
    interrupted_run = stages[1]["run"]
    target = resume_target(out, 20)
    res = call_main(train.main, "--resume", str(root), "--max-iters", str(target))
    assert res.returncode == 0, res.stderr
    assert "resumed from step_" in res.stdout and "stage 1/3" not in res.stdout  # pretrain is not run again
    stages = json.loads((root / "state.json").read_text())["stages"]
    assert [s["state"] for s in stages] == ["completed"] * 3
    assert stages[1]["run"] == interrupted_run and stages[1]["results"]["iteration"] == target
    assert len(list((tmp_path / "runs").glob("*_chain-finetune"))) == 1  # the same run, continued


@pytest.mark.parametrize("path", sorted((REPO / "plans").glob("*.yaml")), ids=lambda p: p.name)
def test_the_shipped_plans_run_end_to_end_in_miniature(path, tmp_path):
    """Every stage of the shipped plan, shortened by flags (which apply to every stage): offline, so
    shakespeare falls back to pydoc, whose characters hold the task's too."""
    spec = load_plan(path)
    assert [s.evaluate is None for s in spec.stages][:2] == [True, True]
    res = call_main(train.main, "--plan", str(path), *flags(tmp_path), "--max-iters", "4", "--eval-interval", "2",
                    "--warmup-iters", "0", "--eval-iters", "1", "--sample-length", "0", "--n-layer", "1",
                    "--n-embd", "16", "--n-head", "2")
    assert res.returncode == 0, res.stderr
    state = json.loads((plan_dir(tmp_path) / "state.json").read_text())
    assert all(s["state"] == "completed" for s in state["stages"])


def test_a_plan_under_torchrun_is_refused_before_its_directory_exists(tmp_path, tiny_corpus, pairs_file):
    from config import load_config
    from utils.distributed import Dist

    argv = ["--plan", str(write_plan(tmp_path / "chain.yaml", tiny_corpus, pairs_file)), *flags(tmp_path)]
    with user_error("a plan runs in one process"):
        train.open_plan(load_config(argv), argv, Dist(rank=0, world_size=2))
    assert not (tmp_path / "runs").exists()


@pytest.fixture
def finished_plan(tmp_path, tiny_corpus, pairs_file) -> Path:
    """A plan run to the end, then set back as if its fine-tuning stage had been interrupted."""
    plan = write_plan(tmp_path / "chain.yaml", tiny_corpus, pairs_file)
    assert call_main(train.main, "--plan", str(plan), *flags(tmp_path)).returncode == 0
    root = plan_dir(tmp_path)
    state = json.loads((root / "state.json").read_text())
    for entry in state["stages"][1:]:
        entry["state"] = "interrupted" if entry["kind"] == "train" else "pending"
    (root / "state.json").write_text(json.dumps(state))
    status_path = Path(state["stages"][1]["run"]) / "meta" / "status.json"
    status_path.write_text(json.dumps({**json.loads(status_path.read_text()), "state": "interrupted"}))
    return root


def test_a_refused_flag_on_resume_is_one_line_and_never_sticks_to_the_plan(finished_plan):
    before = (finished_plan / "state.json").read_text()
    res = run_cli("train.py", "--resume", str(finished_plan), "--n-layer", "4")
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert res.stderr.startswith("error: --n-layer cannot change when resuming")
    assert f"(plan stopped in stage finetune; continue with: python train.py --resume {finished_plan})" in res.stderr
    assert json.loads((finished_plan / "state.json").read_text())["flags"] == json.loads(before)["flags"]
    res = call_main(train.main, "--resume", str(finished_plan))  # the advice works
    assert res.returncode == 0, res.stderr
    stages = json.loads((finished_plan / "state.json").read_text())["stages"]
    assert [s["state"] for s in stages] == ["completed"] * 3


def test_a_plan_runs_in_one_process_at_a_time(finished_plan):
    from rundir.lock import RunLock

    before = (finished_plan / "state.json").read_text()
    with RunLock(finished_plan, what="plan"):
        with user_error(f"plan '{finished_plan}' is in use by pid"):
            call_main(train.main, "--resume", str(finished_plan))
    assert (finished_plan / "state.json").read_text() == before  # the loser wrote nothing


@pytest.mark.parametrize("edit", ["rename", "max_iters", "fewer"])
def test_a_plan_edited_between_resumes_is_refused(finished_plan, edit):
    spec = yaml.safe_load((finished_plan / "plan.yaml").read_text())
    if edit == "rename":
        spec["stages"][1]["name"] = "tune"
    elif edit == "max_iters":
        spec["stages"][1]["max_iters"] = 40
    else:
        spec["stages"] = spec["stages"][:1]
    (finished_plan / "plan.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    with user_error("plan.yaml was edited after the plan started", "python train.py --plan FILE"):
        call_main(train.main, "--resume", str(finished_plan))


def test_a_later_stages_missing_data_is_refused_before_anything_trains(tmp_path, tiny_corpus):
    plan = write_plan(tmp_path / "chain.yaml", tiny_corpus, tmp_path / "missing.jsonl")
    with user_error("plan stage 'finetune': data path", "missing.jsonl' does not exist", kind=FileNotFoundError):
        call_main(train.main, "--plan", str(plan), *flags(tmp_path))
    assert not (tmp_path / "runs").exists()


def test_a_plan_scores_benchmarks_in_its_stages_and_checks_them_up_front(tmp_path, tiny_corpus):
    from conftest import write_benchmarks

    files = write_benchmarks(tmp_path / "files")
    plan = {"name": "bench", "config": "debug", "settings": {"sample_length": 0, "histogram_interval": 0},
            "stages": [{"name": "pretrain", "data": str(tiny_corpus), "max_iters": 10,
                        "eval_tasks": [str(files["generic"])]},
                       {"name": "hellaswag", "evaluate": {"data": str(files["hellaswag"])}},
                       {"name": "lambada", "evaluate": {"data": f"lambada:{files['lambada']}"}}]}
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(plan, sort_keys=False), encoding="utf-8")
    res = call_main(train.main, "--plan", str(path), *flags(tmp_path))
    assert res.returncode == 0, res.stderr
    state = json.loads((plan_dir(tmp_path) / "state.json").read_text())
    assert "acc_norm" in state["stages"][1]["results"] and "perplexity" in state["stages"][2]["results"]
    names = {json.loads(p.read_text())["name"] for p in (Path(state["stages"][0]["run"]) / "evals").glob("*.json")}
    assert names == {"generic_own", "hellaswag_own", "lambada_own"}
    plan["stages"][0]["eval_tasks"] = [str(tmp_path / "gone.jsonl")]
    path.write_text(yaml.safe_dump(plan, sort_keys=False), encoding="utf-8")
    with user_error("plan stage 'pretrain': eval_tasks: benchmark file", "gone.jsonl' does not exist",
                    kind=FileNotFoundError):
        call_main(train.main, "--plan", str(path), "--runs-dir", str(tmp_path / "runs2"), "--device", "cpu")
    assert not (tmp_path / "runs2").exists()
