"""ModelConfig: every hyperparameter of gptlab in one validated dataclass.

Each field has a default, a type and a one-line help text; config.py builds `--help`, YAML
checking and `--print-config` from these fields, so a knob is declared here and nowhere else.
Cross-field rules live in `ModelConfig.validate()`, which reports every problem at once; a mapping
(a YAML file, a run's recorded config) becomes a config through `ModelConfig.from_dict`, which checks
every key and type. GenerateConfig holds the knobs of inference.py the same way.

The registries map the values of the keys that name a class (arch, tokenizer, optimizer,
lr_schedule) to the classes registered under them. Each knows the module that fills it, imported
on first use; a user's own module joins them through the `imports` key (validate() imports it).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import math
import os
import reprlib
import sys
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """name -> class (or function) for what a user adds by writing one: architectures, tokenizers,
    optimizers, schedules. `key` is the config key whose value names an entry; an unknown name is a
    one-line error listing the registered names and the closest one.

        @ARCHITECTURES.register("mine")
        class MyBlock(Block): ...
    """

    def __init__(self, key: str, home: str) -> None:
        self.key = key
        self.home = home  # the module that registers the built-in entries, imported before the first lookup
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: add the class (or function) under name; a name is taken once."""
        def add(entry: T) -> T:
            if name in self._entries and self._entries[name] is not entry:
                raise ValueError(f"{self.key} '{name}' is already registered ({self._entries[name]!r})")
            self._entries[name] = entry
            return entry
        return add

    def _filled(self) -> dict[str, T]:
        """The entries, once the home module (and with it the built-ins) is imported."""
        importlib.import_module(self.home)
        return self._entries

    def lookup(self, name: str) -> T:
        if name not in self._filled():
            match = difflib.get_close_matches(name, list(self._entries), n=1, cutoff=0.6)
            hint = f" (did you mean '{match[0]}'?)" if match else ""
            raise ValueError(f"{self.key}: '{name}' is not registered{hint}; choose one of {', '.join(self._entries)}")
        return self._entries[name]

    def names(self) -> list[str]:
        return list(self._filled())

    def __contains__(self, name: object) -> bool:
        return name in self._filled()


ARCHITECTURES: Registry = Registry("arch", home="architectures")          # Block classes
TOKENIZERS: Registry = Registry("tokenizer", home="tokenizer")            # Tokenizer classes
OPTIMIZERS: Registry = Registry("optimizer", home="training.optim")       # build(model, cfg, device) functions
SCHEDULES: Registry = Registry("lr_schedule", home="training.optim")      # lr(step, cfg) functions
BENCHMARK_FORMATS: Registry = Registry("benchmark format", home="evaluation.benchmarks")  # BenchmarkFormat entries
REGISTRIES = (ARCHITECTURES, TOKENIZERS, OPTIMIZERS, SCHEDULES)


def import_plugins(modules: list[str]) -> None:
    """Import a user's own modules (the `imports` key), so what they register exists before any registry
    is read: `--arch relu2` from a package of one's own. The working directory counts as a place to find
    them, after everything else on sys.path."""
    if modules and os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ValueError(f"imports: cannot import {name!r} ({type(e).__name__}: {e}); put the module on "
                             "PYTHONPATH, in the working directory, or install it") from None


def knob(default: Any, help: str, choices: tuple | None = None) -> Any:
    """A dataclass field carrying its help text (and allowed values) for the generated CLI."""
    if isinstance(default, list):  # a mutable default: each config gets its own copy
        return field(default_factory=lambda: list(default), metadata={"help": help, "choices": choices})
    return field(default=default, metadata={"help": help, "choices": choices})


# --- checking values against a dataclass's fields (config files, the command line, recorded configs) ---

TRUE_WORDS, FALSE_WORDS = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _types(cls: type) -> dict[str, type]:
    return typing.get_type_hints(cls)


