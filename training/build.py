"""Build a run's parts, once its directory exists: the model (once, at the corpus' vocabulary), its
layout (activation checkpointing, fsdp shards), the optimizer, the DDP and compile wrappers, and the
trackers, handed to a Trainer.

    trainer = build_trainer(start, run_dir, status, d)
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from config import PROJECT_DIR
from model import LanguageModel
from rundir.export import record_init_source
from rundir.meta import git_summary
from rundir.snapshot import load_into
from rundir.status import RunStatus
from rundir.tracking import build_tracker
from training.optim import build_optimizer, describe_optimizer
from training.start import Start
from training.parallelize import apply_activation_checkpointing, apply_fsdp
from training.step import compile_model
from training.trainer import Trainer
from utils.distributed import Dist


def build_trainer(start: Start, run_dir: Path, status: RunStatus, d: Dist,
                  on_eval: Callable[[int, dict], bool] | None = None) -> Trainer:
    """The model (built once, at the corpus' vocabulary: fresh, fine-tuned or resumed), the optimizer, the
    DDP and compile wrappers, and (rank 0) the trackers."""
    cfg, corpus, compute, resume, init = start.cfg, start.corpus, start.compute, start.resume, start.init
    device, dtype, compiled = compute.device, compute.dtype, compute.compiled
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    raw_model = LanguageModel(cfg, corpus.tokenizer.vocab_size).to(device)
    if init:  # fine-tuning on pairs may have given a char vocabulary its end-of-text id: load_into grows it
        load_into(raw_model, init)
        if d.is_main:
            source = record_init_source(run_dir, cfg.init_from)
            status.update(init_from=source)
            print(f"initialized from {source}")
    apply_activation_checkpointing(raw_model, cfg)
    fsdp = cfg.parallelism == "fsdp" and d.enabled
    if fsdp:  # before the optimizer, which then holds (and keeps state for) this rank's shards only
        apply_fsdp(raw_model, compute, d)
    elif cfg.parallelism == "fsdp":
        print("parallelism fsdp on one process: nothing to shard, so the run trains and checkpoints as one process")
    torch.manual_seed(cfg.seed + d.rank)  # but each rank its own dropout masks
    optimizer = build_optimizer(raw_model, cfg, device)
    trainer = Trainer(cfg=cfg, raw_model=raw_model, optimizer=optimizer, splits=corpus.splits,
                      tokenizer=corpus.tokenizer, device=device, dtype=dtype, run_dir=run_dir, status=status, d=d,
                      data=corpus.identity, bits_per_byte=corpus.bits_per_byte, eval_tasks=start.eval_tasks,
                      on_eval=on_eval)
    if resume:
        trainer.restore(resume)
        trainer.aim_run_hash = resume.meta.get("aim_run_hash")
        status.update(resumed_from=resume.path.name)
        print(f"resumed from {resume.path.name} at iteration {trainer.iteration}")
    model = DDP(raw_model, device_ids=[device.index] if device.type == "cuda" else None) if d.enabled and not fsdp \
        else raw_model
    # Compile after wrapping: DDPOptimizer then splits the graph at bucket boundaries, so gradient
    # all-reduce overlaps backward (PyTorch's recommended order). fsdp compiled its blocks already.
    trainer.model = compile_model(model, device) if compiled and not fsdp else model
    status.update(compiled=compiled, dtype=str(dtype).removeprefix("torch."))  # what auto chose here
    status.update(params=raw_model.num_params(), flops_per_token=raw_model.flops_per_token())
    print(f"model {raw_model.num_params() / 1e6:.2f}M parameters | device {device} | {str(dtype)[6:]} "
          f"| compile {'on' if compiled else 'off'}{' (auto)' if cfg.torch_compile == 'auto' else ''} "
          f"| {cfg.tokens_per_step * d.world_size:,} tokens/step"
          + (f" ({d.world_size} ranks, {'fsdp' if fsdp else 'ddp'})" if d.enabled else ""))
    print(describe_optimizer(optimizer, cfg))
    if d.is_main:
        extra = {"git": git_summary(PROJECT_DIR), "python": sys.version.split()[0], "torch": torch.__version__}
        trainer.tracker = build_tracker(run_dir, config=cfg.to_dict(), extra=extra, aim_logging=cfg.aim_logging,
                                        aim_repo=cfg.aim_repo, experiment=cfg.run_tag,
                                        aim_run_hash=trainer.aim_run_hash, purge_step=trainer.iteration + 1,
                                        tokens_per_step=cfg.tokens_per_step * d.world_size, clock=trainer.elapsed)
        trainer.aim_run_hash = trainer.tracker.run_hash or trainer.aim_run_hash
    if trainer.aim_run_hash:
        status.update(aim_run_hash=trainer.aim_run_hash)  # a resumed run continues the same Aim run
    return trainer
