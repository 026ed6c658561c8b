"""Merge configs/*.yaml, legacy config.json, --config files and CLI flags into one validated config.

Precedence, lowest to highest: dataclass defaults < configs/*.yaml (sorted by name) < legacy
config.json (only where configs/ is absent) < --config FILE (may repeat; a bare name means
configs/presets/NAME.yaml) < CLI flags. `--n-layer 6` and `--n_layer=6` both work. Unknown keys and
wrong types are errors that name the key, where it came from, and the closest valid key.

    python train.py --config debug --n-layer 3 --print-config
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import sys
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from parameters import (ARCHITECTURE_KEYS, REGISTRIES, RESUMABLE_KEYS, ModelConfig, _switches, _types, check_values,
                        short)

PROJECT_DIR = Path(__file__).resolve().parent
CONFIG_DIR = PROJECT_DIR / "configs"
MAX_CONFIG_BYTES = 1 << 20


@dataclass
class Parsed:
    config: Any                 # the validated dataclass instance
    files: list[Path]           # config files merged, lowest precedence first
    cli: dict[str, Any]         # the fields set on the command line, typed
    args: argparse.Namespace    # the stage's own flags (e.g. print_config)
    from_files: dict[str, Any] = dataclasses.field(default_factory=dict)  # the files' values, merged
    origins: dict[str, Path] = dataclasses.field(default_factory=dict)    # the file each of those came from
    notes: list[str] = dataclasses.field(default_factory=list)  # what the merge changed, for the stage to print


class Parser(argparse.ArgumentParser):
    """argparse that raises ValueError instead of exiting, so stages report one line and exit 2."""

    def error(self, message: str) -> typing.NoReturn:
        raise ValueError(message)


def read_config_file(path: Path) -> dict[str, Any]:
    """A flat mapping from a .yaml/.yml/.json file; empty files are empty mappings."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise FileNotFoundError(f"config file '{path}' does not exist") from None
    if size > MAX_CONFIG_BYTES:
        raise ValueError(f"config file '{path}' is {size / 1e6:.1f} MB; a config is a few hundred bytes "
                         f"(limit {MAX_CONFIG_BYTES >> 20} MB)")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"config file '{path}' is not UTF-8 (byte {e.start}: {e.reason}); save it as UTF-8") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        first = str(e).strip().splitlines()[0]
        raise ValueError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {first}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of key: value, got {type(data).__name__}")
    if any(not isinstance(k, (str, int, float, bool)) for k in data):  # a YAML complex key
        raise ValueError(f"{path}: keys must be plain names, got {short(next(k for k in data if not isinstance(k, str)))}")
    return data


