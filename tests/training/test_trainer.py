"""optimization.py and the loop's use of it: schedule values, every optimizer trains, Muon's grouping,
its state round trip and GradScaler, the start-up description."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
from pathlib import Path

import pytest
import torch

from conftest import TINY_TEXT
from model import LanguageModel
from training.optim import OPTIMIZERS, SCHEDULES, MuonWithAdamW, build_optimizer, describe_optimizer, get_lr, set_lrs
from parameters import ModelConfig
from tokenizer import CharTokenizer
from training.batches import get_batch
from training.step import train_step
from training.trainer import Trainer
from rundir.status import RunStatus
from utils.signals import NeverStop
from rundir.tracking import Tracker

CPU = torch.device("cpu")
VOCAB = sorted(set(TINY_TEXT))
TOKENS = torch.tensor([VOCAB.index(c) for c in TINY_TEXT]).numpy()


def schedule_cfg(name: str) -> ModelConfig:
    """Numbers whose schedule values are exact in binary: peak 1, floor 0.5, decay from 4 to 12."""
    return ModelConfig(lr_schedule=name, learning_rate=1.0, min_lr=0.5, warmup_iters=4, lr_decay_iters=12,
                       max_iters=20, decay_fraction=0.5).validate()


@pytest.mark.parametrize("name,values", [
    ("cosine", {4: 1.0, 12: 0.5, 19: 0.5}),
    ("linear", {4: 1.0, 6: 0.875, 8: 0.75, 10: 0.625, 12: 0.5, 19: 0.5}),
    ("wsd", {4: 1.0, 5: 1.0, 6: 1.0, 9: 0.75, 12: 0.5, 19: 0.5}),  # stable to 12 * (1 - 0.5) = 6, then linear
])
def test_schedule_values_at_key_steps(name, values):
    cfg = schedule_cfg(name)
    assert [get_lr(s, cfg) for s in range(4)] == [1 / 5, 2 / 5, 3 / 5, 4 / 5]  # the shared linear warmup
    assert {s: get_lr(s, cfg) for s in values} == values
    lrs = [get_lr(s, cfg) for s in range(4, 20)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # never rises after warmup
    # Another group's peak (Muon's): the same curve scaled, down to the same fraction min_lr/learning_rate.
    assert [get_lr(s, cfg, peak=0.02) for s in range(20)] == pytest.approx([0.02 * v for v in
                                                                            [get_lr(s, cfg) for s in range(20)]])


def test_cosine_midpoint_and_the_default_config_are_bit_identical_to_the_old_formula():
    cfg = schedule_cfg("cosine")
    assert get_lr(8, cfg) == pytest.approx(0.75)

    def old(step: int, cfg: ModelConfig) -> float:  # get_lr before schedules were a registry
        if step < cfg.warmup_iters:
            return cfg.learning_rate * (step + 1) / (cfg.warmup_iters + 1)
        if step >= cfg.decay_iters:
            return cfg.min_lr
        progress = (step - cfg.warmup_iters) / max(1, cfg.decay_iters - cfg.warmup_iters)
        return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)

    default = ModelConfig()
    assert all(get_lr(s, default) == old(s, default) for s in range(default.max_iters + 10))


def test_the_registries_name_every_choice():
    assert SCHEDULES.names() == ["cosine", "linear", "wsd"]
    assert OPTIMIZERS.names() == ["adamw", "adagrad", "sgd", "muon"]


@pytest.mark.parametrize("name,lr", [("adamw", 1e-2), ("muon", 1e-2), ("adagrad", 5e-2), ("sgd", 0.5)])
def test_each_optimizer_lowers_the_loss(tiny_cfg, name, lr):
    cfg = dataclasses.replace(tiny_cfg, optimizer=name, learning_rate=lr, min_lr=lr / 10, max_iters=30)
    torch.manual_seed(0)
    model = LanguageModel(cfg, len(VOCAB))
    optimizer = build_optimizer(model, cfg, CPU)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    losses = []
    for step in range(cfg.max_iters):
        set_lrs(optimizer, step, cfg)
        loss, _ = train_step(model, optimizer, TOKENS, step, cfg, scaler=scaler, ctx=contextlib.nullcontext(), device=CPU)
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < sum(losses[:3]) / 3 - 0.15, losses


@pytest.mark.parametrize("arch,tie", [("gpt2", True), ("llama", False)])
def test_muon_takes_the_hidden_matrices_and_adamw_the_rest(tiny_cfg, arch, tie):
    cfg = dataclasses.replace(tiny_cfg, optimizer="muon", arch=arch, tie_embeddings=tie, bias=arch == "gpt2")
    model = LanguageModel(cfg, 30)
    optimizer = build_optimizer(model, cfg, CPU)
    names = {id(p): n for n, p in model.named_parameters()}
    muon, adamw = optimizer.parts
    (hidden,) = muon.param_groups
    muon_names = {names[id(p)] for p in hidden["params"]}
    adamw_names = {names[id(p)] for g in adamw.param_groups for p in g["params"]}
    assert muon_names == {n for n, p in model.named_parameters() if n.startswith("transformer.h.") and p.dim() == 2}
    assert muon_names.isdisjoint(adamw_names) and muon_names | adamw_names == set(names.values())
    assert "transformer.wte.weight" in adamw_names and ("lm_head.weight" in adamw_names) == (not tie)
    assert ("transformer.wpe.weight" in adamw_names) == (arch == "gpt2")  # llama has no learned positions
    assert all(".ln_" in n or n.endswith((".bias", "norm.weight")) or "ln_f" in n
               for n in adamw_names if model.get_parameter(n).dim() < 2)
    assert optimizer.param_groups == [hidden, *adamw.param_groups]  # one list, Muon's first, the same dicts
    assert hidden["peak_lr"] == cfg.muon_lr and all(g["peak_lr"] == cfg.learning_rate for g in adamw.param_groups)
    set_lrs(optimizer, 1, cfg)  # within warmup: each group at its own peak's fraction
    assert hidden["lr"] == cfg.muon_lr * 2 / 3 and adamw.param_groups[0]["lr"] == cfg.learning_rate * 2 / 3
    text = describe_optimizer(optimizer, cfg)
    assert text.startswith("optimizer muon, cosine schedule: Muon lr 0.02 on 8 hidden matrices (") and "\n" not in text
    assert "; AdamW lr 0.001 on " in text


def muon_steps(cfg: ModelConfig, model: LanguageModel, optimizer: MuonWithAdamW, steps: range,
               scaler: torch.amp.GradScaler) -> None:
    for step in steps:
        set_lrs(optimizer, step, cfg)
        train_step(model, optimizer, TOKENS, step, cfg, scaler=scaler, ctx=contextlib.nullcontext(), device=CPU)
        optimizer.zero_grad(set_to_none=True)


def test_muon_state_round_trips_through_a_weights_only_load_exactly(tiny_cfg):
    cfg = dataclasses.replace(tiny_cfg, optimizer="muon")
    torch.manual_seed(0)
    straight = LanguageModel(cfg, len(VOCAB))
    opt = build_optimizer(straight, cfg, CPU)
    no_scaling = torch.amp.GradScaler("cpu", enabled=False)
    muon_steps(cfg, straight, opt, range(3), no_scaling)
    buffer = io.BytesIO()
    torch.save({"optimizer": opt.state_dict(), "model": straight.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # what utils/checkpoint.py does: no pickled code
    resumed = LanguageModel(cfg, len(VOCAB))
    resumed.load_state_dict(saved["model"])
    opt2 = build_optimizer(resumed, cfg, CPU)
    opt2.load_state_dict(saved["optimizer"])
    assert opt2.parts[0].state is opt2.state and opt2.parts[1].param_groups[0] is opt2.param_groups[1]
    muon_steps(cfg, straight, opt, range(3, 6), no_scaling)
    muon_steps(cfg, resumed, opt2, range(3, 6), no_scaling)
    assert all(torch.equal(a, b) for a, b in zip(straight.parameters(), resumed.parameters()))


def test_muon_steps_through_a_grad_scaler(tiny_cfg):
    """float16 runs go through GradScaler.unscale_ and .step: a power-of-two scale and its removal are exact,
    so the scaled step equals the plain one (here on float32, which any CPU can run)."""
    cfg = dataclasses.replace(tiny_cfg, optimizer="muon")
    results = []
    for enabled in (False, True):
        torch.manual_seed(0)
        model = LanguageModel(cfg, len(VOCAB))
        scaler = torch.amp.GradScaler("cpu", enabled=enabled)
        muon_steps(cfg, model, build_optimizer(model, cfg, CPU), range(3), scaler)
        results.append([p.detach().clone() for p in model.parameters()])
    for plain, scaled in zip(*results):
        torch.testing.assert_close(plain, scaled, rtol=0, atol=1e-6)


def muon_updates(optimizer_cls: type, shapes: list[tuple[int, int]], steps: int = 3) -> list[torch.Tensor]:
    """Weights after `steps` Muon updates from fixed gradients, for a tall, a wide and a square matrix."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape, generator=gen)) for shape in shapes]
    opt = optimizer_cls(params, lr=0.02, weight_decay=0.1, momentum=0.95)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return [p.detach() for p in params]


