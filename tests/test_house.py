"""The house's rules, read from the code's own imports: stages on top, faces and rooms below them,
utils/ at the bottom importing nothing of gptlab; no stage imports another; no circle between rooms;
the run directory's file names spelled in rundir/ only."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

STAGES = {"train", "prepare_data", "evaluate", "inference", "profile_model", "runs", "sweep", "serve"}
# The lower floor: what the model and the data are made of; none of it reads or writes run directories.
LOWER = {"parameters", "tokenizer", "architectures", "model", "corpus", "data"}
NOT_CODE = {"tests", "benchmarks", "runs", "data", ".venv", ".git"}


def modules() -> dict[str, Path]:
    """gptlab's modules by dotted name (a package by its own name)."""
    found = {}
    for path in REPO.rglob("*.py"):
        rel = path.relative_to(REPO)
        if rel.parts[0] not in NOT_CODE and not any(p.startswith(".") for p in rel.parts):
            found[".".join(rel.with_suffix("").parts).removesuffix(".__init__")] = path
    return found


def imports(path: Path, ours: set[str]) -> set[str]:
    """The gptlab modules a file imports, anywhere in it (a function's lazy import counts too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names if a.name.split(".")[0] in ours}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] in ours:
            names.add(node.module)
    return names


def room_graph() -> dict[str, set[str]]:
    """Each top-level file or folder (a room) -> the rooms it imports."""
    mods = modules()
    ours = {name.split(".")[0] for name in mods}
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        room = name.split(".")[0]
        graph.setdefault(room, set()).update(m.split(".")[0] for m in imports(path, ours) if m.split(".")[0] != room)
    return graph


def test_utils_imports_nothing_of_gptlab_and_nothing_imports_a_stage():
    graph = room_graph()
    assert graph["utils"] == set()
    for room, deps in graph.items():
        assert not deps & STAGES, f"{room} imports the stage(s) {deps & STAGES}"
    for room in LOWER:
        assert not graph.get(room, set()) & ({"rundir", "training", "evaluation", "config"} | STAGES), room


def test_no_room_reaches_back_up_to_one_that_imports_it():
    graph = room_graph()
    state: dict[str, str] = {}

    def visit(room: str, path: list[str]) -> None:
        state[room] = "open"
        for dep in graph.get(room, ()):
            assert state.get(dep) != "open", f"import circle: {' -> '.join(path + [room, dep])}"
            if dep not in state:
                visit(dep, path + [room])
        state[room] = "done"

    for room in sorted(graph):
        if room not in state:
            visit(room, [])


def test_only_rundir_spells_the_run_directorys_files_and_train_py_stays_a_table_of_contents():
    for name, path in modules().items():
        text = path.read_text(encoding="utf-8")
        if not name.startswith("rundir"):
            for spelled in ('"status.json"', '"full_config.json"', '"artifacts"', '"metrics.jsonl"'):
                assert spelled not in text, f"{path.relative_to(REPO)} spells {spelled}: use rundir.run_dir.RunDir"
    assert len((REPO / "train.py").read_text().splitlines()) < 300


def test_the_stages_start_without_importing_fsdp_or_dcp():
    """torch.distributed.checkpoint, fsdp and DTensor cost every stage about a second of start-up (2.57 -> 1.92 s
    for `train.py --help`); only fsdp runs and their checkpoints import them, where they are used."""
    import subprocess
    import sys
    heavy = ("torch.distributed.tensor", "torch.distributed.checkpoint", "torch.distributed.fsdp")
    code = ("import sys; import train, inference, evaluate, prepare_data, profile_model, runs, sweep; "
            f"print([m for m in {heavy!r} if m in sys.modules])")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"
