"""What a run starts from, resolved before any run directory exists, so that a bad flag, corpus or
size costs nothing: fresh, resumed (--resume) or fine-tuned (--init-from).

    start = resolve_start(parsed, d, device_name, held, notes)   # Start(cfg, compute, corpus, ...) or None
    model = build_model_for(start)                              # the model, built once, at the corpus' vocabulary

The config comes first (a resume's recorded one, or the source model's architecture), then the
compute set-up, then the corpus, which decides the tokenizer (the resumed or source model's one,
grown by an end-of-text id for pairs if need be); only then is the model's size known.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

from config import PROJECT_DIR, init_config, rescale_batch, resume_config
from data import Corpus, check_same_corpus, prepare_corpus
from evaluation.likelihood import EvalTask, prepare_eval_tasks
from parameters import ModelConfig
from rundir.checkpoint import Checkpoint
from rundir.resume import find_resume
from rundir.export import Snapshot, read_init_source
from rundir.lock import RunLock
from rundir.meta import code_note
from rundir.run_dir import RunDir
from tokenizer import tokenizer_from_dict
from training.estimate import check_fits, check_tokenizing_fits, describe, estimate_run
from utils import distributed
from utils.console import ProgressLine
from utils.device import Compute, setup_compute
from utils.distributed import Dist
from utils.files import writable_dir


@dataclass(kw_only=True)
class Start:
    """What a run starts from. resume is the checkpoint --resume continues (in run); init the stored
    model --init-from starts from, not yet built."""
    cfg: ModelConfig
    compute: Compute
    corpus: Corpus
    run: RunDir | None = None             # the run being resumed
    resume: Checkpoint | None = None
    init: Snapshot | None = None
    eval_tasks: list[EvalTask] = dataclasses.field(default_factory=list)  # benchmark files, read and encoded


def resolve_start(parsed, d: Dist, device_name: str, held: contextlib.ExitStack, notes: list[str]) -> Start | None:
    """Fresh, resumed or fine-tuned: the config, the compute setup, the corpus, and every check that can
    refuse the run; None when a resumed run has nothing left to train (notes say so). Resuming locks the
    run (rank 0). Lines for the user go to notes."""
    cfg, args, run, resume, init = parsed.config, parsed.args, None, None, None
    notes += parsed.notes
    if args.resume:
        if args.config:
            raise ValueError("--resume takes the config from the run; pass flags (e.g. --max-iters), not --config")
        run, resume = find_resume(args.resume, cfg.runs_dir, notes)
        if d.is_main:  # before anything is written into it: a second process resuming it is refused here
            held.enter_context(RunLock(run.path))
        cfg = resume_config(resume.meta["config"], parsed.cli, str(resume.path))
        cfg = rescale_batch(cfg, resume.meta.get("world_size", 1), d.world_size, notes)
        notes.append(code_note(run.path, PROJECT_DIR))
    elif cfg.init_from:
        init = read_init_source(cfg.init_from)
        cfg = init_config(cfg, init.config, parsed.cli)
    compute = setup_compute(device_name if d.enabled else cfg.device, cfg.dtype, cfg.torch_compile)
    given = tokenizer_from_dict(resume.meta["tokenizer"]) if resume else init.tokenizer if init else None
    if cfg.aim_logging and d.is_main:
        writable_dir(cfg.aim_repo, "--aim-repo")  # now, not once the run directory exists
    check_tokenizing_fits(cfg)
    corpus = open_corpus(cfg, given, resume.meta.get("data") if resume else None, d)
    cfg = adopt_dataset_settings(cfg, corpus, notes)
    if resume:
        check_same_corpus(resume.meta.get("data"), corpus)
        if resume.iteration >= cfg.max_iters and run.has_export():
            notes.append(f"{run.name} already trained to max_iters={cfg.max_iters} and has its export: nothing left "
                         f"to train; pass --max-iters N (more than {resume.iteration}) to train it further")
            return None
    cfg = check_sample_prompt(cfg, corpus, notes)
    if cfg.target_flops and not resume:
        cfg = fit_to_budget(cfg, corpus.tokenizer.vocab_size, d.world_size, notes)
    eval_tasks = prepare_eval_tasks(cfg.eval_tasks, corpus.tokenizer, cfg.block_size, cfg.eval_task_items, d.rank,
                                    d.world_size, notes if d.is_main else None)
    estimate = estimate_run(cfg, corpus.tokenizer.vocab_size, compute.device, compute.dtype, d.world_size,
                            resume.iteration if resume else 0)
    check_fits(estimate, compute.device)  # what cannot fit is refused now, not found out by allocating
    notes += describe(estimate, compute.device)
    return Start(cfg=cfg, compute=compute, corpus=corpus, run=run, resume=resume, init=init, eval_tasks=eval_tasks)


def fit_to_budget(cfg: ModelConfig, vocab_size: int, world_size: int, notes: list[str]) -> ModelConfig:
    """max_iters from target_flops: the budget over the model's training FLOPs per token (model.py's count,
    6N plus attention) and the tokens of a step (every rank's)."""
    import torch

    from model import LanguageModel

    with torch.device("meta"):  # the count needs the shapes only
        flops_per_token = LanguageModel(cfg, vocab_size).flops_per_token()
    steps = int(cfg.target_flops // (flops_per_token * cfg.tokens_per_step * world_size))
    if steps <= cfg.warmup_iters:
        raise ValueError(f"target_flops {cfg.target_flops:.3g} buys {steps} steps of this model ({flops_per_token:,} "
                         f"FLOPs per token, {cfg.tokens_per_step * world_size:,} tokens per step), not more than "
                         f"warmup_iters={cfg.warmup_iters}: raise the budget or shrink the model")
    notes.append(f"target_flops {cfg.target_flops:.3g}: max_iters {steps:,} ({flops_per_token:,} FLOPs per token x "
                 f"{cfg.tokens_per_step * world_size:,} tokens per step)")
    return dataclasses.replace(cfg, max_iters=steps, eval_interval=min(cfg.eval_interval, steps))


def open_corpus(cfg: ModelConfig, given, recorded: dict | None, d: Dist) -> Corpus:
    """The corpus; under torchrun rank 0 tokenizes (and prepares) first, the others then find it cached."""
    if not d.is_main:
        distributed.barrier(d)
    progress = ProgressLine(f"preparing {cfg.data}") if d.is_main else None
    try:
        corpus = prepare_corpus(cfg, given, recorded, progress=progress, open_only=not d.is_main)
    finally:
        if progress:
            progress.close()
    if d.is_main:
        distributed.barrier(d)
    return corpus


def adopt_dataset_settings(cfg: ModelConfig, corpus: Corpus, notes: list[str]) -> ModelConfig:
    """A prepared dataset's tokens were made with its own tokenizer, val_fraction, ...: the run's
    config records those (meta/full_config.json explains the run), with a note where they differ."""
    differ = {k: v for k, v in corpus.settings.items() if k in ModelConfig.__dataclass_fields__ and getattr(cfg, k) != v}
    if "vocab_size" in differ:  # a bpe tokenizer that the corpus left smaller than asked
        notes.append(f"the bpe tokenizer learned {differ['vocab_size']:,} ids, not vocab_size {cfg.vocab_size:,} (a "
                     "corpus this small holds too few distinct merges): the run records the real size")
    said = ", ".join(f"{k} {v!r} (not {getattr(cfg, k)!r})" for k, v in differ.items() if k != "vocab_size")
    if said:
        notes.append(f"the dataset {corpus.name} was prepared with {said}: the run uses those")
    return dataclasses.replace(cfg, **differ)


def check_sample_prompt(cfg: ModelConfig, corpus: Corpus, notes: list[str]) -> ModelConfig:
    """The sample prompt, checked against the vocabulary before step 0: a first eval that cannot encode
    it would end the run with nothing saved. The default prompt adapts to the corpus (said in notes),
    also when nothing is sampled, since inference.py starts from it; one the user chose must encode
    where samples are drawn, or it is a one-line error."""
    default = ModelConfig.__dataclass_fields__["sample_prompt"].default
    if corpus.kind == "pairs" and cfg.sample_prompt == default:  # show the model answering a held-out prompt
        notes.append(f"samples answer the first held-out prompt, {corpus.first_text!r}")
        return dataclasses.replace(cfg, sample_prompt=corpus.first_text)
    try:
        if corpus.tokenizer.encode(cfg.sample_prompt):
            return cfg
        problem = "it encodes to no tokens"
    except ValueError as e:
        problem = str(e).split(";")[0]
    if cfg.sample_prompt != default:
        if not cfg.sample_length:
            return cfg
        raise ValueError(f"sample_prompt {cfg.sample_prompt[:40]!r} cannot start a sample: {problem}; choose one "
                         "from the corpus' characters, or pass --sample-length 0")
    notes.append(f"the default sample prompt {default!r} is not in this corpus' vocabulary; samples start from "
                 f"{corpus.first_text!r}")
    return dataclasses.replace(cfg, sample_prompt=corpus.first_text)
