"""Smoke test of benchmarks/transfer.py's second-model profile (--gemma270m) on a tiny random Gemma-3 folder whose
tokenizer prepends BOS, as Gemma's does: the profile's rows run (ScaleOT alpha = 0.5 on Task A, both data-owner
seeds, no long row), the results go to their own transfer_gemma270m files, the model gets its own cache name (never
SmolLM2's), and the data owner's blocks start with BOS. Budgets are shrunk for seconds; no quality asserts."""

import json
import math
from dataclasses import replace

import pytest
from tokenizers import processors

from benchmarks import harness, transfer
from scaleot_samples.tiny import EOS, byte_tokenizer, save_tiny_model_dir


def _tiny_gemma_dir(path):
    """A tiny random Gemma-3 folder whose tokenizer's default encoding starts with its BOS (here the byte
    tokenizer's one special token), as the real Gemma tokenizer's post-processor does."""
    save_tiny_model_dir(path, "gemma3_text", n_layers=8, hidden=32, tokenizer=False)
    tok = byte_tokenizer()
    bos = tok.convert_tokens_to_ids(EOS)
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{EOS} $A", pair=f"{EOS} $A {EOS} $B", special_tokens=[(EOS, bos)]
    )
    tok.save_pretrained(path)
    return path


def test_model_id_names_another_model_apart_from_smollm2(tmp_path):
    gemma = _tiny_gemma_dir(tmp_path / "gemma-tiny")
    smol = tmp_path / "smollm2-copy"
    smol.mkdir()
    (smol / "scaleot_source.json").write_text(json.dumps({"file": "SmolLM2-135M-Instruct.Q4_1.gguf"}))
    assert harness.model_id_for(None) == harness.SMOLLM2_ID  # the default model: the keys its caches have
    assert harness.model_id_for(smol) == harness.SMOLLM2_ID  # any folder converted from SmolLM2's GGUF
    gid = harness.model_id_for(gemma)
    assert gid.startswith("gemma-tiny-") and gid != harness.SMOLLM2_ID


def test_gemma_profile_needs_a_model_dir(tmp_path):
    with pytest.raises(SystemExit):
        transfer.main(["--gemma270m", "--work-dir", str(tmp_path / "w"), "--results-dir", str(tmp_path / "r")])


def test_gemma_profile_runs_task_a_at_alpha_half_into_its_own_files(tmp_path, monkeypatch):
    model_dir = _tiny_gemma_dir(tmp_path / "gemma-tiny")
    full = transfer.PROFILES["gemma270m"]
    small = replace(
        full,
        seq_len=32,
        stage1_steps=2,
        stage1_warmup=1,
        calibration_steps=2,
        ft_steps=2,
        text_batch=2,
        text_eval_blocks=2,
        bottleneck=8,
        wiki_train_chars=0,
        wiki_val_chars=0,
    )
    monkeypatch.setitem(transfer.PROFILES, "gemma270m", small)
    real_prepare = harness.prepare_data  # the tiny profile's synthetic files: no corpus packages needed
    monkeypatch.setattr(
        harness, "prepare_data", lambda work, budget: real_prepare(work, replace(budget, profile="tiny"))
    )
    res = tmp_path / "res"
    args = ["--gemma270m", "--model-dir", str(model_dir), "--work-dir", str(tmp_path / "work"), "--threads", "1"]
    result = transfer.main([*args, "--results-dir", str(res), "--calibration-steps", "1"])
    data = json.loads((res / "transfer_gemma270m.json").read_text())
    assert data["complete"] is True and result["complete"] is True
    assert (res / "transfer_gemma270m.md").read_text().startswith("Profile `gemma270m`")
    assert not (res / "transfer.json").exists()
    meta = data["meta"]
    assert meta["model"] == harness.model_id_for(model_dir) and meta["budget"]["profile"] == "gemma270m"
    assert meta["budget"]["calibration_steps"] == 1 and meta["budget"]["stage1_steps"] == small.stage1_steps
    assert data["emulators"]["scaleot_a0.5"]["calibration"]["steps"] == 1  # the option reached the build
    assert meta["block_start"]["expects_bos"] is True and meta["block_start"]["blocks_start_as_expected"] is True
    assert set(data["emulators"]) == {"scaleot_a0.5"}
    rows = data["rows"]
    assert {r["task"] for r in rows} == {"shakespeare"}
    assert sorted(r["seed"] for r in rows) == list(full.seeds) and {r["steps"] for r in rows} == {small.ft_steps}
    for r in rows:
        assert r["plug_in"] > 1 and r["zero_shot"] > 1 and r["emulator_ft"] > 1 and 0 < r["size_ratio"] < 1
        assert math.isfinite(r["privacy_gap"]) and (r["r"] is None or math.isfinite(r["r"]))
    summary = [s for s in data["summary"] if s["emulator"] == "scaleot_a0.5"]
    assert len(summary) == 1 and len(summary[0]["seeds"]) == 2
