"""benchmarks/privacy_attack.py --tiny end to end: every emulator gets the honest rows and each applicable
attack, the figures are consistent with their definitions, and the result files are written."""

import json
import math

import pytest

from benchmarks import privacy_attack, privacy_attack_report


def test_tiny_sweep_writes_rows_attacks_and_tables(tmp_path):
    args = ["--tiny", "--work-dir", str(tmp_path / "w"), "--results-dir", str(tmp_path / "r")]
    result = privacy_attack.main([*args, "--longer", "8"])
    assert result["complete"]
    rows = {(r["emulator"], r["seed"]): r for r in result["rows"]}
    assert set(rows) == {("ot_a0.5", 0), ("scaleot_a0.5", 0), ("scaleot_a0.5_b0.8", 0), ("scaleot_a0.5", 1)}
    # densify only where SRC stored low-rank factors (beta 0.8); elsewhere it would repeat heal-all
    assert set(rows["scaleot_a0.5_b0.8", 0]["attackers"]) == {"heal-lora", "heal-all", "densify"}
    assert set(rows["scaleot_a0.5", 0]["attackers"]) == {"heal-lora", "heal-all"}
    for r in result["rows"]:
        best = r["attackers"][r["best_attack"]]["attacker"]
        assert best == min(a["attacker"] for a in r["attackers"].values())  # perplexity: lower is better
        # the attacker keeps the better of its best healed copy and no healing at all
        assert r["attack_helped"] == (best < r["emulator_ft"])
        kept = min(best, r["emulator_ft"])
        assert math.isclose(r["residual_gap"], math.log(kept) - math.log(r["plug_in"]), abs_tol=1e-3)
        assert r["residual_gap"] <= r["gap_before_attack"] + 1e-9
        assert math.isclose(r["gap_before_attack"], math.log(r["emulator_ft"]) - math.log(r["plug_in"]), abs_tol=1e-3)
        for a in r["attackers"].values():
            assert a["heal"]["tokens"] == 8 * 2 * 32 and a["heal"]["loss_after"] < a["heal"]["loss_before"]
    # the longer attack: the best attack again on scaleot_a0.5 with 8x the task's tokens (2x the sweep's budget)
    (longer,) = rows["scaleot_a0.5", 0]["longer_attacks"]
    assert longer["attack"] == rows["scaleot_a0.5", 0]["best_attack"]
    assert longer["steps"] == 16 and longer["tokens"] == 16 * 2 * 32 and longer["multiple_of_task_tokens"] == 8
    assert not rows["ot_a0.5", 0]["longer_attacks"] and not rows["scaleot_a0.5", 1]["longer_attacks"]
    b = result["budgets"]
    assert b["attack_tokens"] >= 4 * b["task_tokens"]
    saved = json.loads((tmp_path / "r" / "privacy_attack_tiny.json").read_text())
    assert saved["complete"] and saved["spread"]["seeds"] == [0, 1]
    md = (tmp_path / "r" / "privacy_attack_tiny.md").read_text()
    assert "residual gap" in md and "scaleot_a0.5_b0.8" in md and "Longer attacks" in md and "| 8× | 16 |" in md
    assert "Each attack (healing and the task fine-tune) took" in md and ("Gap kept" in md or "Gap closed" in md)
    # the report re-renders from the JSON alone, identically, and can write the docs block
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\n<!-- privacy-attack:start -->\nold\n<!-- privacy-attack:end -->\n\ntail\n")
    assert privacy_attack_report.main([str(tmp_path / "r" / "privacy_attack_tiny.json"), "--docs", str(docs)]) == md
    text = docs.read_text()
    assert "old" not in text and md.strip() in text and text.endswith("tail\n")
    # a rerun comes from the caches and gives the same figures
    again = privacy_attack.main([*args, "--longer", "8"])
    assert [r["residual_gap"] for r in again["rows"]] == [r["residual_gap"] for r in result["rows"]]


def test_verdict_names_the_gap_and_says_when_the_plug_in_gain_is_noise():
    row = {"residual_gap": 0.5, "plug_in_gain": 0.3}
    assert privacy_attack_report.verdict(row, 0.02) == "gap kept"
    assert privacy_attack_report.verdict({**row, "plug_in_gain": 0.01}, 0.02) == "gap kept; plug-in gain within noise"
    assert "gap closed" in privacy_attack_report.verdict({**row, "residual_gap": 0.01}, 0.02)
    assert "attacker beats" in privacy_attack_report.verdict({**row, "residual_gap": -0.1}, 0.02)
    rows = [
        {"emulator": "a", "residual_gap": 0.5},
        {"emulator": "b", "residual_gap": 0.01},
    ]
    assert privacy_attack_report.summary(rows, 0.02) == [
        "Gap kept after the best attack (≥ +0.50): a.",
        "Gap closed or reversed by the attacker: b.",
    ]


@pytest.mark.parametrize(
    ("flags", "said"),
    [
        (["--longer", "0"], "--longer"),
        (["--longer", "x"], "--longer"),
        (["--longer", "8", "--longer-on", "nope"], "--longer-on"),
        (["--emulators", "scaleot_a0.5,nope"], "unknown nope"),
        (["--public", "shakespeare"], "synthetic"),
    ],
)
def test_bad_flags_fail_before_any_work(tmp_path, flags, said, capsys):
    with pytest.raises(SystemExit):
        privacy_attack.main(["--tiny", "--work-dir", str(tmp_path / "w"), *flags])
    assert said in capsys.readouterr().err and not (tmp_path / "w").exists()


def test_emulator_subset_runs_only_those(tmp_path):
    result = privacy_attack.main(
        ["--tiny", "--emulators", "ot_a0.5", "--work-dir", str(tmp_path / "w"), "--results-dir", str(tmp_path / "r")]
    )
    assert [r["emulator"] for r in result["rows"]] == ["ot_a0.5"] and result["spread"] is None
    assert set(result["emulators"]) == {"ot_a0.5"}


def test_report_refuses_an_unfinished_run_and_writes_nothing(tmp_path):
    unfinished = tmp_path / "privacy_attack.json"
    unfinished.write_text(json.dumps({"complete": False, "rows": []}))
    with pytest.raises(SystemExit, match=r"unfinished run; run benchmarks/privacy_attack\.py"):
        privacy_attack_report.main([str(unfinished), "--docs", str(tmp_path / "benchmarks.md")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["privacy_attack.json"]