def closest(key: str, valid: typing.Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the nearest valid key, or '' when nothing is close."""
    match = difflib.get_close_matches(key.replace("-", "_"), list(valid), n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


def short(value: Any) -> str:
    """repr() bounded in length and depth: an error message must not render a YAML alias bomb."""
    return _SHORT.repr(value)


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxstring, _SHORT.maxother, _SHORT.maxlong = 2, 4, 4, 60, 60, 40


def coerce(key: str, value: Any, typ: type, source: str) -> Any:
    """Check/convert one value to the field's type; strings from the CLI are parsed."""
    where = f"{source}: {key}"
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in TRUE_WORDS + FALSE_WORDS:
            return value.lower() in TRUE_WORDS
        raise ValueError(f"{where}: expected true or false, got {short(value)}")
    if typ in (int, float):
        accepted = (int,) if typ is int else (int, float)  # an int is a fine float, not the reverse
        if isinstance(value, accepted) and not isinstance(value, bool):
            return typ(value)
        try:  # CLI strings; and YAML 1.1 reads `6e-4` (no dot) as a string, meant as a number
            if isinstance(value, str):
                return typ(value)
        except ValueError:
            pass
        raise ValueError(f"{where}: expected {'an integer' if typ is int else 'a number'}, got {short(value)}")
    if typ is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"{where}: expected a string, got {short(value)} (quote it in YAML)")
    if typing.get_origin(typ) is list:  # a YAML list, or names separated by commas on the command line
        items = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value
        if isinstance(items, (list, tuple)) and all(isinstance(v, str) for v in items):
            return list(items)
        raise ValueError(f"{where}: expected a list of names, got {short(value)}")
    raise AssertionError(f"unsupported field type {typ} for {key}")


def _switches(cls: type) -> set[str]:
    """Fields that take auto/true/false: a bool with a third, measured default."""
    return {f.name for f in dataclasses.fields(cls) if {"true", "false"} <= set(f.metadata.get("choices") or ())}


def switch_word(value: Any) -> Any:
    """'true' or 'false' for any spelling of a bool (YAML true, yes, on, 1); other values unchanged."""
    word = str(value).lower()
    return "true" if word in TRUE_WORDS else "false" if word in FALSE_WORDS else value


def check_values(cls: type, data: dict[str, Any], source: str) -> dict[str, Any]:
    """Type-check a mapping against the dataclass; unknown keys name the closest valid one."""
    types, switches = _types(cls), _switches(cls)
    out = {}
    for key, value in data.items():
        key = str(key)
        if key not in types:
            raise ValueError(f"{source}: unknown key '{key}'{closest(key, types)}")
        out[key] = coerce(key, switch_word(value) if key in switches else value, types[key], source)
    return out


class Validated:
    """validate(): one ValueError listing every (field, problem) pair that _problems() finds."""
    WHAT = "config"

    def validate(self):
        # A NaN passes every comparison below (nan < 0 is False), so non-finite numbers go first.
        nonfinite = [(f.name, f"must be a finite number, got {getattr(self, f.name)}") for f in dataclasses.fields(self)
                     if isinstance(getattr(self, f.name), float) and not math.isfinite(getattr(self, f.name))]
        errors = [f"{name}: {msg}" for name, msg in nonfinite or self._problems()]
        if errors:
            raise ValueError(f"invalid {self.WHAT}: " + "; ".join(errors))
        return self

    def _problems(self) -> list[tuple[str, str]]:
        raise NotImplementedError

    @classmethod
    def from_dict(cls, data: object, source: str):
        """The validated config a mapping describes (a run's recorded config, an export's config.json):
        every key and type checked, naming `source`; a key it lacks takes its default (a record from
        before the key existed describes what the default does)."""
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected a mapping of config keys, got {type(data).__name__}")
        return cls(**check_values(cls, data, source)).validate()


