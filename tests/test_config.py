"""Config: precedence, flag forms, type checks, suggestions, every validation rule, shipped files."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

import train
from config import CONFIG_DIR, load_config, parse
from conftest import REPO, call_main, run_cli
from parameters import GenerateConfig, ModelConfig, ServeConfig


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    write(tmp_path / "configs" / "model.yaml", "n_layer: 3\nn_embd: 96\n")
    write(tmp_path / "configs" / "train.yaml", "max_iters: 500\n")
    write(tmp_path / "configs" / "presets" / "big.yaml", "n_layer: 5\nn_head: 6\n")
    return tmp_path / "configs"


def test_precedence_defaults_files_presets_cli(config_dir: Path, tmp_path: Path):
    assert load_config([], config_dir=tmp_path / "absent").config == ModelConfig()
    cfg = load_config([], config_dir=config_dir).config
    assert (cfg.n_layer, cfg.n_embd, cfg.max_iters, cfg.n_head) == (3, 96, 500, ModelConfig.n_head)
    cfg = load_config(["--config", "big"], config_dir=config_dir).config
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd) == (5, 6, 96)
    extra = write(tmp_path / "extra.yaml", "n_layer: 8\n")
    cfg = load_config(["--config", "big", "--config", str(extra)], config_dir=config_dir).config
    assert cfg.n_layer == 8  # later --config wins
    cfg = load_config(["--config", "big", "--config", str(extra), "--n-layer", "2"], config_dir=config_dir).config
    assert cfg.n_layer == 2  # CLI beats every file


@pytest.mark.parametrize("argv, message", [
    (["--tokenizer", "bep"], "tokenizer: 'bep' is not registered (did you mean 'bpe'?); choose one of char, gpt2, bpe"),
    (["--arch", "lama"], "arch: 'lama' is not registered (did you mean 'llama'?); choose one of gpt2, llama"),
    (["--optimizer", "adam"], "optimizer: 'adam' is not registered (did you mean 'adamw'?)"),
    (["--lr-schedule", "cos"], "lr_schedule: 'cos' is not registered"),
])
def test_names_must_be_registered(argv, message, tmp_path: Path):
    with pytest.raises(ValueError) as e:
        load_config(argv, config_dir=tmp_path)
    assert message in str(e.value)


def test_legacy_config_json_only_where_configs_absent(tmp_path: Path):
    write(tmp_path / "config.json", json.dumps({"n_layer": 7, "learning_rate": 0.002}))
    parsed = load_config([], config_dir=tmp_path / "configs")
    assert (parsed.config.n_layer, parsed.config.learning_rate) == (7, 0.002)
    assert parsed.files == [tmp_path / "config.json"]
    write(tmp_path / "configs" / "model.yaml", "n_layer: 3\n")
    assert load_config([], config_dir=tmp_path / "configs").config.n_layer == 3


@pytest.mark.parametrize("argv", [["--n-layer", "6"], ["--n_layer", "6"], ["--n-layer=6"], ["--n_layer=6"]])
def test_flag_forms(argv, tmp_path: Path):
    assert load_config(argv, config_dir=tmp_path).config.n_layer == 6


@pytest.mark.parametrize("argv,key,expected", [
    (["--bias"], "bias", True), (["--bias", "0"], "bias", False), (["--aim_logging=yes"], "aim_logging", True),
    (["--torch-compile"], "torch_compile", "true"), (["--torch-compile", "off"], "torch_compile", "false"),
    (["--torch_compile=yes"], "torch_compile", "true"), (["--torch-compile", "auto"], "torch_compile", "auto"),
    ([], "torch_compile", "auto"),
])
def test_bool_and_auto_flags(argv, key, expected, tmp_path: Path):
    assert getattr(load_config(argv, config_dir=tmp_path).config, key) == expected


@pytest.mark.parametrize("text,expected", [("true", "true"), ("no", "false"), ("0", "false"), ("auto", "auto")])
def test_auto_switch_takes_yaml_booleans(text, expected, tmp_path: Path):
    write(tmp_path / "configs" / "t.yaml", f"torch_compile: {text}\n")  # true is a YAML bool; auto a string
    assert load_config([], config_dir=tmp_path / "configs").config.torch_compile == expected


def test_auto_switch_rejects_other_words(tmp_path: Path):
    with pytest.raises(ValueError, match="torch_compile: 'fast' is not one of auto, true, false"):
        load_config(["--torch-compile", "fast"], config_dir=tmp_path)


def test_yaml_scientific_notation_without_dot_is_a_float(tmp_path: Path):
    write(tmp_path / "configs" / "t.yaml", "learning_rate: 6e-4\nmin_lr: 6e-5\n")
    cfg = load_config([], config_dir=tmp_path / "configs").config
    assert cfg.learning_rate == pytest.approx(6e-4) and isinstance(cfg.learning_rate, float)


def test_unknown_file_key_names_file_and_closest(config_dir: Path):
    bad = write(config_dir / "bad.yaml", "n_layers: 3\n")
    with pytest.raises(ValueError) as e:
        load_config([], config_dir=config_dir)
    assert str(bad) in str(e.value) and "'n_layers'" in str(e.value) and "did you mean 'n_layer'" in str(e.value)


def test_unknown_cli_flag_suggests(tmp_path: Path):
    with pytest.raises(ValueError, match=r"unknown option '--n-layers' \(did you mean '--n-layer'\?\)"):
        load_config(["--n-layers", "3"], config_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown option '--zzz'; see --help"):
        load_config(["--zzz"], config_dir=tmp_path)


@pytest.mark.parametrize("text,message", [
    ("n_layer: four\n", "n_layer: expected an integer, got 'four'"),
    ("dropout: high\n", "dropout: expected a number"),
    ("bias: maybe\n", "bias: expected true or false"),
    ("run_tag: 12\n", "run_tag: expected a string"),
    ("- a\n- b\n", "expected a mapping"),
    ("n_layer: [\n", "not valid YAML"),
])
def test_wrong_types_name_key_and_file(text, message, tmp_path: Path):
    path = write(tmp_path / "configs" / "x.yaml", text)
    with pytest.raises(ValueError) as e:
        load_config([], config_dir=tmp_path / "configs")
    assert message in str(e.value) and str(path) in str(e.value)


def test_cli_type_error_names_the_command_line(tmp_path: Path):
    with pytest.raises(ValueError, match="command line: batch_size: expected an integer, got '1.5'"):
        load_config(["--batch-size", "1.5"], config_dir=tmp_path)


@pytest.mark.parametrize("overrides,message", [
    ({"n_embd": 100, "n_head": 3}, "n_embd: 100 is not divisible by n_head=3"),
    ({"dropout": 1.0}, "dropout: must be in [0, 1)"),
    ({"dropout": -0.1}, "dropout: must be in [0, 1)"),
    ({"batch_size": 0}, "batch_size: must be > 0"),
    ({"block_size": -1}, "block_size: must be > 0"),
    ({"n_layer": 0}, "n_layer: must be > 0"),
    ({"grad_accum_steps": 0}, "grad_accum_steps: must be > 0"),
    ({"max_iters": 0}, "max_iters: must be > 0"),
    ({"eval_iters": 0}, "eval_iters: must be > 0"),
    ({"warmup_iters": 2000, "max_iters": 2000}, "warmup_iters: 2000 must be < max_iters=2000"),
    ({"learning_rate": 0.0}, "learning_rate: must be > 0"),
    ({"min_lr": 0.1, "learning_rate": 0.01}, "min_lr: 0.1 must be <= learning_rate=0.01"),
    ({"val_fraction": 0.0}, "val_fraction: must be in (0, 1)"),
    ({"val_fraction": 1.0}, "val_fraction: must be in (0, 1)"),
    ({"beta2": 1.0}, "beta2: must be in [0, 1)"),
    ({"weight_decay": -1.0}, "weight_decay: must be >= 0"),
    ({"grad_clip": -1.0}, "grad_clip: must be >= 0"),
    ({"histogram_interval": -5}, "histogram_interval: must be >= 0"),
    ({"device": "tpu"}, "device: 'tpu' is not auto, cpu, cuda, cuda:N or mps"),
    ({"dtype": "fp8"}, "dtype: 'fp8' is not one of auto, float32, bfloat16, float16"),
    ({"n_kv_head": 3}, "n_kv_head: 3 must be 0 (= n_head) or divide n_head=4"),
    ({"decay_fraction": 0.0}, "decay_fraction: must be in (0, 1]"),
    ({"mlp_ratio": 0.001}, "mlp_ratio: 0.001 x n_embd=128 leaves no hidden units"),
    ({"run_tag": "a/b"}, "run_tag: 'a/b' must be non-empty"),
    ({"run_tag": ""}, "run_tag: '' must be non-empty"),
])
def test_each_validation_rule(overrides, message):
    with pytest.raises(ValueError) as e:
        ModelConfig(**overrides).validate()
    assert message in str(e.value)


def test_all_problems_reported_together():
    with pytest.raises(ValueError) as e:
        ModelConfig(n_embd=100, n_head=3, dropout=2.0, batch_size=0).validate()
    assert all(k in str(e.value) for k in ("n_embd:", "dropout:", "batch_size:"))


def test_every_field_has_help_and_type():
    for cls in (ModelConfig, GenerateConfig, ServeConfig):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help text"


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.rglob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path: Path):
    parsed = load_config(["--config", str(path)])
    assert path in parsed.files


def test_shipped_default_recipe():
    cfg = load_config([]).config
    assert (cfg.tokenizer, cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size) == ("char", 4, 4, 128, 64)
    assert (cfg.batch_size, cfg.max_iters, cfg.dropout) == (12, 2000, 0.0)


def test_missing_preset_lists_presets():
    with pytest.raises(FileNotFoundError, match="presets: debug, gpt2_small, shakespeare_char"):
        load_config(["--config", "nope"])


def test_generate_config_parses_without_config_files():
    cfg = parse(GenerateConfig, ["--top-p", "0.9", "--num_samples=2"], "", config_dir=None).config
    assert (cfg.top_p, cfg.num_samples, cfg.temperature) == (0.9, 2, 0.8)
    with pytest.raises(ValueError, match="top_p: must be in"):
        parse(GenerateConfig, ["--top-p", "0"], "", config_dir=None)


def test_cli_help_and_print_config(capsys: pytest.CaptureFixture):
    with pytest.raises(SystemExit) as exited:  # argparse exits after --help
        train.main(["--help"])
    assert exited.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())  # as wrapped for any terminal width
    for f in dataclasses.fields(ModelConfig):
        assert f"--{f.name.replace('_', '-')}" in help_text
    assert "transformer blocks" in help_text
    res = call_main(train.main, "--config", "debug", "--n-layer", "3", "--print-config")
    assert res.returncode == 0, res.stderr
    printed = yaml.safe_load(res.stdout)
    expected = load_config(["--config", "debug", "--n-layer", "3"]).config.to_dict()
    assert printed == expected
    assert "configs/presets/debug.yaml" in res.stdout.splitlines()[0]


def test_cli_config_error_is_one_line_exit_2():
    """The CLI contract, once through a real process: a ValueError from the config."""
    res = run_cli("train.py", "--n-layer", "x", cwd=REPO)
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "n_layer: expected an integer" in res.stderr
    assert "Traceback" not in res.stderr


def test_a_shorter_max_iters_on_the_command_line_scales_what_the_files_no_longer_fit(tmp_path: Path):
    preset = write(tmp_path / "long.yaml", "max_iters: 5000\nwarmup_iters: 100\nlr_decay_iters: 4000\n"
                                           "eval_interval: 250\n")
    parsed = load_config(["--config", str(preset), "--max-iters", "30"], config_dir=tmp_path / "absent")
    cfg = parsed.config
    # 100 and 4000 of 5000 steps: 0 and 24 of 30 (rounded down); the eval interval is cut to the run
    assert (cfg.max_iters, cfg.warmup_iters, cfg.lr_decay_iters, cfg.eval_interval) == (30, 0, 24, 30)
    (note,) = parsed.notes
    assert note == (f"--max-iters 30 is shorter than the 5000 planned ({preset}): warmup_iters 100 -> 0, "
                    "lr_decay_iters 4000 -> 24, eval_interval 250 -> 30, to fit; set them on the command line to "
                    "choose")
    # what fits is kept; what was typed is kept as typed, and judged
    cfg = load_config(["--config", str(preset), "--max-iters", "200", "--eval-interval", "500"],
                      config_dir=tmp_path / "absent").config
    assert (cfg.warmup_iters, cfg.lr_decay_iters, cfg.eval_interval) == (100, 160, 500)
    with pytest.raises(ValueError, match="warmup_iters: 100 must be < max_iters=30"):
        load_config(["--config", str(preset), "--max-iters", "30", "--warmup-iters", "100"],
                    config_dir=tmp_path / "absent")
    # a longer run, or max_iters and warmup both from files: nothing is scaled
    parsed = load_config(["--config", str(preset), "--max-iters", "9000"], config_dir=tmp_path / "absent")
    assert parsed.config.warmup_iters == 100 and not parsed.notes
    short = write(tmp_path / "short.yaml", "max_iters: 50\n")
    with pytest.raises(ValueError, match="warmup_iters: 100 must be < max_iters=50"):
        load_config(["--config", str(short)], config_dir=tmp_path / "absent")


def test_every_preset_takes_a_short_max_iters(tmp_path: Path):
    for preset in sorted((CONFIG_DIR / "presets").glob("*.yaml")):
        cfg = load_config(["--config", str(preset), "--max-iters", "3"]).config
        assert cfg.max_iters == 3 and cfg.warmup_iters < 3 and cfg.eval_interval <= 3, preset.name
