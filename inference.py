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
from rundir.export import load_for_generation
from rundir.meta import code_note
from tokenizer import TextStream
from utils.cli import run_main
from utils.device import resolve_device

DEFAULT_PROMPT = GenerateConfig.__dataclass_fields__["prompt"].default


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
    """Yield text as tokens arrive, never split inside a character (TextStream)."""
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    text = TextStream(tokenizer)
    stop = tokenizer.eot_id if cfg.stop_at_end_of_text else None
    for token in model.generate_stream(idx, cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                                       top_p=cfg.top_p, generator=generator):
        if int(token[0, 0]) == stop:  # the model ended the document
            break
        if piece := text.push(int(token[0, 0])):
            yield piece
    if piece := text.flush():
        yield piece


def _encodes(tokenizer, text: str) -> bool:
    try:
        return bool(tokenizer.encode(text))
    except ValueError:
        return False


def main(argv: list[str] | None = None) -> int:
    cfg = parse(GenerateConfig, argv, __doc__, config_dir=None, add_stage_args=add_config_arg).config
    device = resolve_device(cfg.device)
    model, tokenizer, trained, loaded, run = load_for_generation(cfg.run, cfg.checkpoint, cfg.runs_dir, device)
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