@dataclass
class ModelConfig(Validated):
    # --- run ---
    run_tag: str = knob("run", "name appended to the run directory: runs/<YYYYMMDD_HHMMSS>_<tag>")
    runs_dir: str = knob("runs", "directory that holds one sub-directory per run")
    seed: int = knob(1337, "seed for init, dropout and batch sampling (batch k is a function of seed, k)")
    device: str = knob("auto", "auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps")
    dtype: str = knob(
        "auto", "compute dtype; auto = bfloat16 on CUDA where supported and on a CPU whose bf16 matmuls measured "
        ">= 1.2x float32's (README: Half precision on a CPU), else float32",
        choices=("auto", "float32", "bfloat16", "float16"),
    )
    torch_compile: str = knob(
        "auto", "torch.compile the model: auto = on for CUDA, off for CPU and MPS (where it measured slower; "
        "README, Performance); true or false to force it", choices=("auto", "true", "false"),
    )
    activation_checkpointing: str = knob(
        "none", "recompute blocks' activations in the backward pass instead of keeping them: less memory for about "
        "a third more compute; full = every block, selective = every activation_checkpoint_every-th block",
        choices=("none", "full", "selective"),
    )
    activation_checkpoint_every: int = knob(2, "selective activation checkpointing: blocks 0, N, 2N, ... recompute")
    parallelism: str = knob(
        "ddp", "under torchrun: ddp = every rank holds the whole model, gradients and optimizer state; fsdp = each "
        "rank holds 1/world_size of them (FSDP2, sharded checkpoints that resume on any world size)",
        choices=("ddp", "fsdp"),
    )

    # --- data ---
    data: str = knob(
        "shakespeare", "dataset name (shakespeare, pydoc), a prepared dataset (a name under data_dir/tokens/ or its "
        "path), or corpus paths: a UTF-8 text file, a directory, a glob, .jsonl(.gz/.zst) or .parquet files"
    )
    data_dir: str = knob("data", "cache for downloaded corpora and tokenized ids; prepared datasets live in its tokens/")
    tokenizer: str = knob("char", "a registered tokenizer: char (vocabulary = the corpus' characters), gpt2 "
                                  "(tiktoken BPE) or bpe (a byte-level BPE trained on the corpus)")
    vocab_size: int = knob(8192, "bpe: the size of the vocabulary to train (char and gpt2 fix their own)")
    tokenizer_train_bytes: int = knob(0, "bpe: train the tokenizer on the first this many bytes of the corpus "
                                         "(0 = all of it)")
    text_field: str = knob("text", "the field of a .jsonl line, or the column of a .parquet file, holding the text")
    loss_on_prompt: bool = knob(False, "prompt/response pairs: the loss also counts the prompt's tokens; false = "
                                       "only the responses (and their end-of-text)")
    pack_pairs: bool = knob(False, "prompt/response pairs: pack several whole examples into each block_size row "
                                   "(fewer rows; each example sees others before it); false = one per row, padded")
    val_fraction: float = knob(0.1, "fraction held out for validation: whole documents chosen by a hash of their "
                                    "text (pairs: of their prompt); a single text (shakespeare, one file) gives its last tokens")

    # --- model ---
    arch: str = knob("gpt2", "a registered block family: gpt2 (LayerNorm, learned positions, GELU, biases) or llama "
                             "(RMSNorm, rotary positions, SwiGLU, no biases); README: 'Add your own block'")
    n_layer: int = knob(4, "transformer blocks")
    n_head: int = knob(4, "attention heads per block; must divide n_embd")
    n_embd: int = knob(128, "width of the residual stream")
    block_size: int = knob(64, "context length in tokens")
    dropout: float = knob(0.0, "dropout probability in [0, 1); 0 for small data is rarely right, 0.2 is common")
    bias: bool = knob(True, "biases in Linear and LayerNorm layers (gpt2 has them; llama never does)")
    n_kv_head: int = knob(0, "key/value heads (grouped-query attention); must divide n_head; 0 = n_head")
    mlp_ratio: float = knob(4.0, "MLP hidden width as a multiple of n_embd (llama's SwiGLU commonly uses 8/3)")
    norm_eps: float = knob(1e-5, "epsilon of the LayerNorm / RMSNorm layers")
    tie_embeddings: bool = knob(True, "the LM head shares the token embedding's weight (Press & Wolf 2017)")
    qk_norm: bool = knob(False, "RMS-normalize queries and keys per head before attention (steadier at high LR)")
    rope_theta: float = knob(10000.0, "base of the rotary position embedding (llama)")

    # --- optimization ---
    optimizer: str = knob("adamw", "a registered optimizer: adamw, muon (Muon for hidden matrices, AdamW for the "
                                   "rest), adagrad or sgd")
    batch_size: int = knob(12, "sequences per micro-step (per process)")
    grad_accum_steps: int = knob(1, "micro-steps per optimizer step")
    max_iters: int = knob(2000, "optimizer steps")
    target_flops: float = knob(0.0, "a compute budget: max_iters becomes target_flops / (training FLOPs per token "
                                    "x tokens per step), so models of any size train on the same compute (a "
                                    "scaling series); 0 = off")
    learning_rate: float = knob(1e-3, "peak learning rate, reached after warmup")
    min_lr: float = knob(1e-4, "learning rate at the end of the decay (a fraction min_lr/learning_rate for Muon)")
    lr_schedule: str = knob("cosine", "a registered schedule after warmup: cosine, linear, or wsd (stable, then a "
                                      "linear decay over the last decay_fraction of the steps)")
    warmup_iters: int = knob(100, "linear warmup steps; must be < max_iters")
    lr_decay_iters: int = knob(0, "the step at which the decay ends; 0 means max_iters")
    decay_fraction: float = knob(0.2, "wsd: fraction of lr_decay_iters (at the end) spent decaying")
    weight_decay: float = knob(0.1, "decoupled weight decay, applied to matrices only")
    beta1: float = knob(0.9, "AdamW beta1")
    beta2: float = knob(0.99, "AdamW beta2")
    muon_lr: float = knob(0.02, "Muon: peak learning rate of the hidden weight matrices")
    momentum: float = knob(0.95, "momentum of Muon and SGD")
    grad_clip: float = knob(1.0, "clip the global gradient norm to this; 0 disables")
    overfit_batches: int = knob(0, "debug: train on the batches of steps 0..N-1 only, cycling (step k trains on "
                                   "batch k mod N); a model and loss wired up right drive the loss near 0; 0 = off")

    # --- evaluation, logging, output ---
    eval_interval: int = knob(250, "evaluate (and sample) every this many steps, and at the end")
    eval_iters: int = knob(20, "batches averaged per split at each evaluation")
    eval_at_start: bool = knob(True, "evaluate once before the first step of a fresh run, beside ln(vocab_size): "
                                     "a broken initialization or data shows before any training")
    log_interval: int = knob(10, "print and log the training loss every this many steps")
    histogram_interval: int = knob(500, "log parameter and gradient histograms every this many steps; 0 disables")
    sample_length: int = knob(200, "characters/tokens sampled at each eval and at the end; 0 disables")
    sample_prompt: str = knob("\n", "prompt for the samples printed during training")
    checkpoint_interval: int = knob(500, "save a checkpoint every this many steps (also at the end and at "
                                         "each new best val loss); 0: only those")
    keep_checkpoints: int = knob(3, "checkpoints kept (the newest ones), plus the best")
    early_stopping_patience: int = knob(0, "stop after this many evals without a better val loss; 0 disables")
    target_val_loss: float = knob(0.0, "stop, export and record stop_reason target_reached once the val loss is "
                                       "at or below this; 0 disables")
    eval_tasks: list[str] = knob([], "benchmark files scored at every eval and at the end, tracked as "
                                     "eval/<file stem>/acc_norm, ...: YAML [hellaswag_val.jsonl, "
                                     "lambada:lambada_test.jsonl], or a,b (README: Benchmarks)")
    eval_task_items: int = knob(1000, "eval_tasks: score the first this many items of each file at each eval "
                                      "(0 = all of them)")
    init_from: str = knob("", "start from the weights (and tokenizer) of this run or export directory, or of a "
                                  "local Hugging Face GPT-2, Llama or Qwen3 model folder: fine-tuning")
    aim_logging: bool = knob(False, "also track the run with Aim (repo at aim_repo; see `aim up`)")
    aim_repo: str = knob(".", "directory of the Aim repository (.aim is created inside it)")
    imports: list[str] = knob([], "your own modules to import before any registry is read (blocks, optimizers, "
                                  "schedules, tokenizers they register): YAML [my_blocks], or my_blocks,other")

    def validate(self) -> "ModelConfig":
        """Every rule at once; first the `imports` modules, whose registrations a run, a resume or a loaded
        export may name."""
        import_plugins(self.imports)
        return super().validate()

    def _problems(self) -> list[tuple[str, str]]:
        """Every cross-field rule; validate() reports all violations at once."""
        p: list[tuple[str, str]] = []
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                p.append((f.name, f"{getattr(self, f.name)!r} is not one of {', '.join(choices)}"))
        for name in ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "grad_accum_steps",
                     "max_iters", "eval_interval", "eval_iters", "log_interval", "activation_checkpoint_every"):
            if getattr(self, name) <= 0:
                p.append((name, f"must be > 0, got {getattr(self, name)}"))
        for name in ("warmup_iters", "lr_decay_iters", "histogram_interval", "sample_length", "overfit_batches",
                     "weight_decay", "grad_clip", "min_lr", "checkpoint_interval", "early_stopping_patience",
                     "eval_task_items"):
            if getattr(self, name) < 0:
                p.append((name, f"must be >= 0, got {getattr(self, name)}"))
        if self.keep_checkpoints < 1:
            p.append(("keep_checkpoints", f"must be >= 1, got {self.keep_checkpoints}"))
        if self.n_head > 0 and self.n_embd % self.n_head:
            p.append(("n_embd", f"{self.n_embd} is not divisible by n_head={self.n_head}"))
        if self.n_kv_head < 0 or (self.n_kv_head and self.n_head % self.n_kv_head):
            p.append(("n_kv_head", f"{self.n_kv_head} must be 0 (= n_head) or divide n_head={self.n_head}"))
        if int(self.mlp_ratio * self.n_embd) < 1:
            p.append(("mlp_ratio", f"{self.mlp_ratio} x n_embd={self.n_embd} leaves no hidden units"))
        for name in ("norm_eps", "rope_theta", "muon_lr"):
            if getattr(self, name) <= 0:
                p.append((name, f"must be > 0, got {getattr(self, name)}"))
        if not 0.0 <= self.momentum < 1.0:
            p.append(("momentum", f"must be in [0, 1), got {self.momentum}"))
        if not 0.0 < self.decay_fraction <= 1.0:
            p.append(("decay_fraction", f"must be in (0, 1], got {self.decay_fraction}"))
        if self.target_flops < 0:
            p.append(("target_flops", f"must be >= 0 (0 disables), got {self.target_flops}"))
        if self.target_val_loss < 0:
            p.append(("target_val_loss", f"must be >= 0 (0 disables), got {self.target_val_loss}"))
        if not 0.0 <= self.dropout < 1.0:
            p.append(("dropout", f"must be in [0, 1), got {self.dropout}"))
        if not 257 <= self.vocab_size <= 2**32:
            p.append(("vocab_size", f"must be in [257, 2**32] (256 bytes + end-of-text at least), got {self.vocab_size}"))
        if self.tokenizer_train_bytes < 0:
            p.append(("tokenizer_train_bytes", f"must be >= 0 (0 = the whole corpus), got {self.tokenizer_train_bytes}"))
        if not self.text_field:
            p.append(("text_field", "must name a field or column, e.g. text"))
        if not 0.0 < self.val_fraction < 1.0:
            p.append(("val_fraction", f"must be in (0, 1), got {self.val_fraction}"))
        if self.max_iters > 0 and self.warmup_iters >= self.max_iters:
            p.append(("warmup_iters", f"{self.warmup_iters} must be < max_iters={self.max_iters}"))
        if self.learning_rate <= 0:
            p.append(("learning_rate", f"must be > 0, got {self.learning_rate}"))
        elif self.min_lr > self.learning_rate:
            p.append(("min_lr", f"{self.min_lr} must be <= learning_rate={self.learning_rate}"))
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                p.append((name, f"must be in [0, 1), got {getattr(self, name)}"))
        if not (self.device in ("auto", "cpu", "cuda", "mps") or self.device.startswith("cuda:")):
            p.append(("device", f"{self.device!r} is not auto, cpu, cuda, cuda:N or mps"))
        if not self.run_tag or any(c in self.run_tag for c in "/\\ ") or self.run_tag.startswith(".") \
                or not self.run_tag.isprintable() or len(self.run_tag.encode()) > MAX_TAG_BYTES:
            p.append(("run_tag", f"{self.run_tag[:60]!r} must be non-empty, at most {MAX_TAG_BYTES} bytes of printable "
                                 "characters, without '/', '\\' or spaces, not starting with '.'"))
        if self.parallelism == "fsdp" and self.dtype == "float16":
            p.append(("parallelism", "fsdp takes float32 or bfloat16, not float16 (its GradScaler is DDP's); "
                                     "use --dtype bfloat16"))
        if not 0 <= self.seed < 2**63:
            p.append(("seed", f"must be in [0, 2**63), got {self.seed}"))
        return p

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def decay_iters(self) -> int:
        """Length of the cosine schedule."""
        return self.lr_decay_iters or self.max_iters

    @property
    def kv_heads(self) -> int:
        """Key/value heads: n_kv_head, or n_head when it is 0."""
        return self.n_kv_head or self.n_head

    @property
    def mlp_hidden(self) -> int:
        """Hidden width of the MLP."""
        return int(self.mlp_ratio * self.n_embd)

    @property
    def tokens_per_step(self) -> int:
        """Tokens in one optimizer step of one process."""
        return self.batch_size * self.grad_accum_steps * self.block_size


