"""Generate text from a trained run's export, streaming tokens as they are sampled.

    python inference.py                                   # newest run that has an export
    python inference.py --run runs/<id> --prompt "ROMEO:" --max-new-tokens 300 --temperature 0.8
    python inference.py --prompt-file prompt.txt --num-samples 3 --top-p 0.9
    python inference.py --run runs/<id> --checkpoint best            # or latest, or step_2000
    python inference.py --config sampling.yaml                      # any of the flags below, as YAML
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterator

import torch

from config import PROJECT_DIR, add_config_arg, parse
from parameters import GenerateConfig
from rundir.checkpoint import checkpoint_by_path, find_checkpoint
from rundir.export import load_checkpoint_model, load_export
from rundir.lock import run_state
from rundir.meta import code_note
from rundir.run_dir import RunDir, resolve_run
from utils.cli import run_main
from utils.device import resolve_device

DEFAULT_PROMPT = GenerateConfig.__dataclass_fields__["prompt"].default
MAX_HELD_TOKENS = 8  # a UTF-8 character is at most 4 bytes; more tokens than this cannot still be one


def read_prompt(cfg: GenerateConfig) -> str:
    if cfg.prompt_file:
        path = Path(cfg.prompt_file)
        if not path.is_file():
            raise FileNotFoundError(f"prompt file '{path}' does not exist")
        text = path.read_text(encoding="utf-8")
    else:
        text = cfg.prompt
    if not text:
        raise ValueError("the prompt is empty: pass --prompt TEXT or --prompt-file FILE with at least one character")
    return text


def stream_text(model, tokenizer, ids: list[int], cfg: GenerateConfig, device: torch.device,
                generator: torch.Generator) -> Iterator[str]:
    """Yield text as tokens arrive, decoding only the new ones (a long generation stays linear).
    A GPT-2 token can end inside a multi-byte character, so tokens are held back until they decode
    cleanly (no trailing U+FFFD), or until a few more show that the bytes really are invalid."""
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    pending: list[int] = []
    stop = tokenizer.eot_id if cfg.stop_at_end_of_text else None
    for token in model.generate_stream(idx, cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                                       top_p=cfg.top_p, generator=generator):
        if int(token[0, 0]) == stop:  # the model ended the document
            break
        pending.append(int(token[0, 0]))
        text = tokenizer.decode(pending)
        if not text.endswith("\ufffd") or len(pending) >= MAX_HELD_TOKENS:
            yield text
            pending = []
    if pending:
        yield tokenizer.decode(pending)


def load_model(cfg: GenerateConfig, device: torch.device):
    """(model, tokenizer, its training config, what was loaded, its run): the run's export, or one of its
    checkpoints, which is how steps are compared (--checkpoint best, or --run .../checkpoints/step_N)."""
    if found := checkpoint_by_path(Path(cfg.run), cfg.runs_dir):
        run, ckpt = found
    elif cfg.checkpoint:
        run = resolve_run(cfg.run, cfg.runs_dir, need_export=False)
        ckpt = find_checkpoint(run, cfg.checkpoint)
    else:
        run = resolve_run(cfg.run, cfg.runs_dir)
        return (*load_export(run.path, device), _describe(run, "export"), run)
    return (*load_checkpoint_model(ckpt, device), _describe(run, f"checkpoint {ckpt.name}"), run)


def _encodes(tokenizer, text: str) -> bool:
    try:
        return bool(tokenizer.encode(text))
    except ValueError:
        return False


def _describe(run: RunDir, what: str) -> str:
    state = run_state(run.path)
    ended = "" if state.state == "completed" else f" ({state.state}{': ' + state.detail if state.detail else ''})"
    return f"{run}{ended} | {what}"


def main(argv: list[str] | None = None) -> int:
    cfg = parse(GenerateConfig, argv, __doc__, config_dir=None, add_stage_args=add_config_arg).config
    device = resolve_device(cfg.device)
    model, tokenizer, trained, loaded, run = load_model(cfg, device)
    if note := code_note(run.path, PROJECT_DIR):
        print(note, file=sys.stderr)
    prompt = read_prompt(cfg)
    if not cfg.prompt_file and cfg.prompt == DEFAULT_PROMPT and not _encodes(tokenizer, prompt):
        # A corpus without newlines: the prompt its training samples used (else its first character).
        prompt = next(p for p in (trained.sample_prompt, tokenizer.decode([0])) if _encodes(tokenizer, p))
    ids = tokenizer.encode(prompt)  # an unknown character is a ValueError that names it
    print(f"# {loaded} | {model.num_params() / 1e6:.2f}M parameters | {device}", file=sys.stderr)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    for i in range(cfg.num_samples):
        if i:
            print("\n" + "-" * 40)
        sys.stdout.write(prompt)
        for piece in stream_text(model, tokenizer, ids, cfg, device, generator):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    run_main(main)
