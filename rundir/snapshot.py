"""A stored model (an export, a checkpoint, a Hugging Face folder) before it becomes a LanguageModel,
and the one function that makes it one.

    snapshot = read_export(run_dir)                     # rundir/export.py: weights, tokenizer, config
    corpus = prepare_corpus(cfg, snapshot.tokenizer)    # the data may grow the tokenizer (pairs' end-of-text)
    model = build_model(snapshot, corpus.tokenizer.vocab_size, device)   # built once, at its final size
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from model import LanguageModel, grow_vocab
from parameters import ModelConfig
from tokenizer import Tokenizer


class Snapshot(NamedTuple):
    """A stored model before any LanguageModel exists: its weights (CPU tensors, named as in the model's
    state_dict), tokenizer and config. The data may still grow the tokenizer (an end-of-text id for pairs);
    build_model() then makes the model once, at its final size."""
    weights: dict[str, torch.Tensor]
    tokenizer: Tokenizer
    config: ModelConfig
    where: str  # what the weights are, for errors: "<file> does not fit <what>"


def build_model(snapshot: Snapshot, vocab_size: int | None = None,
                device: torch.device | str = "cpu") -> LanguageModel:
    """The one place a stored model becomes a LanguageModel, in eval mode: built once, at vocab_size (the
    tokenizer's, or a larger one the data asked for: its new rows start as the mean of the others), with
    every weight loaded and none left over."""
    model = LanguageModel(snapshot.config, vocab_size or snapshot.tokenizer.vocab_size)
    load_into(model, snapshot)
    return model.to(device).eval()


def load_into(model: LanguageModel, snapshot: Snapshot) -> None:
    """The snapshot's weights into a model of its architecture, grown to the model's vocabulary; every
    weight of the model loaded (a tied LM head is the token embedding's), none left over."""
    weights = grow_vocab(snapshot.weights, model.vocab_size)
    where = f"{snapshot.where} (vocab {snapshot.tokenizer.vocab_size})"
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as e:  # shapes that are not this config's model
        raise ValueError(f"{where}: {' '.join(str(e).split())[:300]}") from None
    # A tied LM head and token embedding are one tensor, which safetensors stores under either name.
    pair = {"lm_head.weight", "transformer.wte.weight"}
    tied = pair - set(weights) if model.lm_head.weight is model.transformer.wte.weight and pair & set(weights) else set()
    if set(missing) - tied or unexpected:
        raise ValueError(f"{where}: missing {sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]}")