SHAPES = [(48, 16), (16, 48), (32, 32)]


def test_muon_is_torchs_update_with_float32_newton_schulz(monkeypatch):
    """With bfloat16 Newton-Schulz, gptlab's Muon is torch.optim.Muon bit for bit; in float32 (its CPU
    default) it differs from it by bfloat16's rounding only."""
    from training.optim import Muon
    from utils.cpu_probe import probe_half_precision

    probe = probe_half_precision("bfloat16")
    if not probe.usable:
        pytest.skip(f"bfloat16 cannot run on this CPU: {probe.problem}")
    reference = muon_updates(torch.optim.Muon, SHAPES)
    ours = muon_updates(Muon, SHAPES)
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b, atol=2e-3, rtol=0)  # bf16 has 8 bits of mantissa
    monkeypatch.setattr(Muon, "ns_dtype", torch.bfloat16)
    assert all(torch.equal(a, b) for a, b in zip(muon_updates(Muon, SHAPES), reference))


class _Recorder(Tracker):
    def __init__(self) -> None:
        self.scalars: list[tuple[int, str, str | None]] = []

    def log_scalars(self, step: int, scalars: dict[str, float], subset: str | None = None) -> None:
        self.scalars += [(step, name, subset) for name in scalars]


def tiny_trainer(cfg: ModelConfig, tmp_path: Path, logit_scale: float = 1.0) -> Trainer:
    """A Trainer on TINY_TEXT that records what it tracks; logit_scale multiplies the
    LM head (tied to the embedding), as a broken initialization would."""
    tok = CharTokenizer.from_text(TINY_TEXT)
    ids = torch.tensor(tok.encode(TINY_TEXT)).numpy()
    torch.manual_seed(cfg.seed)
    model = LanguageModel(cfg, tok.vocab_size)
    with torch.no_grad():
        model.lm_head.weight.mul_(logit_scale)
    optimizer = build_optimizer(model, cfg, torch.device("cpu"))
    return Trainer(cfg=cfg, raw_model=model, optimizer=optimizer, splits={"train": ids[:6000], "val": ids[6000:]},
                   tokenizer=tok, device=torch.device("cpu"), dtype=torch.float32, run_dir=tmp_path, tracker=_Recorder(),
                   status=RunStatus(tmp_path, enabled=False))


