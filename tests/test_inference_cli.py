"""inference.py end to end: latest-run lookup, streaming, determinism, greedy equality, errors."""

from __future__ import annotations

from pathlib import Path

import torch

import inference
from conftest import call_main, run_cli, user_error
from rundir.export import load_export


def generate(run_dir: Path, *args: str):
    return call_main(inference.main, "--runs-dir", str(run_dir.parent), "--device", "cpu", *args)


def test_latest_run_is_used_by_default(trained_run: Path):
    res = generate(trained_run, "--max-new-tokens", "30", "--prompt", "All:")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("All:") and str(trained_run) in res.stderr


def test_greedy_output_equals_the_model(trained_run: Path):
    res = generate(trained_run, "--run", str(trained_run), "--prompt", "Speak", "--temperature", "0",
                   "--max-new-tokens", "40")
    assert res.returncode == 0, res.stderr
    model, tok, _ = load_export(trained_run)
    ids = torch.tensor([tok.encode("Speak")])
    expected = tok.decode(model.generate(ids, 40, temperature=0.0)[0].tolist())
    assert res.stdout == expected + "\n"


def test_same_seed_same_text_and_num_samples(trained_run: Path):
    args = ("--prompt", "All:", "--max-new-tokens", "25", "--seed", "3", "--num-samples", "2", "--top-p", "0.9")
    first, second = generate(trained_run, *args), generate(trained_run, *args)
    assert first.returncode == 0 and first.stdout == second.stdout
    assert first.stdout.count("All:") >= 2 and "-" * 40 in first.stdout


def test_prompt_file(trained_run: Path, tmp_path: Path):
    prompt = tmp_path / "p.txt"
    prompt.write_text("First Citizen:\n")
    res = generate(trained_run, "--prompt-file", str(prompt), "--max-new-tokens", "5")
    assert res.returncode == 0 and res.stdout.startswith("First Citizen:\n")


def test_unknown_character_is_one_line_error(trained_run: Path):
    """The CLI contract, once through a real process: exit 2 and an `error:` line, no traceback."""
    res = run_cli("inference.py", "--runs-dir", str(trained_run.parent), "--device", "cpu", "--prompt", "Zebra")
    assert res.returncode == 2 and "'Z'" in res.stderr and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("error:")


def test_run_without_export_and_empty_runs_dir(tmp_path: Path, trained_run: Path):
    with user_error("no run with an export", kind=FileNotFoundError):
        inference.main(["--runs-dir", str(tmp_path / "none")])
    half = tmp_path / "runs" / "20250101_000000_half"
    (half / "meta").mkdir(parents=True)
    with user_error("has no export", kind=FileNotFoundError):
        inference.main(["--run", str(half)])


def test_sampling_from_a_checkpoint_instead_of_the_export(trained_run: Path):
    export = generate(trained_run, "--run", str(trained_run), "--prompt", "All:", "--temperature", "0",
                      "--max-new-tokens", "30")
    last = generate(trained_run, "--run", str(trained_run), "--checkpoint", "latest", "--prompt", "All:",
                    "--temperature", "0", "--max-new-tokens", "30")
    assert "| checkpoint step_000020 |" in last.stderr and "| export |" in export.stderr
    assert last.stdout == export.stdout  # the final checkpoint holds the exported weights
    by_path = generate(trained_run, "--run", str(trained_run / "artifacts" / "checkpoints" / "step_000010"),
                       "--prompt", "All:", "--max-new-tokens", "5")
    assert "| checkpoint step_000010 |" in by_path.stderr
    with user_error("has no checkpoint '99' (it has: step_000010, step_000020); use best, latest or one of those",
                    kind=FileNotFoundError):
        inference.main(["--run", str(trained_run), "--checkpoint", "99"])
    # a path to a checkpoint that rotation removed names the ones that exist
    with user_error("has no checkpoint 'step_001000' (it has: step_000010, step_000020)", kind=FileNotFoundError):
        inference.main(["--run", str(trained_run / "artifacts" / "checkpoints" / "step_001000")])


def test_a_config_file_sets_the_flags(trained_run: Path, tmp_path: Path):
    config = tmp_path / "sampling.yaml"
    config.write_text("temperature: 0\nmax_new_tokens: 12\nprompt: 'All:'\n")
    res = generate(trained_run, "--config", str(config))
    greedy = generate(trained_run, "--prompt", "All:", "--temperature", "0", "--max-new-tokens", "12")
    assert res.returncode == 0 and res.stdout == greedy.stdout
    with user_error("config file", "does not exist", kind=FileNotFoundError):
        inference.main(["--config", str(tmp_path / "missing.yaml")])


def test_the_default_prompt_falls_back_to_the_one_training_sampled_from(tmp_path: Path):
    """A char model of a corpus without newlines cannot take the default prompt '\\n'."""
    import train
    corpus = tmp_path / "one_line.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog " * 60)
    call_main(train.main, "--config", "debug", "--data", str(corpus), "--runs-dir", str(tmp_path / "runs"),
              "--data-dir", str(tmp_path / "data"), "--max-iters", "2", "--sample-length", "0")
    res = call_main(inference.main, "--runs-dir", str(tmp_path / "runs"), "--max-new-tokens", "5")
    assert res.returncode == 0 and res.stdout.startswith("t")


def test_long_generations_keep_only_the_window(trained_run: Path):
    """Only the last block_size tokens are kept: 20x block_size costs no more memory than one."""
    import tracemalloc
    model, tok, cfg = load_export(trained_run)
    ids = torch.tensor([tok.encode("All:")])
    tracemalloc.start()
    for _ in model.generate_stream(ids, 20 * cfg.block_size, temperature=1.0):
        pass
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1_000_000  # Python-side bookkeeping only; the window tensors live in torch


def test_a_sample_ends_at_end_of_text_unless_told_otherwise() -> None:
    """A model trained on documents ends one with the end-of-text id: the sample stops there."""
    import torch

    from inference import stream_text
    from parameters import GenerateConfig
    from tokenizer import CharTokenizer

    tok = CharTokenizer(["a", "b", "c"], end_of_text=True)

    class Scripted:  # a model that "samples" a b <eot> c
        def generate_stream(self, idx, n, **kwargs):
            yield from (torch.tensor([[t]]) for t in [0, 1, tok.eot_id, 2])

    def sample(**flags) -> str:
        cfg = GenerateConfig(**flags).validate()
        return "".join(stream_text(Scripted(), tok, [0], cfg, torch.device("cpu"), torch.Generator()))

    assert sample() == "ab"
    assert sample(stop_at_end_of_text=False) == "ab<|endoftext|>c"
