"""benchmarks/privacy_attack.py --tiny end to end: every emulator gets the honest rows and each applicable
attack, the figures are consistent with their definitions, and the result files are written."""

import json
import math

from benchmarks import privacy_attack


def test_tiny_sweep_writes_rows_attacks_and_tables(tmp_path):
    result = privacy_attack.main(["--tiny", "--work-dir", str(tmp_path / "w"), "--results-dir", str(tmp_path / "r")])
    assert result["complete"]
    rows = {(r["emulator"], r["seed"]): r for r in result["rows"]}
    assert set(rows) == {("ot_a0.5", 0), ("scaleot_a0.5", 0), ("scaleot_a0.5_b0.8", 0), ("scaleot_a0.5", 1)}
    # densify only where SRC stored low-rank factors (beta 0.8); elsewhere it would repeat heal-all
    assert set(rows["scaleot_a0.5_b0.8", 0]["attackers"]) == {"heal-lora", "heal-all", "densify"}
    assert set(rows["scaleot_a0.5", 0]["attackers"]) == {"heal-lora", "heal-all"}
    for r in result["rows"]:
        best = r["attackers"][r["best_attack"]]["attacker"]
        assert best == min(a["attacker"] for a in r["attackers"].values())  # perplexity: lower is better
        assert math.isclose(r["residual_gap"], math.log(best) - math.log(r["plug_in"]), abs_tol=1e-3)
        assert math.isclose(r["gap_before_attack"], math.log(r["emulator_ft"]) - math.log(r["plug_in"]), abs_tol=1e-3)
        for a in r["attackers"].values():
            assert a["heal"]["tokens"] == 8 * 2 * 32 and a["heal"]["loss_after"] < a["heal"]["loss_before"]
    b = result["budgets"]
    assert b["attack_tokens"] >= 4 * b["task_tokens"]
    saved = json.loads((tmp_path / "r" / "privacy_attack_tiny.json").read_text())
    assert saved["complete"] and saved["spread"]["seeds"] == [0, 1]
    md = (tmp_path / "r" / "privacy_attack_tiny.md").read_text()
    assert "residual gap" in md and "scaleot_a0.5_b0.8" in md
    # a rerun comes from the caches and gives the same figures
    again = privacy_attack.main(["--tiny", "--work-dir", str(tmp_path / "w"), "--results-dir", str(tmp_path / "r")])
    assert [r["residual_gap"] for r in again["rows"]] == [r["residual_gap"] for r in result["rows"]]