@pytest.mark.parametrize("logit_scale,warns", [(1.0, False), (200.0, True)])
def test_initial_eval_compares_the_loss_with_ln_vocab(tiny_cfg, tmp_path, logit_scale, warns):
    trainer = tiny_trainer(tiny_cfg, tmp_path, logit_scale)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        trainer.initial_eval()
    first, vocab = out.getvalue().splitlines()[0], trainer.raw_model.vocab_size
    assert first.startswith("eval step 0: train loss ") and first.endswith(f"(ln(vocab {vocab}) = {math.log(vocab):.4f})")
    assert ("warning: initial loss" in out.getvalue()) == warns
    assert trainer.tracker.scalars == [(0, "eval_loss", "train"), (0, "eval_loss", "val")]
    assert trainer.best_val_loss == math.inf and not (tmp_path / "artifacts").exists()  # no best, no checkpoint


def test_the_step_0_eval_leaves_training_bit_identical(tiny_cfg, tmp_path):
    cfg = dataclasses.replace(tiny_cfg, dropout=0.1, max_iters=6, eval_interval=3, sample_length=8)
    finals = []
    for at_start in (True, False):
        trainer = tiny_trainer(dataclasses.replace(cfg, eval_at_start=at_start), tmp_path / str(at_start))
        torch.manual_seed(cfg.seed)  # train.py seeds the dropout streams after building the model
        with contextlib.redirect_stdout(io.StringIO()):
            trainer.run(NeverStop())
        finals.append([p.detach().clone() for p in trainer.raw_model.parameters()])
        evals = sorted({step for step, name, _ in trainer.tracker.scalars if name == "eval_loss"})
        assert evals == ([0, 3, 6] if at_start else [3, 6])
    assert all(torch.equal(a, b) for a, b in zip(*finals))


