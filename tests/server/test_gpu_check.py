"""scripts/gpu_check.py's dry run on CPU (issue 22): the GPU check's whole path (stage 1, emulator, tune,
plug-in through the service in-process) runs, and its JSON holds each phase's time and per-stage peak memory."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _script():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_dry_run_on_cpu(tmp_path, capsys):
    out = tmp_path / "gpu_check.json"
    assert _script().main(["--device", "cpu", "--dry-run", "--out", str(out), "--work", str(tmp_path / "w")]) == 0
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["card"] == "cpu" and report["dry_run"] is True
    assert report["compute_dtype"] == "bfloat16"
    assert list(report["phases"]) == ["stage1", "emulator", "tune", "plug_in"]
    for name, phase in report["phases"].items():
        mem = phase["memory"]
        assert phase["seconds"] > 0 and mem["peak_bytes"] > 0 and mem["stages"], name
        if name != "tune":  # the server's jobs ran M in the registered compute dtype
            assert mem["compute_dtype"] == "bfloat16", name
    # M is held while the jobs that use it run (loaded by the job, or found in the worker's cache)
    model_bytes = report["phases"]["stage1"]["memory"]["model_bytes"]
    assert model_bytes == report["n_params"] * 2
    assert report["phases"]["plug_in"]["memory"]["stages"]["plug_in"]["peak_bytes"] >= model_bytes
    assert report["phases"]["plug_in"]["plug_in"]["tokens"] > 0  # the plug-in was scored
    printed = capsys.readouterr().out
    assert "DRY RUN" in printed and "stage1" in printed and "plug_in" in printed