# A run directory's name is <YYYYMMDD_HHMMSS>_<tag>[-N]: this keeps it under the usual 255-byte limit.
MAX_TAG_BYTES = 200
# Fields that define the network's shape: what an export needs to rebuild the model.
# Exports and checkpoints written before a key existed load with its default, which is the old model.
ARCHITECTURE_KEYS = ("arch", "n_layer", "n_head", "n_embd", "block_size", "bias", "n_kv_head", "mlp_ratio", "norm_eps",
                     "tie_embeddings", "qk_norm", "rope_theta")
# Fields a resumed run may change: they leave everything trained so far valid. (max_iters extends a
# run; the LR schedule keeps the length it was recorded with.)
RESUMABLE_KEYS = ("max_iters", "eval_interval", "log_interval", "checkpoint_interval", "histogram_interval",
                  "keep_checkpoints", "sample_length", "aim_logging", "device", "torch_compile", "runs_dir",
                  "target_val_loss", "early_stopping_patience", "eval_tasks", "eval_task_items",
                  "activation_checkpointing", "activation_checkpoint_every", "parallelism")


@dataclass
class RunModel(Validated):
    """The model a stage loads from a run (inference.py, serve.py): its export, or one of its checkpoints."""
    run: str = knob("latest", "run directory, its export/ folder, or one of its checkpoints/step_N folders; "
                                "latest = newest run with an export")
    checkpoint: str = knob("", "use this checkpoint of the run instead of its export: best, latest or step_N")
    runs_dir: str = knob("runs", "where `latest` looks for runs")
    device: str = knob("auto", "auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps")

    WHAT = "arguments"


