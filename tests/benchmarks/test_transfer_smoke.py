"""Smoke test of benchmarks/transfer.py on a tiny random LLaMA: every row runs, r and its spread are reported,
the fidelity figures and the stage-1 stability come out, and the outputs are well formed (no quality asserts)."""

import json
import math

from benchmarks import transfer


def test_tiny_run_writes_rows_summary_and_targets(tmp_path):
    result = transfer.main(["--tiny", "--work-dir", str(tmp_path / "work"), "--results-dir", str(tmp_path / "res")])
    data = json.loads((tmp_path / "res" / "transfer_tiny.json").read_text())
    assert data["complete"] is True
    emulators = {s.name for s in transfer.emulator_specs(transfer.PROFILES["tiny"])}
    assert set(data["emulators"]) == emulators
    for e in data["emulators"].values():
        assert {"ppl_ratio", "grad_cosine"} <= e["fidelity"].keys()
    main_a = [
        s
        for s in data["summary"]
        if s["task"] == "shakespeare"
        and s["emulator"] == "scaleot_a0.5"
        and s["steps"] == transfer.PROFILES["tiny"].ft_steps
    ]
    assert main_a and len(main_a[0]["seeds"]) == 2 and main_a[0]["r_spread"] is not None
    assert all(r["r"] is None or math.isfinite(r["r"]) for r in data["rows"])
    assert data["stage1"]["spearman_between_seeds"] is not None
    assert {t["status"] for t in data["targets"]} <= {"met", "missed", None}
    assert (tmp_path / "res" / "transfer_tiny.md").read_text().startswith("Profile `tiny`")
    assert result["fidelity_predicts_r"].keys() == {"ppl_ratio", "grad_cosine"}
