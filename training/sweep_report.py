"""What a sweep found: the table of trials (best first), Optuna's plots, the best config as a preset, and
for a scaling series the power law of the objective against compute.

    print(report(sweep))      # also writes plots/*.png, best.yaml and (target_flops sweeps) scaling.json/.png

best.yaml is the best trial's first run's recorded config (meta/full_config.json) without its run tag and
runs directory: `python train.py --config runs/sweeps/<id>/best.yaml` trains that trial again. A scaling
series sweeps target_flops (the compute budget) and model sizes: for each budget the best trial's
objective, fitted as L = a * C^b over the budgets (log-log least squares; Hoffmann et al. 2022's
approach 2 fits the loss-optimal points per budget the same way).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import yaml

from rundir.run_dir import RunDir
from training.study import Sweep
from utils.files import atomic_write_json, atomic_write_text

DROPPED_KEYS = ("run_tag", "runs_dir")


def report(sweep: Sweep) -> str:
    """The table, and where the plots, the best preset and the scaling fit were written."""
    import optuna

    study = sweep.study()
    trials = study.get_trials(deepcopy=False)
    done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    lines = [table(sweep, trials)]
    if done:
        best = study.best_trial
        lines.append(f"best: trial {best.number}, {sweep.spec.objective} {best.value:.4f}")
        if path := write_best(sweep, best):
            lines.append(f"best config: {path} (python train.py --config {path})")
    lines += [f"plot: {p}" for p in write_plots(sweep, study, len(done))]
    if "target_flops" in sweep.spec.space:
        lines.append(write_scaling(sweep, done))
    return "\n".join(lines)


def table(sweep: Sweep, trials: list) -> str:
    """One line per trial: complete ones best first, then pruned, failed and running ones."""
    import optuna

    TS = optuna.trial.TrialState
    sign = 1 if sweep.spec.direction == "minimize" else -1
    order = {TS.COMPLETE: 0, TS.PRUNED: 1, TS.RUNNING: 2, TS.WAITING: 2, TS.FAIL: 3}
    trials = sorted(trials, key=lambda t: (order[t.state], sign * t.value if t.value is not None else 0, t.number))
    names = list(sweep.spec.space)
    header = ["trial", "state", sweep.spec.objective, *names, "run"]
    rows = []
    for t in trials:
        runs = t.user_attrs.get("run_dirs", [])
        value = f"{t.value:.4f}" if t.value is not None else "-"
        if t.state == TS.PRUNED and t.intermediate_values:
            step = max(t.intermediate_values)
            value = f"({t.intermediate_values[step]:.4f} at {step / 10:g}%)"
        rows.append([str(t.number), t.state.name.lower(), value, *(_cell(t.params.get(n)) for n in names),
                     Path(runs[0]).name if runs else "-"])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    done = sum(t.state in (TS.COMPLETE, TS.PRUNED) for t in trials)
    lines = [f"sweep {sweep.dir}: {done} of {sweep.spec.n_trials} trials complete or pruned"]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    return "\n".join(lines)


def _cell(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def write_best(sweep: Sweep, best) -> Path | None:
    runs = best.user_attrs.get("run_dirs", [])
    if not runs:
        return None
    config = {k: v for k, v in RunDir(runs[0]).config().items() if k not in DROPPED_KEYS}
    path = sweep.dir / "best.yaml"
    atomic_write_text(path, f"# trial {best.number} of sweep {sweep.dir.name}: {sweep.spec.objective} "
                            f"{best.value:.4f} ({runs[0]})\n" + yaml.safe_dump(config, sort_keys=False))
    return path


def write_plots(sweep: Sweep, study, complete: int) -> list[Path]:
    """Optimization history once a trial is complete, and with two or more the parameters' slices and
    importances."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as ovm

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message="Attempting to set identical low and high")  # one value swept

    out = sweep.dir / "plots"
    out.mkdir(exist_ok=True)
    plots = [("history", ovm.plot_optimization_history)] if complete else []  # nothing to draw without one
    if complete >= 2:
        plots += [("slice", ovm.plot_slice)]
        if len(sweep.spec.space) >= 2:
            plots += [("importances", ovm.plot_param_importances)]
    written = []
    for name, plot in plots:
        try:
            axes = plot(study)
        except (ValueError, RuntimeError) as e:  # e.g. importances of parameters that never varied
            print(f"note: no {name} plot: {e}")
            continue
        figure = (axes.flat[0] if isinstance(axes, np.ndarray) else axes).figure
        figure.savefig(out / f"{name}.png", dpi=100, bbox_inches="tight")
        plt.close(figure)
        written.append(out / f"{name}.png")
    return written


def write_scaling(sweep: Sweep, done: list) -> str:
    """Per budget the best trial; L = a * C^b fitted over the budgets; scaling.json and scaling.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best: dict[float, tuple[float, int]] = {}
    for t in done:
        c = float(t.params["target_flops"])
        if c not in best or (t.value < best[c][0]) == (sweep.spec.direction == "minimize"):
            best[c] = (t.value, t.number)
    points = sorted((c, v, n) for c, (v, n) in best.items())
    result = {"budgets": [{"target_flops": c, "objective": v, "trial": n} for c, v, n in points]}
    if len(points) >= 2 and all(v > 0 for _, v, _ in points):
        b, log_a = np.polyfit(np.log([c for c, _, _ in points]), np.log([v for _, v, _ in points]), 1)
        law = f"{sweep.spec.objective} = {math.exp(log_a):.4g} * C^{b:.4f}"
        result |= {"a": math.exp(log_a), "b": float(b), "law": law}
    atomic_write_json(sweep.dir / "scaling.json", result)
    figure, ax = plt.subplots(figsize=(6, 4))
    for t in done:
        ax.scatter(t.params["target_flops"], t.value, color="0.7", s=12)
    ax.scatter([c for c, _, _ in points], [v for _, v, _ in points], color="C0", label="best per budget")
    if "b" in result:
        xs = np.geomspace(points[0][0], points[-1][0], 50)
        ax.plot(xs, result["a"] * xs ** result["b"], color="C1", label=result["law"])
    ax.set(xscale="log", yscale="log", xlabel="training FLOPs (target_flops)", ylabel=sweep.spec.objective)
    ax.legend()
    figure.savefig(sweep.dir / "scaling.png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    if "b" not in result:
        return f"scaling: one budget only, no law to fit; {sweep.dir / 'scaling.json'} has it"
    return f"scaling: {result['law']} over {len(points)} budgets ({sweep.dir / 'scaling.json'}, scaling.png)"
