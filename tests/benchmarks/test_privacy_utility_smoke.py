"""Smoke test of benchmarks/privacy_utility.py: the whole code path on a tiny random LLaMA and synthetic data.

No timing or quality assertions: only that every row runs through the project's functions and that the
JSON and markdown outputs are well formed.
"""

import importlib.util
import json
import math
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "privacy_utility.py"


def _load():
    spec = importlib.util.spec_from_file_location("privacy_utility_bench", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve their module's annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


def test_tiny_run_writes_json_and_markdown(tmp_path):
    bench = _load()
    args = ["--tiny", "--work-dir", str(tmp_path / "work"), "--results-dir", str(tmp_path / "results"), "--no-plot"]
    result = bench.main(args)

    data = json.loads((tmp_path / "results" / "privacy_utility_tiny.json").read_text())
    assert data["complete"] is True
    assert data["meta"]["profile"] == "tiny"
    names = {(r["task"], r["name"]) for r in data["rows"]}
    expected = {s.name for s in bench.row_specs(bench.PROFILES["tiny"])}
    assert names == {(t, n) for t in ("shakespeare", "analogy") for n in expected}
    keys = {
        "method",
        "task",
        "n_adapter",
        "alpha",
        "beta",
        "emulator_params",
        "emulator_bytes",
        "metric",
        "zero_shot",
        "emulator_zero_shot",
        "emulator_ft",
        "plug_in",
        "full_ft",
        "seconds",
    }
    for r in data["rows"]:
        assert keys <= r.keys()
        assert r["metric"] == ("perplexity" if r["task"] == "shakespeare" else "accuracy")
        if r["method"] in ("uniform_layerdrop", "scaleot"):
            assert r["emulator_params"] > 0 and r["emulator_bytes"] > 0
            for k in ("emulator_zero_shot", "emulator_ft", "plug_in"):
                assert isinstance(r[k], float) and math.isfinite(r[k])
        if r["method"] == "full_ft":
            assert isinstance(r["full_ft"], float)
    assert 0 < data["stage1"]["trainable_fraction"] < 1
    assert data["ot_distillation"]["seconds_per_step"] > 0 and data["ot_distillation"]["trainable_params"] > 0
    assert {t["status"] for t in data["targets"]} <= {"met", "missed", None}
    assert result["complete"]

    md = (tmp_path / "results" / "privacy_utility_tiny.md").read_text()
    assert "| Method |" in md and "Targets" in md and "OT uniform LayerDrop" in md

    # A second run reuses every cache (stage 1, emulators, rows) and produces the same rows.
    again = bench.main(args)
    assert [r["plug_in"] for r in again["rows"]] == [r["plug_in"] for r in data["rows"]]
