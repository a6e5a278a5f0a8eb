"""Smoke test of benchmarks/serving.py on a tiny random LLaMA: the whole run (server world, uvicorn, the openai
client, in-process baselines) completes and writes well-formed JSON and markdown. No timing assertions."""

import importlib.util
import json
import math
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "serving.py"
PATHS = {"in-process generate", "in-process engine", "API completion", "API stream", "API chat stream"}


def _load():
    spec = importlib.util.spec_from_file_location("serving_bench", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_tiny_run_writes_json_and_markdown(tmp_path):
    _load().main(["--tiny", "--results-dir", str(tmp_path), "--work-dir", str(tmp_path / "work")])
    doc = json.loads((tmp_path / "serving_tiny.json").read_text())
    assert set(doc["paths"]) == PATHS and doc["setup"]["repeats"] == 2
    for name, p in doc["paths"].items():
        assert p["tokens_per_s"]["n"] == 2 and math.isfinite(p["tokens_per_s"]["median"]) and all(p["tokens"]), name
        assert ("ttft_s" in p) == ("stream" in name), name
    assert doc["met"] == (doc["ratio"] >= doc["target"])
    md = (tmp_path / "serving_tiny.md").read_text()
    assert "| API completion |" in md and "time to first token" in md