def test_overfit_batches_repeats_the_first_batches(tiny_cfg, monkeypatch):
    from training import step as step_module
    drawn: list[tuple[int, torch.Tensor]] = []

    def recording_get_batch(*args, **kwargs):
        x, y = get_batch(*args, **kwargs)
        drawn.append((kwargs["step"], x))
        return x, y

    monkeypatch.setattr(step_module, "get_batch", recording_get_batch)
    cfg = dataclasses.replace(tiny_cfg, overfit_batches=2)
    model = LanguageModel(cfg, 30)
    optimizer = build_optimizer(model, cfg, torch.device("cpu"))
    tokens = (torch.arange(3000) * 7 % 30).numpy()
    for step in range(5):
        train_step(model, optimizer, tokens, step, cfg, scaler=torch.amp.GradScaler("cpu", enabled=False),
                   ctx=contextlib.nullcontext(), device=torch.device("cpu"))
    assert [step for step, _ in drawn] == [0, 1, 0, 1, 0]
    assert torch.equal(drawn[0][1], drawn[2][1]) and torch.equal(drawn[1][1], drawn[3][1])
    assert not torch.equal(drawn[0][1], drawn[1][1])
    with pytest.raises(ValueError, match=r"overfit_batches: must be >= 0, got -1"):
        dataclasses.replace(tiny_cfg, overfit_batches=-1).validate()


def test_overfit_batches_1_drives_the_loss_near_zero(tiny_cfg):
    cfg = dataclasses.replace(tiny_cfg, overfit_batches=1, learning_rate=3e-3, grad_clip=0.0)
    tok = CharTokenizer.from_text(TINY_TEXT)
    tokens = torch.tensor(tok.encode(TINY_TEXT)).numpy()
    torch.manual_seed(0)
    model = LanguageModel(cfg, tok.vocab_size)
    optimizer = build_optimizer(model, cfg, torch.device("cpu"))
    losses = []
    for step in range(200):
        loss, _ = train_step(model, optimizer, tokens, step, cfg, scaler=torch.amp.GradScaler("cpu", enabled=False),
                             ctx=contextlib.nullcontext(), device=torch.device("cpu"))
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[0] > 3.0 and losses[-1] < 0.05, losses[::20]


def test_the_eta_pace_averages_windows_but_drops_a_warm_up():
    from training.trainer import eta_pace

    assert eta_pace(None, 2.0) == 2.0
    assert eta_pace(2.0, 3.0) == pytest.approx(2.3)  # a slow window on a busy machine moves it a third
    assert eta_pace(2.0, 1.5) == pytest.approx(1.85)
    # compilation made the first window 100x slower than the run's pace: the next window replaces it
    assert eta_pace(1.4, 0.012) == 0.012
