"""Learning-rate schedules and optimizers, each a registry entry that a config value names.

    optimizer = build_optimizer(model, cfg, device)   # cfg.optimizer: adamw, muon, adagrad or sgd
    set_lrs(optimizer, step, cfg)                     # every group at the schedule's value for its own peak
    print(describe_optimizer(optimizer, cfg))         # one line: the groups and their learning rates

An optimizer is one function (model, cfg, device) -> torch optimizer whose param groups carry "peak_lr"
(the learning rate the schedule scales) and "label" (what the group holds, for the start-up line),
registered with @OPTIMIZERS.register("name"). A schedule is one pure function (step, cfg, peak, floor)
-> lr for the steps after warmup, registered with @SCHEDULES.register("name"). The loop, gradient
clipping, GradScaler and checkpoints need nothing else. training/trainer.py and training/build.py use them.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import torch

from parameters import OPTIMIZERS, SCHEDULES, ModelConfig
from utils.distributed import is_dtensor



def get_lr(step: int, cfg: ModelConfig, peak: float | None = None) -> float:
    """The configured schedule's learning rate at step for a group peaking at `peak` (default
    learning_rate): linear warmup to peak over warmup_iters, then the schedule down to a floor that is
    the same fraction min_lr/learning_rate of every group's peak."""
    peak = cfg.learning_rate if peak is None else peak
    if step < cfg.warmup_iters:
        return peak * (step + 1) / (cfg.warmup_iters + 1)
    # min_lr itself for the learning_rate groups: (min_lr / lr) * lr need not round back to min_lr.
    floor = cfg.min_lr if peak == cfg.learning_rate else peak * (cfg.min_lr / cfg.learning_rate)
    return SCHEDULES.lookup(cfg.lr_schedule)(step, cfg, peak, floor)


def set_lrs(optimizer: torch.optim.Optimizer, step: int, cfg: ModelConfig) -> None:
    """Every param group at the schedule's value for its own peak. Groups restored from a checkpoint
    written before groups carried peak_lr were all AdamW's, at learning_rate."""
    for group in optimizer.param_groups:
        group["lr"] = get_lr(step, cfg, group.get("peak_lr", cfg.learning_rate))


@SCHEDULES.register("cosine")
def cosine_lr(step: int, cfg: ModelConfig, peak: float, floor: float) -> float:
    """Cosine decay from peak to floor between warmup_iters and decay_iters, then floor."""
    if step >= cfg.decay_iters:
        return floor
    progress = (step - cfg.warmup_iters) / max(1, cfg.decay_iters - cfg.warmup_iters)
    return floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (peak - floor)


@SCHEDULES.register("linear")
def linear_lr(step: int, cfg: ModelConfig, peak: float, floor: float) -> float:
    """Linear decay from peak to floor between warmup_iters and decay_iters, then floor."""
    if step >= cfg.decay_iters:
        return floor
    progress = (step - cfg.warmup_iters) / max(1, cfg.decay_iters - cfg.warmup_iters)
    return peak + progress * (floor - peak)


@SCHEDULES.register("wsd")
def wsd_lr(step: int, cfg: ModelConfig, peak: float, floor: float) -> float:
    """Warmup-stable-decay (Hu et al. 2024, MiniCPM): peak until the last decay_fraction of
    decay_iters, a linear decay to floor over it, then floor. A run stopped before the decay can be
    extended from a checkpoint of its stable phase."""
    if step >= cfg.decay_iters:
        return floor
    start = max(cfg.warmup_iters, cfg.decay_iters * (1.0 - cfg.decay_fraction))
    if step < start:
        return peak
    return peak + (step - start) / max(1.0, cfg.decay_iters - start) * (floor - peak)


def trainable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def decay_groups(params: list[torch.nn.Parameter], cfg: ModelConfig) -> list[dict]:
    """Weight decay on matrices (Linear, Embedding) only, never on biases or norm gains; both at
    learning_rate. An empty group is left out."""
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay,
         "peak_lr": cfg.learning_rate, "label": "matrices"},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0,
         "peak_lr": cfg.learning_rate, "label": "vectors"},
    ]
    return [g for g in groups if g["params"]]


def adamw(params: list[torch.nn.Parameter], cfg: ModelConfig, device: torch.device) -> torch.optim.AdamW:
    fused = device.type == "cuda"  # one kernel for the whole update instead of one per tensor
    return torch.optim.AdamW(decay_groups(params, cfg), lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                             fused=fused)


