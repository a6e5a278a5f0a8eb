"""Smoke test of benchmarks/transfer_precision.py on a tiny random LLaMA: the same pipeline runs in float32 and
bfloat16 (M, emulator build and calibration, the client's tune, plug-in, reference, zero-shot) and the table holds
both dtypes side by side with a finite r (no quality assertions)."""

import json
import math

from benchmarks import transfer_precision


def test_tiny_run_tables_both_dtypes(tmp_path):
    res = tmp_path / "res"
    doc = transfer_precision.main(["--tiny", "--work-dir", str(tmp_path / "work"), "--results-dir", str(res)])
    data = json.loads((res / "transfer_precision_tiny.json").read_text())
    assert list(data["dtypes"]) == ["float32", "bfloat16"] == list(doc["dtypes"])
    for name, rec in data["dtypes"].items():
        assert rec["dtype"] == name
        assert rec["emulator_file_dtype"] == {"float32": "F32", "bfloat16": "BF16"}[name]  # issued = compute dtype
        row = rec["seeds"]["0"]
        assert row["r"] is not None and math.isfinite(row["r"])
        assert all(math.isfinite(row[k]) and row[k] > 0 for k in ("zero_shot_loss", "plug_in_loss", "reference_loss"))
        assert {"final_kl", "final_nmse"} <= rec["emulator"]["calibration"].keys()
        assert rec["emulator"]["fidelity"]["ppl_ratio"] > 0
    assert data["comparison"]["dtype"] == "bfloat16" and math.isfinite(data["comparison"]["r_diff"])
    md = (res / "transfer_precision_tiny.md").read_text()
    assert "| float32 | bfloat16 |" in md and "\n| r |" in md
