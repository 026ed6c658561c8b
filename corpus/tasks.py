"""Small tasks of prompt/response pairs that the repo generates itself: data to fine-tune on and to score
exact match with, offline and the same on every machine.

    python train.py --init-from runs/<id> --data reverse_words    # data.py writes data/tasks/reverse_words.jsonl
    head -2 data/tasks/reverse_words.jsonl                         # {"prompt": "reverse: yzaznr\\n", "response": "rnzazy"}

Each task draws its pairs from numpy's PCG64 with a fixed seed, so the file is byte-identical
everywhere (a copy that differs, e.g. from an older corpus/tasks.py, is written again). Prompts never repeat,
so the held-out split (a hash of the prompt, corpus/split.py) holds prompts that training never saw. Every
character is one tiny shakespeare has, so a char model pretrained on it can be fine-tuned on any task
here. Add a task: a function (rng) -> (prompt, response) and a TASKS entry.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np


SEED = 1234


def _word(rng: np.random.Generator, shortest: int, longest: int) -> str:
    """shortest to longest random lowercase letters."""
    letters = rng.integers(ord("a"), ord("z") + 1, size=int(rng.integers(shortest, longest + 1)), dtype=np.uint8)
    return letters.tobytes().decode("ascii")


def reverse_word(rng: np.random.Generator) -> tuple[str, str]:
    """A random lowercase word of 3 to 6 letters, and its letters in reverse order."""
    word = _word(rng, 3, 6)
    return f"reverse: {word}\n", word[::-1]


def sort_words(rng: np.random.Generator) -> tuple[str, str]:
    """Three random lowercase words of 2 to 4 letters, and the same words in alphabetical order."""
    words = [_word(rng, 2, 4) for _ in range(3)]
    return f"sort: {' '.join(words)}\n", " ".join(sorted(words))


@dataclass(frozen=True)
class Task:
    make: Callable[[np.random.Generator], tuple[str, str]]
    n_pairs: int


TASKS = {
    "reverse_words": Task(reverse_word, 20_000),
    "sort_words": Task(sort_words, 20_000),
}


def task_path(name: str, data_dir: str | Path) -> Path:
    return Path(data_dir) / "tasks" / f"{name}.jsonl"


def generate(name: str) -> list[tuple[str, str]]:
    """The task's pairs, in order: n_pairs distinct prompts."""
    task, rng = TASKS[name], np.random.default_rng(SEED)
    pairs: dict[str, str] = {}
    while len(pairs) < task.n_pairs:
        prompt, response = task.make(rng)
        pairs.setdefault(prompt, response)
    return list(pairs.items())


def task_bytes(name: str) -> bytes:
    """The task's .jsonl file: one {"prompt", "response"} object per line."""
    return "".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in generate(name)).encode("utf-8")