@dataclass
class GenerateConfig(RunModel):
    prompt: str = knob("\n", "text the samples continue")
    prompt_file: str = knob("", "read the prompt from this file instead of --prompt")
    max_new_tokens: int = knob(500, "tokens to generate per sample")
    temperature: float = knob(0.8, "sampling temperature; 0 = greedy (always the most likely token)")
    top_k: int = knob(200, "sample only among the k most likely tokens; 0 disables")
    top_p: float = knob(1.0, "nucleus sampling: smallest set of tokens with this total probability; 1 disables")
    num_samples: int = knob(1, "independent samples to draw")
    stop_at_end_of_text: bool = knob(True, "end a sample at the tokenizer's end-of-text id (where a document ends)")
    seed: int = knob(1337, "sampling seed")

    def _problems(self) -> list[tuple[str, str]]:
        p: list[tuple[str, str]] = []
        if self.max_new_tokens <= 0:
            p.append(("max_new_tokens", f"must be > 0, got {self.max_new_tokens}"))
        if self.temperature < 0:
            p.append(("temperature", f"must be >= 0, got {self.temperature}"))
        if self.top_k < 0:
            p.append(("top_k", f"must be >= 0, got {self.top_k}"))
        if not 0.0 < self.top_p <= 1.0:
            p.append(("top_p", f"must be in (0, 1], got {self.top_p}"))
        if self.num_samples <= 0:
            p.append(("num_samples", f"must be > 0, got {self.num_samples}"))
        if not 0 <= self.seed < 2**63:
            p.append(("seed", f"must be in [0, 2**63), got {self.seed}"))
        return p


