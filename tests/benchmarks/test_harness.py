"""benchmarks/harness.py's result helpers (cached records, result files) and measure.py's measured rows."""

import json

from benchmarks.harness import cached_file
from benchmarks.measure import record, rounded
from benchmarks.results import publish


def test_cached_file_runs_once_and_stores_the_seconds(tmp_path):
    calls = []

    def fn():
        calls.append(1)
        return {"x": len(calls)}

    path = tmp_path / "rows" / "a.json"
    first = cached_file(path, fn)
    assert first["x"] == 1 and isinstance(first["seconds"], float)
    assert json.loads(path.read_text()) == first
    assert cached_file(path, fn) == first and len(calls) == 1  # from the file
    assert cached_file(path, fn, fresh=True)["x"] == 2  # --fresh measures again and stores the new record
    assert json.loads(path.read_text())["x"] == 2


def test_publish_writes_json_and_markdown_by_profile(tmp_path):
    json_path, md_path = publish(tmp_path, "bench", "tiny", {"a": 1}, "| t |\n")
    assert (json_path.name, md_path.name) == ("bench_tiny.json", "bench_tiny.md")
    assert json.loads(json_path.read_text()) == {"a": 1} and md_path.read_text() == "| t |\n"
    assert publish(tmp_path, "bench", "full", {}, "")[0].name == "bench.json"


def test_record_keeps_details_apart():
    r = record("x", 1.5, "s", baseline=1.0, ratio=rounded(1.5 / 1.0, 2), target="ratio <= 2", met=True, reps=3)
    assert r == {
        "name": "x",
        "value": 1.5,
        "unit": "s",
        "baseline": 1.0,
        "ratio": 1.5,
        "target": "ratio <= 2",
        "met": True,
        "details": {"reps": 3},
    }
    assert rounded(None) is None and rounded(1.23456, 2) == 1.23


def test_an_emulator_cache_key_names_the_calibration_built_not_the_knobs_asked():
    """Each named calibration keys as it always did; the same calibration asked another way (its knobs spelled out
    as the library's default) gets the same key, so a change of the library's defaults cannot reuse a stale file."""
    from benchmarks.harness import CALIBRATIONS, DEFAULT_CALIBRATION, KEY_BASE_CALIBRATION, calibration_key
    from shared.importance_config import CalibrationConfig

    def config(over: dict) -> CalibrationConfig:  # mix_heads (the stand-ins' form) and corpus: build_emulators's keys
        return CalibrationConfig(**{"steps": 50, **{k: v for k, v in over.items() if k not in ("mix_heads", "corpus")}})

    keys = {name: calibration_key(config(over)) for name, over in CALIBRATIONS.items()}
    assert keys == {  # as they were keyed before the library's default changed (caches stay valid)
        "outputs": {},
        "grad1": {"grad_weight": 1.0},
        "grad10": {"grad_weight": 10.0},
        "adapters10": {"grad_weight": 10.0, "grad_match": "adapters"},
        "adapters10_s200": {"grad_weight": 10.0, "grad_match": "adapters"},  # its steps key apart (build_emulators)
        "adapters10_drift": {"grad_weight": 10.0, "grad_match": "adapters", "drift_lr": 3e-4},
        "adapters10_drift1e-4": {"grad_weight": 10.0, "grad_match": "adapters", "drift_lr": 1e-4},
        "adapters10_mix2": {"grad_weight": 10.0, "grad_match": "adapters"},  # its mix_heads key apart
        "adapters10_mix4": {"grad_weight": 10.0, "grad_match": "adapters"},
        "outputs_mix2": {},
        "adapters10_kept1e-4": {"grad_weight": 10.0, "grad_match": "adapters", "kept_lr": 1e-4},
        "adapters10_seed1": {"grad_weight": 10.0, "grad_match": "adapters", "seed": 1},
        "adapters10_seed2": {"grad_weight": 10.0, "grad_match": "adapters", "seed": 2},
        "adapters10_domain": {"grad_weight": 10.0, "grad_match": "adapters"},  # its corpus key apart
        "outputs_domain": {},
    }
    assert calibration_key(CalibrationConfig(**KEY_BASE_CALIBRATION)) == {}
    assert calibration_key(CalibrationConfig()) == keys[DEFAULT_CALIBRATION]  # the default built either way
