"""sweep.py: a study of tiny trials end to end (parameters in each run's config, the objective the runs'
own metric, best.yaml reproducing the best trial), pruning, Ctrl-C then --resume, two workers on one
journal, a target_flops scaling series, and one-line errors for bad sweep files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import sweep as sweep_stage
import train
from conftest import REPO, call_main, cli_env, user_error, wait_for_line
from rundir.run_dir import RunDir

pytestmark = pytest.mark.slow


def write_sweep(path: Path, corpus: Path, tmp_path: Path, **changes) -> Path:
    spec = {"name": "tiny", "config": "debug",
            "settings": {"data": str(corpus), "data_dir": str(tmp_path / "data"), "max_iters": 20, "eval_interval": 5,
                         "sample_length": 0, "histogram_interval": 0, "dtype": "float32", "min_lr": 1.0e-8,
                         "device": "cpu"},
            "space": {"learning_rate": {"type": "float", "low": 1.0e-4, "high": 1.0e-2, "log": True}},
            "n_trials": 3, "sampler": "random", "pruner": "none"}
    spec["settings"].update(changes.pop("settings_extra", {}))
    spec.update(changes)
    path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    return path


def study(root: Path):
    import optuna

    from training.study import Sweep

    return Sweep.open(root).study(), optuna.trial.TrialState


def sweep_dir(tmp_path: Path) -> Path:
    (root,) = (tmp_path / "runs" / "sweeps").iterdir()
    return root


def test_a_study_of_tiny_trials_end_to_end(tmp_path: Path, tiny_corpus: Path) -> None:
    path = write_sweep(tmp_path / "s.yaml", tiny_corpus, tmp_path, n_trials=2)
    res = call_main(sweep_stage.main, str(path), "--runs-dir", str(tmp_path / "runs"))
    assert res.returncode == 0, res.stderr
    root = sweep_dir(tmp_path)
    s, TS = study(root)
    trials = s.get_trials()
    assert len(trials) == 2 and all(t.state == TS.COMPLETE for t in trials)
    for t in trials:
        (run,) = [RunDir(p) for p in t.user_attrs["run_dirs"]]
        assert run.config()["learning_rate"] == t.params["learning_rate"]      # the parameters reach the run
        assert t.value == run.status()["val_loss"]                             # the objective is its own metric
        assert run.status()["sweep"] == {"dir": str(root), "trial": t.number}  # and the run points back
        assert run.config()["run_tag"] == f"tiny-t{t.number}"
    assert "2 of 2 trials complete or pruned" in res.stdout and "best: trial" in res.stdout
    assert (root / "plots" / "history.png").is_file() and (root / "plots" / "slice.png").is_file()
    # best.yaml trains the best trial again: the same val loss, exactly (float32)
    again = call_main(train.main, "--config", str(root / "best.yaml"), "--runs-dir", str(tmp_path / "again"))
    assert again.returncode == 0
    (run,) = (tmp_path / "again").iterdir()
    assert RunDir(run).status()["val_loss"] == s.best_value
    import runs as runs_stage
    listed = call_main(runs_stage.main, "--runs-dir", str(tmp_path / "runs"), "list", "--sweep", str(root)).stdout
    assert [line.split()[1] for line in listed.splitlines()[1:]] == ["tiny-t0", "tiny-t1"]  # runs.py knows trials
    shown = call_main(sweep_stage.main, "--show", str(root))
    assert shown.stdout.splitlines()[1].split()[:2] == ["trial", "state"]
    assert shown.stdout.splitlines()[2].split()[0] == str(s.best_trial.number)  # best first


@pytest.mark.parametrize("schedule, pruned_at", [("cosine", 5), ("wsd", 15)])
def test_pruning_stops_a_hopeless_trial_early(tmp_path: Path, tiny_corpus: Path, schedule: str, pruned_at: int) -> None:
    """At the first eval past prune_after (0.2: step 5 of 20); a WSD trial not before its decay (the last 30%:
    step 15), where its loss starts to rank as its end will."""
    path = write_sweep(tmp_path / "s.yaml", tiny_corpus, tmp_path, sampler="tpe", pruner="median", prune_after=0.2,
                       settings_extra={"lr_schedule": schedule, "decay_fraction": 0.3}, enqueue=[{"learning_rate": 1.0e-2}, {"learning_rate": 5.0e-3}, {"learning_rate": 1.0e-7}],
                       space={"learning_rate": {"type": "float", "low": 1.0e-7, "high": 1.0e-2, "log": True}})
    res = call_main(sweep_stage.main, str(path), "--runs-dir", str(tmp_path / "runs"))
    assert res.returncode == 0, res.stderr
    s, TS = study(sweep_dir(tmp_path))
    states = {t.params["learning_rate"]: t.state for t in s.get_trials()}
    assert states == {1.0e-2: TS.COMPLETE, 5.0e-3: TS.COMPLETE, 1.0e-7: TS.PRUNED}
    (pruned,) = [t for t in s.get_trials() if t.state == TS.PRUNED]
    run = RunDir(pruned.user_attrs["run_dirs"][0])
    status = run.status()
    assert status["stop_reason"] == "pruned" and status["iteration"] == pruned_at and run.has_export()
    assert "pruned" in res.stdout


def test_ctrl_c_then_resume_finishes_with_no_trial_lost_or_counted_twice(tmp_path: Path, tiny_corpus: Path) -> None:
    path = write_sweep(tmp_path / "s.yaml", tiny_corpus, tmp_path, n_trials=2)
    spec = yaml.safe_load(path.read_text())
    spec["settings"].update(max_iters=400, eval_interval=100, checkpoint_interval=20, log_interval=1)
    path.write_text(yaml.safe_dump(spec))
    proc = subprocess.Popen([sys.executable, str(REPO / "sweep.py"), str(path), "--runs-dir", str(tmp_path / "runs")],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=cli_env(),
                            start_new_session=True)  # its own process group, as a terminal's job is
    wait_for_line(proc, "trial 0: training")
    root = sweep_dir(tmp_path)
    for _ in range(600):  # until the trial's run has a checkpoint to resume from
        if list((tmp_path / "runs").glob("*_tiny-t0/artifacts/checkpoints/step_*")):
            break
        subprocess.run(["sleep", "0.1"])
    os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C: the sweep and its trial
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, out
    assert f"continue with: python sweep.py --resume {root}" in out
    s, TS = study(root)
    (first,) = s.get_trials()
    assert first.state == TS.FAIL and first.user_attrs["retry"]
    res = call_main(sweep_stage.main, "--resume", str(root))
    assert res.returncode == 0, res.stderr
    s, TS = study(root)
    trials = s.get_trials()
    assert sum(t.state == TS.COMPLETE for t in trials) == 2 and len(trials) == 3  # the retry, and one more
    retry = next(t for t in trials if t.user_attrs.get("retry_of") == 0)
    assert retry.params == first.params
    assert retry.user_attrs["run_dirs"] == first.user_attrs["run_dirs"]  # it resumed the interrupted run
    status = RunDir(retry.user_attrs["run_dirs"][0]).status()
    assert status["state"] == "completed" and status["iteration"] == 400 and "resumed_from" in status


def test_two_workers_on_one_journal_share_the_study(tmp_path: Path, tiny_corpus: Path) -> None:
    path = write_sweep(tmp_path / "s.yaml", tiny_corpus, tmp_path, n_trials=4)
    res = call_main(sweep_stage.main, str(path), "--runs-dir", str(tmp_path / "runs"), "--jobs", "2")
    assert res.returncode == 0, res.stderr
    s, TS = study(sweep_dir(tmp_path))
    trials = s.get_trials()
    assert [t.state for t in trials] == [TS.COMPLETE] * 4  # exactly n_trials, numbered 0..3 once each
    assert sorted(t.number for t in trials) == list(range(4))
    workers = {tuple(t.user_attrs["worker"]) for t in trials}
    assert len(workers) == 2  # both took trials
    assert len({t.params["learning_rate"] for t in trials}) == 4  # and drew different values
    runs = [t.user_attrs["run_dirs"][0] for t in trials]
    assert len(set(runs)) == 4


def test_a_scaling_series_sets_max_iters_from_the_budget_and_fits_a_law(tmp_path: Path, tiny_corpus: Path) -> None:
    path = write_sweep(tmp_path / "s.yaml", tiny_corpus, tmp_path, sampler="grid", pruner="none", n_trials=2,
                       space={"target_flops": {"type": "grid", "values": [2.0e9, 8.0e9]},
                              "n_embd": {"type": "grid", "values": [32]}})
    res = call_main(sweep_stage.main, str(path), "--runs-dir", str(tmp_path / "runs"))
    assert res.returncode == 0, res.stderr
    root = sweep_dir(tmp_path)
    s, TS = study(root)
    for t in s.get_trials():
        run = RunDir(t.user_attrs["run_dirs"][0])
        status, config = run.status(), run.config()
        flops = status["flops_per_token"] * config["batch_size"] * config["block_size"]
        assert config["max_iters"] == int(t.params["target_flops"] // flops)  # the budget bought these steps
    scaling = json.loads((root / "scaling.json").read_text())
    assert [b["target_flops"] for b in scaling["budgets"]] == [2.0e9, 8.0e9] and "b" in scaling
    assert (root / "scaling.png").is_file() and "scaling:" in res.stdout


@pytest.mark.parametrize("change, fragments", [
    ({"sampler": "tpee"}, ("sampler 'tpee'", "did you mean 'tpe'")),
    ({"n_trail": 3}, ("unknown key 'n_trail'", "did you mean 'n_trials'")),
    ({"space": {"learning_rat": {"type": "float", "low": 1e-4, "high": 1e-2}}}, ("learning_rat", "learning_rate")),
    ({"space": {"learning_rate": {"type": "float", "low": 1e-2, "high": 1e-4}}}, ("need low < high",)),
    ({"space": {"n_layer": {"type": "float", "low": 1.0, "high": 4.0}}}, ("space n_layer", "expected an integer")),
    ({"space": {"learning_rate": {"type": "log", "low": 1e-4}}}, ("expected a mapping with type float",)),
    ({"objective": "hellaswag:acc_norm"}, ("objective 'hellaswag:acc_norm'", "eval_tasks")),
    ({"sampler": "grid"}, ("the grid sampler takes grid or categorical parameters only",)),
    ({"space": {"n_head": {"type": "grid", "values": [3]}}}, ("would not train", "not divisible by n_head=3")),
    ({"seeds": 7}, ("seeds must be a list of integers",)),
])
def test_a_bad_sweep_file_is_one_line_before_anything_runs(tmp_path: Path, tiny_corpus: Path, change: dict,
                                                            fragments: tuple[str, ...]) -> None:
    path = write_sweep(tmp_path / "s.yaml", tiny_corpus, tmp_path, **change)
    with user_error(*fragments):
        call_main(sweep_stage.main, str(path), "--runs-dir", str(tmp_path / "runs"))
    assert not (tmp_path / "runs").exists()


def test_a_trial_whose_process_died_is_failed_and_tried_once_more_from_its_checkpoint(tmp_path: Path,
                                                                                    tiny_corpus: Path) -> None:
    path = write_sweep(tmp_path / "s.yaml", tiny_corpus, tmp_path, n_trials=1)
    spec = yaml.safe_load(path.read_text())
    spec["settings"].update(max_iters=400, eval_interval=100, checkpoint_interval=20)
    path.write_text(yaml.safe_dump(spec))
    proc = subprocess.Popen([sys.executable, str(REPO / "sweep.py"), str(path), "--runs-dir", str(tmp_path / "runs")],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=cli_env())
    wait_for_line(proc, "trial 0: training")
    for _ in range(600):
        runs = list((tmp_path / "runs").glob("*_tiny-t0"))
        if runs and list((runs[0] / "artifacts" / "checkpoints").glob("step_*")):
            break
        subprocess.run(["sleep", "0.1"])
    os.kill(RunDir(runs[0]).status()["pid"], signal.SIGKILL)  # the trial's train.py, as the OOM killer would
    out = proc.communicate(timeout=180)[0]
    assert proc.returncode == 0, out
    s, TS = study(sweep_dir(tmp_path))
    first, retry = s.get_trials()
    assert first.state == TS.FAIL and first.user_attrs["failure"] == "train.py exited with -9"
    assert retry.state == TS.COMPLETE and retry.user_attrs["retry_of"] == 0 and retry.params == first.params
    assert retry.user_attrs["run_dirs"] == first.user_attrs["run_dirs"]  # resumed from its checkpoint
    assert "trial 0: died" in out


def test_resume_fails_and_retries_a_trial_whose_worker_was_killed(tmp_path: Path, tiny_corpus: Path) -> None:
    from training.study import Sweep
    from training.sweeps import load_sweep

    sweep = Sweep.create(load_sweep(write_sweep(tmp_path / "s.yaml", tiny_corpus, tmp_path, n_trials=1)), None,
                         str(tmp_path / "runs"))
    s = sweep.study()
    orphan = s.ask()
    orphan.suggest_float("learning_rate", 1.0e-4, 1.0e-2, log=True)
    dead = subprocess.Popen(["true"])
    dead.wait()
    orphan.set_user_attr("worker", [__import__("socket").gethostname(), dead.pid])  # a worker that is gone
    res = call_main(sweep_stage.main, "--resume", str(sweep.dir))
    assert f"trial 0 was left running by a worker that died (pid {dead.pid})" in res.stdout
    s, TS = study(sweep.dir)
    first, retry = s.get_trials()
    assert first.state == TS.FAIL and retry.state == TS.COMPLETE and retry.params == first.params


@pytest.mark.parametrize("path", sorted((REPO / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_the_shipped_sweeps_validate(path: Path) -> None:
    from training.sweeps import load_sweep

    spec = load_sweep(path)
    assert spec.n_trials >= 1 and spec.space


def test_an_rdb_storage_holds_the_study(tmp_path: Path, tiny_corpus: Path) -> None:
    """--storage takes an Optuna RDB URL (sqlite here; PostgreSQL or MySQL across machines)."""
    import optuna

    url = f"sqlite:///{tmp_path / 'study.db'}"
    path = write_sweep(tmp_path / "s.yaml", tiny_corpus, tmp_path, n_trials=1)
    res = call_main(sweep_stage.main, str(path), "--runs-dir", str(tmp_path / "runs"), "--storage", url)
    assert res.returncode == 0, res.stderr
    root = sweep_dir(tmp_path)
    assert not (root / "journal.log").exists()
    (summary,) = optuna.get_all_study_summaries(url)
    assert summary.study_name == root.name and summary.n_trials == 1
    assert "1 of 1 trials complete" in call_main(sweep_stage.main, "--show", str(root)).stdout


def test_a_benchmark_metric_can_be_the_objective(tmp_path: Path, tiny_corpus: Path) -> None:
    from conftest import write_benchmarks

    files = write_benchmarks(tmp_path / "files")
    path = write_sweep(tmp_path / "s.yaml", tiny_corpus, tmp_path, n_trials=1, objective="generic_own:acc_norm",
                       settings_extra={"eval_tasks": [str(files["generic"])]})
    res = call_main(sweep_stage.main, str(path), "--runs-dir", str(tmp_path / "runs"))
    assert res.returncode == 0, res.stderr
    s, TS = study(sweep_dir(tmp_path))
    (trial,) = s.get_trials()
    assert s.direction.name == "MAXIMIZE" and trial.state == TS.COMPLETE
    run = RunDir(trial.user_attrs["run_dirs"][0])
    (record,) = [json.loads(p.read_text()) for p in run.evals.glob("*_generic_own.json")]
    assert trial.value == record["acc_norm"]
    assert trial.intermediate_values[1000] == record["acc_norm"]  # reported at each eval, the last at 100%


def test_a_sweep_whose_trials_all_fail_stops_and_says_so(tmp_path: Path, tiny_corpus: Path) -> None:
    """train.py refuses each trial (a sample prompt outside the vocabulary): after n_trials failures the
    sweep stops with exit 1 instead of asking for trials forever."""
    path = write_sweep(tmp_path / "s.yaml", tiny_corpus, tmp_path, n_trials=2,
                       settings_extra={"sample_prompt": "€", "sample_length": 10})
    res = call_main(sweep_stage.main, str(path), "--runs-dir", str(tmp_path / "runs"))
    assert res.returncode == 1 and "2 trials failed" in res.stdout
    s, TS = study(sweep_dir(tmp_path))
    assert [t.state for t in s.get_trials()] == [TS.FAIL, TS.FAIL]
