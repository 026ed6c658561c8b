"""Muon under fsdp: two ways to run Newton-Schulz on matrices that each rank holds rows of, timed side by side.

    torchrun --nproc_per_node=2 benchmarks/fsdp_muon.py [--n-layer 6 --n-embd 384 --rounds 5]

owner (what training/optim.py does): of each world_size matrices, rank i orthogonalizes the i-th (all of
them at once), after one all-gather per matrix, then scatters its result's rows back: 1/world_size of the
compute, one more collective per matrix. gather: every matrix's update is all-gathered, every rank
orthogonalizes every matrix and keeps its own rows: the whole Newton-Schulz on every rank. The script
prints each one's optimizer step (median of --rounds, each round alternating the two), and checks that
both give the same weights.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import distribute_tensor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model import LanguageModel  # noqa: E402
from parameters import ModelConfig  # noqa: E402
from training.optim import Muon, build_optimizer, newton_schulz  # noqa: E402
from training.parallelize import apply_fsdp  # noqa: E402
from utils.device import Compute  # noqa: E402
from utils.distributed import Dist  # noqa: E402


@torch.no_grad()
def gather_step(muon: Muon) -> None:
    """Muon's step with every rank orthogonalizing every whole matrix and keeping its own rows."""
    group = muon.param_groups[0]
    for p in (p for p in group["params"] if p.grad is not None):
        update = muon.momentum_update(p, group)
        whole = newton_schulz(update.full_tensor(), group["ns_coefficients"], group["ns_steps"], group["eps"],
                              muon.ns_dtype)
        p.mul_(1 - group["lr"] * group["weight_decay"])
        p.add_(distribute_tensor(whole, update.device_mesh, update.placements, src_data_rank=None),
               alpha=-group["lr"] * math.sqrt(max(1.0, p.size(0) / p.size(1))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-layer", type=int, default=6)
    parser.add_argument("--n-embd", type=int, default=384)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    d = Dist(dist.get_rank(), dist.get_rank(), dist.get_world_size(), dist.group.WORLD)
    torch.set_num_threads(1)
    cfg = ModelConfig(n_layer=args.n_layer, n_embd=args.n_embd, n_head=6, block_size=256, optimizer="muon").validate()
    models, muons = [], []
    for _ in range(2):
        torch.manual_seed(0)
        model = LanguageModel(cfg, 65)
        apply_fsdp(model, Compute(torch.device("cpu"), torch.float32, False), d)
        models.append(model)
        muons.append(build_optimizer(model, cfg, torch.device("cpu")).parts[0])
    for model in models:  # the same gradients for both
        torch.manual_seed(1)
        for p in model.parameters():
            p.grad = distribute_tensor(torch.randn(p.shape), p.device_mesh, p.placements)
    times = {"owner": [], "gather": []}
    for _ in range(args.rounds):
        for name, muon in (("owner", muons[0]), ("gather", muons[1])):
            dist.barrier()
            t0 = time.perf_counter()
            muon.step() if name == "owner" else gather_step(muon)
            dist.barrier()
            times[name].append(time.perf_counter() - t0)
    apart = max((a.detach().full_tensor() - b.detach().full_tensor()).abs().max().item()
                for a, b in zip(models[0].parameters(), models[1].parameters()))
    if d.is_main:
        n = sum(p.numel() for p in muons[0].param_groups[0]["params"])
        print(f"{len(muons[0].param_groups[0]['params'])} matrices, {n / 1e6:.2f}M parameters, {d.world_size} ranks, "
              f"1 thread each; weights apart after {args.rounds} steps: {apart:.1e}")
        for name, ts in times.items():
            print(f"{name:>6}: {statistics.median(ts) * 1e3:8.1f} ms per optimizer step (median of {args.rounds})")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