def default_config_files(config_dir: Path) -> list[Path]:
    """configs/*.yaml, or the legacy config.json beside it where configs/ does not exist."""
    if config_dir.is_dir():
        return sorted(p for p in config_dir.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
    legacy = config_dir.parent / "config.json"
    return [legacy] if legacy.is_file() else []


def resolve_config_arg(spec: str, config_dir: Path | None) -> Path:
    """--config takes a path, or (where the stage has a config_dir) the name of a preset in configs/presets/."""
    path = Path(spec)
    if path.is_file():
        return path
    if config_dir is None:
        raise FileNotFoundError(f"config file '{spec}' does not exist")
    for candidate in (config_dir / "presets" / spec, config_dir / "presets" / f"{spec}.yaml"):
        if candidate.is_file():
            return candidate
    presets = sorted(p.stem for p in (config_dir / "presets").glob("*.yaml"))
    raise FileNotFoundError(
        f"config '{spec}' is neither a file nor a preset; presets: {', '.join(presets) or 'none'}"
    )


def build_parser(cls: type, description: str, add_stage_args: Callable[[argparse.ArgumentParser], None],
                 shown: dict[str, tuple[Any, str]] | None = None, yaml_where: str = "--config FILE") -> Parser:
    """--help generated from the dataclass: one flag per field, in both --a-b and --a_b forms. `shown`
    maps a field to the (value, origin) that will apply, so --help tells what a run will really use."""
    parser = Parser(description=description, allow_abbrev=False,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_stage_args(parser)
    group = parser.add_argument_group(f"{cls.__name__} fields (also settable in YAML: {yaml_where})")
    types, switches = _types(cls), _switches(cls)
    for f in dataclasses.fields(cls):
        names = [f"--{f.name.replace('_', '-')}"] + ([f"--{f.name}"] if "_" in f.name else [])
        typ = types[f.name]
        choices = f.metadata.get("choices")
        meta = "{" + ",".join(choices) + "}" if choices else typ.__name__.upper()
        value, origin = (shown or {}).get(f.name, (f.default, ""))
        help_text = f"{f.metadata.get('help', '')} (default: {short(value)}{', from ' + origin if origin else ''})"
        group.add_argument(*names, dest=f.name, default=argparse.SUPPRESS, metavar=meta, help=help_text,
                           **({"nargs": "?", "const": "true"} if typ is bool or f.name in switches else {}))
    return parser


def _config_files(config_dir: Path | None, specs: list[str]) -> list[Path]:
    """configs/*.yaml (or the legacy config.json) where there is a config_dir, then the --config files."""
    files = default_config_files(config_dir) if config_dir is not None else []
    return files + [resolve_config_arg(spec, config_dir) for spec in specs]


def shown_path(path: Path) -> str:
    """A config file as a user names it: relative to the project where it lies inside it."""
    path = Path(path).resolve()
    return str(path.relative_to(PROJECT_DIR) if path.is_relative_to(PROJECT_DIR) else path)


def _defaults_for_help(cls: type, argv: list[str], config_dir: Path | None) -> dict[str, tuple[Any, str]]:
    """(value, file) of every field a config file sets, as a run with these flags would merge them.
    Only for --help, which must show something even where a file is broken: those are left out."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", action="append", default=[])
    shown: dict[str, tuple[Any, str]] = {}
    try:
        files = _config_files(config_dir, pre.parse_known_args(argv)[0].config)
    except (ValueError, FileNotFoundError):
        return shown
    for path in files:
        try:
            values = check_values(cls, read_config_file(path), str(path))
        except (ValueError, FileNotFoundError):
            continue
        shown.update({k: (v, shown_path(path)) for k, v in values.items()})
    return shown


def parse(cls: type, argv: list[str] | None, description: str, *, config_dir: Path | None = CONFIG_DIR,
          add_stage_args: Callable[[argparse.ArgumentParser], None] = lambda p: None,
          validate: bool = True) -> Parsed:
    """Parse argv into a `cls` instance (validated unless asked not to). config_dir holds the default
    config files and presets; None means none (the stage may still take --config FILE)."""
    argv = sys.argv[1:] if argv is None else argv
    shown = _defaults_for_help(cls, argv, config_dir) if {"-h", "--help"} & set(argv) else None
    where = "configs/*.yaml or --config FILE|PRESET" if config_dir is not None else "--config FILE"
    parser = build_parser(cls, description, add_stage_args, shown, where)
    ns, unknown = parser.parse_known_args(argv)
    if unknown:
        flag = unknown[0].split("=")[0]
        match = difflib.get_close_matches(flag.lstrip("-").replace("-", "_"), _types(cls), n=1, cutoff=0.6)
        hint = f" (did you mean '--{match[0].replace('_', '-')}'?)" if match else ""
        raise ValueError(f"command line: unknown option '{flag}'{hint}; see --help")
    files = _config_files(config_dir, getattr(ns, "config", None) or [])
    from_files: dict[str, Any] = {}
    origins: dict[str, Path] = {}
    for path in files:
        values = check_values(cls, read_config_file(path), str(path))
        from_files.update(values)
        origins.update(dict.fromkeys(values, path))
    # Field flags default to SUPPRESS, so the namespace holds only flags given plus the stage's own.
    types = _types(cls)
    cli = check_values(cls, {k: v for k, v in vars(ns).items() if k in types}, "command line")
    stage_args = argparse.Namespace(**{k: v for k, v in vars(ns).items() if k not in types})
    config = cls(**{**from_files, **cli})
    return Parsed(config.validate() if validate else config, files, cli, stage_args, from_files, origins)


def add_fields(parser: argparse.ArgumentParser, names: tuple[str, ...], cls: type = ModelConfig,
               defaults: dict[str, Any] | None = None) -> None:
    """Flags for a stage that takes some of the config's fields (evaluate.py's --device, prepare_data.py's
    --tokenizer, ...): both spellings, the field's type, help text and default (or the stage's own)."""
    fields, types = {f.name: f for f in dataclasses.fields(cls)}, _types(cls)
    for name in names:
        default = (defaults or {}).get(name, fields[name].default)
        parser.add_argument(f"--{name.replace('_', '-')}", f"--{name}", dest=name, type=types[name], default=default,
                            help=f"{fields[name].metadata['help']} (default {default})")


def add_config_arg(parser: argparse.ArgumentParser) -> None:
    """--config, shared by every stage."""
    parser.add_argument("--config", action="append", metavar="FILE",
                        help="YAML/JSON config merged over configs/*.yaml; a bare name means "
                             "configs/presets/NAME.yaml; may repeat (later wins)")


def add_train_args(parser: argparse.ArgumentParser) -> None:
    """Flags of train.py that are not config fields."""
    add_config_arg(parser)
    parser.add_argument("--print-config", "--print_config", action="store_true",
                        help="print the merged, validated config as YAML and exit")
    parser.add_argument("--resume", metavar="RUN",
                        help="continue runs/<id> (or 'latest') from its newest good checkpoint, in the same "
                             "directory; only flags that keep the past valid may change; or continue a plan: "
                             "runs/plans/<id>")
    parser.add_argument("--sweep-trial", "--sweep_trial", metavar="DIR:N",
                        help="(sweep.py's) train as trial N of the sweep in DIR, reporting each eval to it")
    parser.add_argument("--plan", metavar="FILE",
                        help="run the stages of a plan file (e.g. plans/reverse_words.yaml), each its own run, "
                             "initialised from the one before; other flags apply to every stage")


def load_config(argv: list[str] | None = None, description: str = "", config_dir: Path = CONFIG_DIR,
                add_stage_args: Callable[[argparse.ArgumentParser], None] = add_train_args) -> Parsed:
    """The merged, validated ModelConfig for train.py and profile_model.py. With --resume the run's
    recorded config replaces the files, so validation waits for resume_config()."""
    parsed = parse(ModelConfig, argv, description, config_dir=config_dir, add_stage_args=add_stage_args,
                   validate=False)
    if not getattr(parsed.args, "resume", None):
        parsed.config = fit_to_max_iters(parsed)
        check_registered(parsed.config.validate())
    return parsed


# Step counts that a shorter --max-iters can leave behind: the schedule's lengths, scaled with the run (a
# warmup as long as the run is an error; a decay past its end never reaches min_lr), and an eval interval
# longer than the run, cut to its length (the run evaluates at its end: the ETA then counts that eval).
SCHEDULE_LENGTHS, INTERVALS = ("warmup_iters", "lr_decay_iters"), ("eval_interval",)


def fit_to_max_iters(parsed: Parsed) -> ModelConfig:
    """A --max-iters typed on the command line that is shorter than the files' (a short try of a preset)
    scales the step counts it no longer fits, where they came from a file or a default, and says so in
    parsed.notes. A value typed on the command line is kept as typed, and validate() judges it."""
    cfg, cli = parsed.config, parsed.cli
    planned = parsed.from_files.get("max_iters", ModelConfig.max_iters)
    if "max_iters" not in cli or not 0 < cfg.max_iters < planned:
        return cfg
    changed = {}
    for key in (*SCHEDULE_LENGTHS, *INTERVALS):
        value = getattr(cfg, key)
        limit = cfg.max_iters - 1 if key == "warmup_iters" else cfg.max_iters
        if key in cli or value <= limit:
            continue
        changed[key] = min(value * cfg.max_iters // planned, limit) if key in SCHEDULE_LENGTHS else limit
        changed[key] = max(changed[key], 0 if key in SCHEDULE_LENGTHS else 1)
    if changed:
        where = shown_path(parsed.origins["max_iters"]) if "max_iters" in parsed.origins else "the defaults"
        said = ", ".join(f"{k} {getattr(cfg, k)} -> {v}" for k, v in changed.items())
        parsed.notes.append(f"--max-iters {cfg.max_iters} is shorter than the {planned} planned ({where}): {said}, "
                            "to fit; set them on the command line to choose")
    return dataclasses.replace(cfg, **changed)


def check_registered(cfg: ModelConfig) -> ModelConfig:
    """The keys that name a registered class (arch, tokenizer, optimizer, lr_schedule) must name one; a
    user's own registration counts (validate() imported the `imports` modules), so this is checked
    against the registries, not a fixed list."""
    for registry in REGISTRIES:
        registry.lookup(getattr(cfg, registry.key))
    return cfg


def resume_config(recorded: dict[str, Any], cli: dict[str, Any], source: str) -> ModelConfig:
    """The config of a resumed run: the recorded one, with CLI changes only where they keep the
    past valid. An extended max_iters keeps the LR schedule the run was recorded with. A key recorded
    before it existed takes its default, which is what that run did (e.g. optimizer adamw)."""
    recorded = {**ModelConfig().to_dict(), **check_values(ModelConfig, recorded, source)}
    changed = sorted(k for k, v in cli.items() if recorded.get(k) != v and k not in RESUMABLE_KEYS)
    if changed:
        key = changed[0]
        raise ValueError(f"--{key.replace('_', '-')} cannot change when resuming (the run was trained with "
                         f"{key}={recorded.get(key)!r}); start a new run, or fine-tune with --init-from. "
                         f"Resumable: {', '.join(RESUMABLE_KEYS)}")
    values = {**recorded, **cli}
    if values["max_iters"] != recorded["max_iters"] and not recorded["lr_decay_iters"]:
        values["lr_decay_iters"] = recorded["max_iters"]
    return check_registered(ModelConfig(**values).validate())


def rescale_batch(cfg: ModelConfig, saved_world: int, world: int, notes: list[str]) -> ModelConfig:
    """Resuming on another number of ranks keeps the global batch: batch_size is per rank (said in notes)."""
    if saved_world == world:
        return cfg
    global_batch = cfg.batch_size * saved_world
    if global_batch % world:
        raise ValueError(f"the run was saved on {saved_world} rank(s) with a global batch of {global_batch} "
                         f"sequences, which {world} ranks cannot split evenly; resume on a divisor of it")
    notes.append(f"resuming on {world} rank(s) a run saved on {saved_world}: batch_size {cfg.batch_size} -> "
                 f"{global_batch // world} per rank, keeping the global batch of {global_batch}")
    return ModelConfig(**{**cfg.to_dict(), "batch_size": global_batch // world}).validate()


def init_config(cfg: ModelConfig, source: ModelConfig, cli: dict[str, Any]) -> ModelConfig:
    """Fine-tuning (--init-from) keeps the source model's architecture and tokenizer; asking on the
    command line for another one is an error (config files' values are simply overridden)."""
    keys = (*ARCHITECTURE_KEYS, "tokenizer")
    for key in keys:
        if key in cli and cli[key] != getattr(source, key):
            raise ValueError(f"--{key.replace('_', '-')} {cli[key]} conflicts with --init-from, whose model has "
                             f"{key}={getattr(source, key)!r}; drop the flag")
    return ModelConfig(**{**cfg.to_dict(), **{k: getattr(source, k) for k in keys}}).validate()


def config_yaml(config: Any, files: list[Path], notes: list[str] = ()) -> str:
    """The merged config as YAML, headed by the files it came from and what the merge changed (for
    --print-config)."""
    header = "# merged from: defaults" + "".join(f" < {p}" for p in files) + " < command line\n"
    header += "".join(f"# {note}\n" for note in notes)
    return header + yaml.safe_dump(dataclasses.asdict(config), sort_keys=False, allow_unicode=True)
