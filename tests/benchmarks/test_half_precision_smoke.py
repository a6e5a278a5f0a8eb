"""Smoke test of benchmarks/half_precision.py on a tiny random LLaMA: every dtype runs the product path and the
outputs are well formed (no quality assertions beyond the file sizes halving)."""

import importlib.util
import json
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "half_precision.py"


def test_tiny_run_writes_json_and_markdown(tmp_path):
    spec = importlib.util.spec_from_file_location("half_precision_bench", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # dataclasses resolve their module's annotations through sys.modules
    spec.loader.exec_module(bench)
    bench.main(["--tiny", "--work-dir", str(tmp_path / "work"), "--results-dir", str(tmp_path / "results")])
    doc = json.loads((tmp_path / "results" / "half_precision_tiny.json").read_text())
    assert set(doc["rows"]) == {"float32", "bfloat16", "float16"}
    for name, row in doc["rows"].items():
        assert set(row["seeds"]) == {"0", "1"} and all(s["plug_in_loss"] > 0 for s in row["seeds"].values())
        ratio = doc["comparison"]["dtypes"][name]["size_ratio"]
        assert ratio == 1.0 if name == "float32" else 0.45 < ratio < 0.6
        assert row["upload_bytes"]["lora_r8"] < row["upload_bytes"]["whole_layers"]
    assert "| bfloat16 |" in (tmp_path / "results" / "half_precision_tiny.md").read_text()
