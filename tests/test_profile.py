"""profile_model.py end to end: the report, the trace, the JSON figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_cli


def test_profile_debug_preset(tmp_path: Path, tiny_corpus: Path):
    res = run_cli("profile_model.py", "--config", "debug", "--data", str(tiny_corpus), "--device", "cpu",
                  "--data-dir", str(tmp_path / "data"), "--steps", "2", "--warmup-steps", "1",
                  "--out-dir", str(tmp_path / "profiles"))
    assert res.returncode == 0, res.stderr
    figures = json.loads(res.stdout.strip().splitlines()[-1])
    assert figures["tokens_per_sec"] > 0 and 0 < figures["mfu"] < 1.5
    assert sum(figures["phases"].values()) == pytest.approx(1.0, abs=1e-6)
    assert figures["phases"]["forward"] > 0 and figures["phases"]["backward"] > 0
    assert figures["op_kinds"]["linear/matmul"] > 0 and figures["op_kinds"]["attention"] > 0
    out = Path(figures["out_dir"])
    assert json.loads((out / "trace.json").read_text())["traceEvents"]
    assert "share of step time" in (out / "report.txt").read_text()
    for word in ("forward", "backward", "optimizer", "attention", "linear/matmul", "MFU"):
        assert word in res.stdout