@dataclass
class ServeConfig(RunModel):
    host: str = knob("127.0.0.1", "address to listen on; 0.0.0.0 serves every network the machine is on")
    port: int = knob(8000, "TCP port; 0 picks a free one (printed at start)")
    api_key: str = knob("", "require `Authorization: Bearer KEY` on every /v1 request (or set GPTLAB_API_KEY)")
    model_name: str = knob("", "the model id clients name and /v1/models lists; default: the run directory's name")
    max_batch: int = knob(16, "sequences decoded together, one step for all; more requests wait their turn")
    max_queue: int = knob(256, "sequences waiting for a place in the batch; past this a request gets 503")
    max_prompt_tokens: int = knob(8192, "longest prompt accepted, in tokens (generation sees its last block_size)")
    max_tokens: int = knob(2048, "most tokens one completion may ask for (max_tokens)")
    max_n: int = knob(8, "most completions one request may ask for (n)")
    max_body_bytes: int = knob(1 << 20, "largest request body accepted, in bytes")
    request_timeout: float = knob(600.0, "seconds a request may take, waiting included; then it ends with 504")
    speculate: int = knob(0, "a lone greedy request drafts up to N tokens from its own earlier text (prompt "
                              "lookup) and checks them in one forward; 0 = off")
    threads: int = knob(0, "CPU threads the model computes with; 0 = the cores less one (at least 1), leaving one "
                            "to answer HTTP")

    def _problems(self) -> list[tuple[str, str]]:
        p: list[tuple[str, str]] = []
        if not 0 <= self.port < 65536:
            p.append(("port", f"must be in [0, 65535], got {self.port}"))
        if not 0 <= self.speculate <= 64:
            p.append(("speculate", f"must be in [0, 64] draft tokens, got {self.speculate}"))
        if self.threads < 0:
            p.append(("threads", f"must be >= 0 (0 = automatic), got {self.threads}"))
        for name in ("max_batch", "max_queue", "max_prompt_tokens", "max_tokens", "max_n", "max_body_bytes"):
            if getattr(self, name) <= 0:
                p.append((name, f"must be > 0, got {getattr(self, name)}"))
        if self.request_timeout <= 0:
            p.append(("request_timeout", f"must be > 0 seconds, got {self.request_timeout}"))
        return p
