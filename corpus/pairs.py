"""Prompt/response pairs for fine-tuning: read, split, encode, and pack into rows with a loss mask.

    pairs = read_pairs("pairs.jsonl")              # {"prompt": ..., "response": ...} (or "truth") per line
    splits = split_pairs(pairs, val_fraction=0.1)  # held-out prompts: a hash of the prompt picks val
    examples = encode_pairs(splits["train"], tokenizer)
    rows = pack(examples, block_size=64, eot_id=tokenizer.eot_id, loss_on_prompt=False)
    rows.x, rows.y                                 # (N, block_size) inputs and targets; -1 = not trained on

An example is prompt + response + end-of-text. Its targets are the response's tokens and the
end-of-text id (the model learns to answer and to stop), plus, with loss_on_prompt, the prompt's
tokens after its first. Examples are packed whole, in file order, into rows of block_size + 1 tokens
(or one per row with pack=False); the rest of a row is padding that no target reads. An example
longer than a row is cut to it, so its response loses its end (the caller reports how many).

Prompt and response are encoded apart and joined, as inference.py sees them: the prompt encoded
alone, then the model's continuation. Nothing here imports torch or prints.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from corpus.split import held_out, position, record_digest

if TYPE_CHECKING:
    from tokenizer import Tokenizer

RESPONSE_KEYS = ("response", "truth")


@dataclass(frozen=True)
class Pair:
    prompt: str
    response: str
    line: int  # 1-based line in its file, for errors


@dataclass(frozen=True)
class Example:
    """One pair's token ids, and the line it came from."""
    prompt: np.ndarray
    response: np.ndarray
    line: int


@dataclass(frozen=True)
class PackedRows:
    """A split of pairs as training reads it: inputs x and targets y, (N, block_size) int64 each, y = -1
    where nothing is trained (prompt, padding); n_targets counts each row's trained targets, and lengths
    its positions before the padding (a batch needs only its longest row's: causal attention never lets
    padding after a position change it)."""
    x: np.ndarray
    y: np.ndarray
    n_targets: np.ndarray
    lengths: np.ndarray
    examples: list[Example] = field(repr=False)
    truncated: int = 0  # examples cut to a row
    dropped: int = 0    # examples cut so short that no target was left

    def __len__(self) -> int:
        return len(self.x)

    @property
    def total_targets(self) -> int:
        return int(self.n_targets.sum())


def looks_like_pairs(path: Path) -> bool:
    """A .jsonl file whose first line is an object with a "prompt": prompt/response pairs, not documents."""
    if not path.is_file() or path.suffix != ".jsonl":
        return False
    with open(path, "rb") as f:
        first = f.readline(1 << 20)
    try:
        record = json.loads(first)
    except ValueError:
        return False
    return isinstance(record, dict) and "prompt" in record


def read_pairs(path: str | Path, data: bytes | None = None) -> list[Pair]:
    """Every line of a .jsonl file (its bytes, when the caller has read them) as a Pair; a line that is
    not one is a ValueError naming it."""
    path = Path(path)
    data = path.read_bytes() if data is None else data
    pairs = [_pair(raw, n, path) for n, raw in enumerate(data.split(b"\n"), 1) if raw.strip()]
    if not pairs:
        raise ValueError(f"'{path}' holds no prompt/response pairs; write one JSON object per line, e.g. "
                         '{"prompt": "reverse: cat\\n", "response": "tac"}')
    return pairs


def _pair(raw: bytes, n: int, path: Path) -> Pair:
    where = f"'{path}' line {n}"
    try:
        record = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{where} is not valid UTF-8 (byte {e.start}); convert the file to UTF-8") from None
    except ValueError as e:
        raise ValueError(f"{where} is not JSON ({e}); write one object per line") from None
    if not isinstance(record, dict):
        raise ValueError(f"{where} is a JSON {type(record).__name__}, not an object with prompt and response")
    keys = [k for k in RESPONSE_KEYS if k in record]
    for missing, present in (('"prompt"', "prompt" in record), ('"response" (or "truth")', bool(keys))):
        if not present:
            raise ValueError(f"{where} has no {missing}; every line needs \"prompt\" and \"response\" (or \"truth\")")
    prompt, response = record["prompt"], record[keys[0]]
    for name, value in (("prompt", prompt), (keys[0], response)):
        if not isinstance(value, str):
            raise ValueError(f"{where}: {name} is a {type(value).__name__}, not a string")
    if not prompt:
        raise ValueError(f"{where}: the prompt is empty; every example needs a prompt to answer")
    return Pair(prompt, response, n)


def prompt_digest(prompt: str) -> bytes:
    return record_digest(prompt.encode("utf-8", "surrogatepass"))


def is_val(prompt: str, val_fraction: float) -> bool:
    """Held out by the split rule (corpus/split.py), read on the prompt: the same prompt is always on the
    same side, so val prompts are never trained on."""
    return held_out(prompt_digest(prompt), val_fraction)


