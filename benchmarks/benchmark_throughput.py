"""Multiple-choice scoring speed: evaluate.py's scorer against lm-evaluation-harness's `hf` model, on the
same export, the same items and the same machine, in one process, alternating rounds.

    python benchmarks/benchmark_throughput.py [--items 200] [--n-layer 6 --n-embd 384] [--batch-size 32]
                                              [--lm-eval-batch-sizes 1,32] [--rounds 2]

Builds a GPT-2-tokenizer model of the given size (random weights: speed does not depend on them) and
exports it with its Hugging Face folder; writes --items HellaSwag-format items whose contexts and endings
are spans of tiny shakespeare (about HellaSwag's lengths: a 200-character context, four 100-character
endings). Times gptlab's read + encode + score of the file, and lm-eval's simple_evaluate on a local task
(benchmarks/lm_eval_tasks.py; model loaded once, outside the timing) at each batch size. Prints items/s
of each, the ratio, and whether acc, acc_norm and acc_bytes are equal. Needs lm-eval (requirements.txt).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from evaluation.benchmarks import read_benchmark  # noqa: E402
from evaluation.likelihood import score_benchmark  # noqa: E402
from lm_eval_tasks import MC_METRICS, write_tasks  # noqa: E402
from model import LanguageModel  # noqa: E402
from parameters import ModelConfig  # noqa: E402
from rundir.export import save_export  # noqa: E402
from tokenizer import Gpt2Tokenizer  # noqa: E402

SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


def write_items(path: Path, n: int, seed: int = 0) -> None:
    text = " ".join(SHAKESPEARE.read_text().split()) if SHAKESPEARE.is_file() else " ".join(
        f"word{i} of line {i % 97}." for i in range(20000))
    rng = random.Random(seed)
    span = lambda k: text[(s := rng.randrange(len(text) - k)):s + k].strip()  # noqa: E731
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"ctx_a": span(160), "ctx_b": span(40), "ctx": "", "activity_label": "Reading",
                                "endings": [span(100) for _ in range(4)], "label": rng.randrange(4)}) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=200)
    p.add_argument("--n-layer", type=int, default=6)
    p.add_argument("--n-embd", type=int, default=384)
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32, help="gptlab's rows per forward")
    p.add_argument("--lm-eval-batch-sizes", default="1,32")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()

    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    tmp = Path(tempfile.mkdtemp(prefix="gptlab_mc_"))
    cfg = ModelConfig(n_layer=args.n_layer, n_head=args.n_embd // 64, n_embd=args.n_embd, block_size=args.block_size,
                      tokenizer="gpt2", device="cpu", dtype="float32").validate()
    torch.manual_seed(0)
    model = LanguageModel(cfg, Gpt2Tokenizer.vocab_size).eval()
    save_export(tmp / "export", model, cfg.to_dict(), Gpt2Tokenizer().to_dict())
    data = tmp / "hellaswag_bench.jsonl"
    write_items(data, args.items)
    tasks = write_tasks(tmp / "tasks", {"hellaswag": data})
    manager = TaskManager(include_path=str(tmp / "tasks"))
    sizes = [int(b) for b in args.lm_eval_batch_sizes.split(",")]
    hf = {b: HFLM(pretrained=str(tmp / "export" / "hf"), dtype="float32", batch_size=b, device="cpu") for b in sizes}
    print(f"model: {model.num_params():,} parameters ({args.n_layer} layers, n_embd {args.n_embd}, gpt2 vocab); "
          f"{args.items} HellaSwag-format items x 4 endings; torch threads {torch.get_num_threads()}")

    times: dict[str, list[float]] = {}
    results: dict[str, dict] = {}
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        bench = read_benchmark(str(data))
        results["gptlab"] = score_benchmark(model, bench, Gpt2Tokenizer(), cfg.block_size, args.batch_size,
                                            torch.device("cpu"))
        times.setdefault("gptlab", []).append(time.perf_counter() - t0)
        for b in sizes:
            t0 = time.perf_counter()
            out = lm_eval.simple_evaluate(model=hf[b], tasks=tasks, task_manager=manager, verbosity="ERROR")
            times.setdefault(f"lm-eval hf, batch {b}", []).append(time.perf_counter() - t0)
            results[f"lm-eval hf, batch {b}"] = {k.split(",")[0]: v for k, v in out["results"][tasks[0]].items()}
    ours = statistics.median(times["gptlab"])
    print(f"{'scorer':<24} {'median s':>9} {'items/s':>9} {'gptlab x':>9}  " + "  ".join(MC_METRICS))
    for name, ts in times.items():
        s = statistics.median(ts)
        print(f"{name:<24} {s:>9.2f} {args.items / s:>9.1f} {s / ours:>9.2f}  "
              + "  ".join(f"{results[name][m]:.4f}" for m in MC_METRICS))
    same = all(results[n][m] == results["gptlab"][m] for n in results for m in MC_METRICS)
    print(f"acc, acc_norm and acc_bytes {'equal' if same else 'DIFFER'} across scorers")


if __name__ == "__main__":
    main()
