"""lm-evaluation-harness task files for local benchmark files, so lm-eval scores exactly the items
evaluate.py scores: its own hellaswag, arc, piqa and lambada_openai templates, with `dataset_path: json`.

    python benchmarks/lm_eval_tasks.py my_tasks hellaswag=hellaswag_val.jsonl lambada=lambada_test.jsonl
    python -m lm_eval --model hf --model_args pretrained=runs/<id>/artifacts/export/hf,dtype=float32 \\
        --tasks gptlab_hellaswag,gptlab_lambada --include_path my_tasks --device cpu

    from lm_eval_tasks import write_tasks, run_lm_eval
    tasks = write_tasks(task_dir, {"hellaswag": "hs.jsonl", "piqa": "piqa.jsonl"})   # {format: file}
    results = run_lm_eval(hf_dir, task_dir, tasks, out_dir)   # {task: {"acc": ..., ...}}, per-item log-likelihoods

Used by tests/evaluation/test_lm_eval.py and benchmarks/benchmark_throughput.py. Nothing is downloaded:
the tasks read the local files; HF_DATASETS_OFFLINE and HF_HUB_OFFLINE are set for lm-eval.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

# Each format's lm-eval config, as lm-eval 0.4.13's own task YAMLs spell it (tasks/hellaswag, arc, piqa,
# lambada); generic is the same multiple choice with the text as it is.
TEMPLATES = {
    "hellaswag": {"process_docs": "!function utils.process_docs", "doc_to_text": "{{query}}",
                  "doc_to_target": "{{label}}", "doc_to_choice": "choices"},
    "arc": {"doc_to_text": "Question: {{question}}\nAnswer:", "doc_to_target": "{{choices.label.index(answerKey)}}",
            "doc_to_choice": "{{choices.text}}"},
    "piqa": {"doc_to_text": "Question: {{goal}}\nAnswer:", "doc_to_target": "label",
             "doc_to_choice": "{{[sol1, sol2]}}"},
    "generic": {"doc_to_text": "{{context}}", "doc_to_target": "{{label}}", "doc_to_choice": "{{choices}}"},
    "lambada": {"doc_to_text": "{{text.split(' ')[:-1]|join(' ')}}", "doc_to_target": "{{' '+text.split(' ')[-1]}}"},
}
MC_METRICS = ("acc", "acc_norm", "acc_bytes")


def write_tasks(task_dir: Path, files: dict[str, str | Path]) -> list[str]:
    """One YAML per format (gptlab_<format>) reading its local file; returns the task names."""
    task_dir.mkdir(parents=True, exist_ok=True)
    (task_dir / "utils.py").write_text("from lm_eval.tasks.hellaswag.utils import process_docs  # noqa: F401\n")
    names = []
    for fmt, path in files.items():
        name = f"gptlab_{fmt}"
        lastword = fmt == "lambada"
        lines = [f"task: {name}", "dataset_path: json", "dataset_kwargs:", "  data_files:",
                 f"    test: {json.dumps(str(Path(path).resolve()))}", "test_split: test",
                 f"output_type: {'loglikelihood' if lastword else 'multiple_choice'}"]
        for key, value in TEMPLATES[fmt].items():
            lines.append(f"{key}: {value}" if value.startswith("!function") else f"{key}: {json.dumps(value)}")
        metrics = ("perplexity", "acc") if lastword else MC_METRICS
        lines.append("metric_list:")
        for m in metrics:
            agg = "perplexity" if m == "perplexity" else "mean"
            lines += [f"  - metric: {m}", f"    aggregation: {agg}", f"    higher_is_better: {str(m != 'perplexity').lower()}"]
        (task_dir / f"{name}.yaml").write_text("\n".join(lines) + "\n")
        names.append(name)
    return names


def run_lm_eval(hf_dir: Path | None, task_dir: Path, tasks: list[str], out_dir: Path, batch_size: int = 1,
                extra_model_args: str = "", timeout: float = 900, server: str = "") -> dict:
    """lm-eval on the tasks, in a subprocess: {task: {metric: value, "lls": [[ll per choice] per item],
    "seconds": the run's wall time}}. Its hf model reads hf_dir; or, with server ("http://host:port/v1
    model-id"), its local-completions model asks serve.py, tokenizing through the server's /tokenize.
    The char export without end-of-text declares no prefix token, which lm-eval needs: extra_model_args
    passes it (",prefix_token_id=0")."""
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_DATASETS_CACHE": str(out_dir / "hf_datasets_cache")}
    model, model_args = "hf", f"pretrained={hf_dir},dtype=float32"
    if server:
        base_url, model_id = server.split()
        model = "local-completions"
        model_args = f"model={model_id},base_url={base_url}/completions,tokenizer_backend=remote,max_retries=1"
    cmd = [sys.executable, "-m", "lm_eval", "--model", model,
           "--model_args", model_args + extra_model_args, "--tasks", ",".join(tasks),
           "--include_path", str(task_dir), "--device", "cpu", "--batch_size", str(batch_size),
           "--output_path", str(out_dir), "--log_samples"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    seconds = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"lm-eval failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    (results_file,) = sorted(out_dir.rglob("results_*.json"))[-1:]
    results = json.loads(results_file.read_text())["results"]
    out = {}
    for task in tasks:
        metrics = {k.split(",")[0]: v for k, v in results[task].items() if k.endswith(",none")}
        (samples,) = sorted(out_dir.rglob(f"samples_{task}_*.jsonl"))[-1:]
        docs = sorted((json.loads(line) for line in samples.read_text().splitlines()), key=lambda d: d["doc_id"])
        metrics["lls"] = [[float(r[0][0]) if isinstance(r[0], list) else float(r[0]) for r in d["filtered_resps"]]
                          for d in docs]
        metrics["seconds"] = seconds
        out[task] = metrics
    return out


def main(argv: list[str]) -> None:
    """python benchmarks/lm_eval_tasks.py DIR FORMAT=FILE ...: write the tasks, print their names."""
    if len(argv) < 2 or not all("=" in a and a.split("=")[0] in TEMPLATES for a in argv[1:]):
        sys.exit(f"usage: python benchmarks/lm_eval_tasks.py DIR FORMAT=FILE ... (FORMAT: {', '.join(TEMPLATES)})")
    print(",".join(write_tasks(Path(argv[0]), dict(a.split("=", 1) for a in argv[1:]))))


if __name__ == "__main__":
    main(sys.argv[1:])