def split_pairs(pairs: Sequence[Pair], val_fraction: float) -> dict[str, list[Pair]]:
    """{"train", "val"} by is_val. Too few prompts for the hash to put one on each side: the prompt whose
    hash is nearest the other side moves there, with every pair that has it, so a prompt is never on both."""
    if len(pairs) < 2:
        raise ValueError(f"{len(pairs)} pair: training needs at least 2 (one to train on, one to validate)")
    prompts = sorted({pair.prompt for pair in pairs}, key=lambda p: position(prompt_digest(p)))
    if len(prompts) < 2:
        raise ValueError(f"all {len(pairs):,} pairs have the same prompt, so none can be held out without training "
                         "on it too; a held-out split needs at least 2 different prompts")
    held = {prompt for prompt in prompts if is_val(prompt, val_fraction)}
    if not held:
        held = {prompts[0]}
    elif len(held) == len(prompts):
        held.discard(prompts[-1])
    return {"train": [pair for pair in pairs if pair.prompt not in held],
            "val": [pair for pair in pairs if pair.prompt in held]}


def encode_pairs(pairs: Sequence[Pair], tokenizer: Tokenizer, path: str | Path = "") -> list[Example]:
    """Prompt and response ids of every pair; text the tokenizer cannot encode is a ValueError naming the
    line (and, for char, the characters)."""
    examples = []
    for pair in pairs:
        try:
            prompt = tokenizer.encode_ordinary_array(pair.prompt)
            response = tokenizer.encode_ordinary_array(pair.response)
        except ValueError as e:
            raise ValueError(f"'{path}' line {pair.line}: {e}") from None
        examples.append(Example(prompt.astype(np.int64), response.astype(np.int64), pair.line))
    return examples


def example_tokens(example: Example, eot_id: int, loss_on_prompt: bool) -> tuple[np.ndarray, np.ndarray]:
    """(ids, trained): prompt + response + end-of-text, and which of them are targets: the response and
    the end-of-text, plus the prompt after its first token with loss_on_prompt."""
    ids = np.concatenate([example.prompt, example.response, [eot_id]])
    trained = np.zeros(len(ids), dtype=bool)
    trained[1 if loss_on_prompt else len(example.prompt):] = True
    trained[0] = False  # a sequence's first token has nothing before it to predict it from
    return ids, trained


def pack(examples: Sequence[Example], block_size: int, eot_id: int, loss_on_prompt: bool = False,
         pack_rows: bool = False) -> PackedRows:
    """Rows of block_size + 1 tokens, each holding whole examples in order (one each without pack_rows),
    padded with end-of-text ids that no target reads. x = row[:-1]; y = row[1:] where trained, else -1."""
    width = block_size + 1
    rows: list[tuple[list, list]] = []
    tokens, trained, used = [], [], 0
    truncated = dropped = 0
    for example in examples:
        ids, mask = example_tokens(example, eot_id, loss_on_prompt)
        if len(ids) > width:
            ids, mask = ids[:width], mask[:width]
            truncated += 1
            if not mask.any():
                dropped += 1
                continue
        if used and (not pack_rows or used + len(ids) > width):
            rows.append((tokens, trained))
            tokens, trained, used = [], [], 0
        tokens.append(ids)
        trained.append(mask)
        used += len(ids)
    if used:
        rows.append((tokens, trained))
    if not rows:
        raise ValueError(f"no example has a target within block_size + 1 = {width} tokens; raise block_size")
    ids = np.full((len(rows), width), eot_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=bool)
    lengths = np.zeros(len(rows), dtype=np.int64)
    for r, (row_tokens, row_trained) in enumerate(rows):
        joined = np.concatenate(row_tokens)
        ids[r, :len(joined)] = joined
        mask[r, :len(joined)] = np.concatenate(row_trained)
        lengths[r] = len(joined) - 1  # input positions: the last token is only a target
    y = np.where(mask[:, 1:], ids[:, 1:], -1)
    return PackedRows(ids[:, :-1].copy(), y, mask[:, 1:].sum(axis=1), lengths, list(examples), truncated, dropped)


def trained_text_bytes(pairs: Sequence[Pair], loss_on_prompt: bool) -> int:
    """UTF-8 bytes of the text the targets encode (bits per byte's denominator): the responses, and with
    loss_on_prompt the prompts (their first token, never a target, included: a slight undercount of bpb)."""
    texts = (pair.prompt + pair.response if loss_on_prompt else pair.response for pair in pairs)
    return sum(len(text.encode("utf-8", "surrogatepass")) for text in texts)


def with_end_of_text(tokenizer: Tokenizer, notes: list[str]) -> Tokenizer:
    """A char tokenizer without an end-of-text id, with one (id len(chars)), so a response can end; notes
    say so. The model gains the row (model.grow_vocab). Other tokenizers always have one."""
    from tokenizer import CharTokenizer

    if not isinstance(tokenizer, CharTokenizer):
        raise ValueError(f"the {tokenizer.name} tokenizer has no end-of-text id to end a response with; fine-tune "
                         "on pairs with a char, gpt2 or bpe model")
    grown = CharTokenizer(tokenizer.chars, end_of_text=True)
    notes.append(f"the model's char vocabulary has no end-of-text id: added id {grown.eot_id}, so a response can "
                 "end (its embedding starts as the mean of the others)")
    return grown