@OPTIMIZERS.register("adamw")
def build_adamw(model: torch.nn.Module, cfg: ModelConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW (Loshchilov & Hutter 2019), fused on CUDA."""
    return adamw([p for _, p in trainable(model)], cfg, device)


@OPTIMIZERS.register("adagrad")
def build_adagrad(model: torch.nn.Module, cfg: ModelConfig, device: torch.device) -> torch.optim.Adagrad:
    """Adagrad; its weight decay is L2 (added to the gradient), not decoupled."""
    return torch.optim.Adagrad(decay_groups([p for _, p in trainable(model)], cfg), lr=cfg.learning_rate)


@OPTIMIZERS.register("sgd")
def build_sgd(model: torch.nn.Module, cfg: ModelConfig, device: torch.device) -> torch.optim.SGD:
    """SGD with momentum; L2 weight decay. It wants a far higher learning_rate than AdamW (0.1 to 1)."""
    return torch.optim.SGD(decay_groups([p for _, p in trainable(model)], cfg), lr=cfg.learning_rate,
                           momentum=cfg.momentum)


def is_hidden_matrix(name: str, p: torch.Tensor) -> bool:
    """The weights Muon orthogonalizes: matrices inside the transformer blocks. Embeddings and the LM
    head are not hidden layers (modded-nanogpt and nanochat keep them on AdamW), and Muon takes only 2-D."""
    return name.startswith("transformer.h.") and p.dim() == 2


def newton_schulz(grad: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float,
                  dtype: torch.dtype) -> torch.Tensor:
    """The quintic Newton-Schulz iteration of torch.optim.Muon (Jordan et al. 2024), run in `dtype`:
    an approximately orthogonal matrix with the singular vectors of grad (2-D)."""
    a, b, c = coefficients
    x = grad.to(dtype)
    tall = grad.size(0) > grad.size(1)
    if tall:
        x = x.T  # iterate on the wide orientation: the Gram matrix x @ x.T is then the smaller one
    x = x / x.norm().clamp(min=eps)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def orthogonalized(updates: list[torch.Tensor], ns: Callable[[torch.Tensor], torch.Tensor]) -> list[torch.Tensor]:
    """ns (Newton-Schulz) of each update. Under fsdp an update is a DTensor of which each rank holds rows,
    and the iteration needs the whole matrix: the i-th of these world_size updates is orthogonalized by
    rank i alone (all of them at once, one per rank), which then scatters the rows back to their ranks.
    On 2 CPU ranks that took 839 ms per step of shakespeare_char's 24 matrices against 1,242 ms for every
    rank orthogonalizing every matrix, with the same weights (benchmarks/fsdp_muon.py)."""
    if not is_dtensor(updates[0]):
        return [ns(u) for u in updates]
    from torch.distributed.tensor import distribute_tensor
    mesh = updates[0].device_mesh
    rank, whole = mesh.get_local_rank(), [u.full_tensor() for u in updates]
    mine = ns(whole[rank]).to(whole[rank].dtype) if rank < len(whole) else None  # the last chunk may have fewer
    return [distribute_tensor(mine if i == rank else torch.empty_like(w), mesh, u.placements, src_data_rank=i)
            for i, (u, w) in enumerate(zip(updates, whole))]


class Muon(torch.optim.Muon):
    """torch.optim.Muon: the same hyperparameters, state (momentum_buffer) and update, with the
    Newton-Schulz iteration in float32 except on CUDA. torch runs it in bfloat16, which a CPU without
    native bf16 (AVX2) emulates: 831 ms of optimizer per step of the default recipe against 48 ms for
    the whole AdamW step (README, Performance); and on a Sapphire Rapids VM a bf16 matmul can kill the
    process (SIGILL). On CUDA this is torch's own step, except under fsdp (sharded parameters), where
    this one runs Newton-Schulz in bf16 as torch does. Only adjust_lr_fn "original" (the default)."""

    @torch.no_grad()
    def step(self, closure=None):
        params = [p for group in self.param_groups for p in group["params"]]
        if params and all(p.device.type == "cuda" and not is_dtensor(p) for p in params):
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            assert group["adjust_lr_fn"] in (None, "original"), group["adjust_lr_fn"]
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            dtype = torch.bfloat16 if params[0].device.type == "cuda" else self.ns_dtype
            ns = functools.partial(newton_schulz, coefficients=group["ns_coefficients"], steps=group["ns_steps"],
                                   eps=group["eps"], dtype=dtype)
            at_once = params[0].device_mesh.size() if is_dtensor(params[0]) else 1  # fsdp: one per rank
            for start in range(0, len(params), at_once):
                chunk = params[start:start + at_once]
                for p, update in zip(chunk, orthogonalized([self.momentum_update(p, group) for p in chunk], ns)):
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                    p.add_(update, alpha=-group["lr"] * math.sqrt(max(1.0, p.size(0) / p.size(1))))
        return loss

    def momentum_update(self, p: torch.Tensor, group: dict) -> torch.Tensor:
        """The momentum buffer, updated with p's gradient, and the (Nesterov) update before Newton-Schulz."""
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
        buf = state["momentum_buffer"]
        buf.lerp_(p.grad, 1 - group["momentum"])
        return p.grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf

    ns_dtype = torch.float32  # the tests set bfloat16 to compare with torch's own step, bit for bit


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon for the hidden matrices and AdamW for the rest, as one optimizer: param_groups holds both
    parts' groups (the very same dicts, Muon's first) and both share one state, so the loop, gradient
    clipping, GradScaler and checkpoints (torch's own state_dict format) see a single optimizer."""

    def __init__(self, muon: torch.optim.Muon, adamw: torch.optim.AdamW) -> None:
        self.parts = (muon, adamw)
        super().__init__([g for part in self.parts for g in part.param_groups], {})
        self._link()

    def _link(self) -> None:
        """Point each part at its slice of param_groups and at the shared state (again after a load,
        which replaces both)."""
        at = 0
        for part in self.parts:
            n = len(part.param_groups)
            part.param_groups, part.state = self.param_groups[at:at + n], self.state
            at += n

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for part in self.parts:
            part.step()
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._link()


@OPTIMIZERS.register("muon")
def build_muon(model: torch.nn.Module, cfg: ModelConfig, device: torch.device) -> MuonWithAdamW:
    """Muon (Jordan et al. 2024) at muon_lr with momentum for the hidden matrices, with decoupled weight
    decay; AdamW at learning_rate for embeddings, the LM head, norms and biases."""
    named = trainable(model)
    hidden = [p for name, p in named if is_hidden_matrix(name, p)]
    if not hidden:
        raise ValueError("optimizer muon found no 2-D weights under transformer.h. to orthogonalize; "
                         "use --optimizer adamw")
    muon = Muon([{"params": hidden, "peak_lr": cfg.muon_lr, "label": "hidden matrices"}],
                            lr=cfg.muon_lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum)
    return MuonWithAdamW(muon, adamw([p for name, p in named if not is_hidden_matrix(name, p)], cfg, device))


def build_optimizer(model: torch.nn.Module, cfg: ModelConfig, device: torch.device) -> torch.optim.Optimizer:
    """The optimizer cfg.optimizer names, over the model's trainable parameters."""
    return OPTIMIZERS.lookup(cfg.optimizer)(model, cfg, device)


def describe_optimizer(optimizer: torch.optim.Optimizer, cfg: ModelConfig) -> str:
    """One line for the start-up: the optimizer, the schedule, and per group its class, peak learning
    rate, tensors and parameters."""
    parts = []
    for part in getattr(optimizer, "parts", (optimizer,)):
        for g in part.param_groups:
            n = sum(p.numel() for p in g["params"])
            size = f"{n / 1e6:.2f}M" if n >= 10_000 else f"{n:,}"
            decay = f", weight decay {g['weight_decay']:g}" if g.get("weight_decay") else ""
            parts.append(f"{type(part).__name__} lr {g.get('peak_lr', cfg.learning_rate):g} on "
                         f"{_count(len(g['params']), g.get('label', 'tensors'))} ({size} params{decay})")
    return f"optimizer {cfg.optimizer}, {cfg.lr_schedule} schedule: " + "; ".join(parts)


def _count(n: int, plural: str) -> str:
    """'3 matrices', '1 matrix', '1 vector'."""
    if n != 1:
        return f"{n} {plural}"
    return f"1 {plural[:-3] + 'x' if plural.endswith('ices') else plural.removesuffix('s')}"
