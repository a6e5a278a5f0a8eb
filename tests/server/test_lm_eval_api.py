"""lm-evaluation-harness against the service, as a user runs it: the real `lm-eval` package's
`local-completions` model against /openai/v1/completions of a real uvicorn server on loopback, on three small
local tasks (tests/server/lm_eval_tasks/: a multiple-choice, a rolling-perplexity and a generation task, with
their data files), compared with the harness's own `hf` model on a saved folder of the same weights:

- M: the world's adapter is the emulator's adapter layers unchanged, so the plugged model is M itself; `hf`
  loads M's registered folder;
- M with a tuned adapter merged: a perturbed adapter uploaded and evaluated; `hf` loads the plugged model
  saved with save_pretrained.

Tolerance: every per-request log-likelihood within 1e-4 absolute and every metric within 1e-4 relative
(perplexities are exponentials of those sums); acc, acc_norm, is_greedy and the generated texts exactly equal.
The remaining difference is float32 summation order (one pass over prompt + continuation on the server,
prompt + continuation minus its last token in `hf`)."""

from __future__ import annotations

import io
import math
from pathlib import Path

import pytest
import torch
from server_helpers import adapter_bytes, auth
from test_openai_api import _tokenizer, in_process_model, loopback_server

REPO = Path(__file__).resolve().parents[2]
TASKS = ["scaleot_mc", "scaleot_ppl", "scaleot_gen"]
MAX_LENGTH = 256  # the tiny model's context; both backends are told it (rolling windows, truncation)
ABS, REL = 1e-4, 1e-4


def evaluate(model: str, model_args: dict) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=TASKS,
        # Only our tasks: indexing the harness's thousands of built-in task files takes ~15 s each time.
        task_manager=TaskManager(include_path=str(REPO / "tests/server/lm_eval_tasks"), include_defaults=False),
        batch_size=4 if model == "local-completions" else 1,  # the API gets batched token-id prompts
        bootstrap_iters=0,
        log_samples=True,
        random_seed=0,
    )


def assert_same_figures(api: dict, hf: dict) -> None:
    for task in TASKS:
        got, want = api["results"][task], hf["results"][task]
        metrics = [k for k, v in want.items() if "," in k and "stderr" not in k and isinstance(v, int | float)]
        assert metrics, want
        for key in metrics:
            assert math.isclose(float(got[key]), float(want[key]), rel_tol=REL, abs_tol=ABS), (task, key, got, want)
        for a, h in zip(api["samples"][task], hf["samples"][task], strict=True):
            assert a["doc_id"] == h["doc_id"]
            for ra, rh in zip(a["resps"], h["resps"], strict=True):
                if isinstance(rh[0], str):  # generated text
                    assert ra == rh, (task, a["doc_id"])
                else:  # (log-likelihood, is_greedy) or a rolling log-likelihood
                    ra, rh = (ra[0], rh[0]) if isinstance(rh[0], tuple | list) else (ra, rh)
                    assert float(ra[0]) == pytest.approx(float(rh[0]), abs=ABS), (task, a["doc_id"])
                    assert ra[1:] == rh[1:]


@pytest.fixture(scope="module")
def tuned_adapter(world) -> str:
    """alice's adapter with perturbed weights (as tuning would leave them), uploaded and evaluated."""
    gen = torch.Generator().manual_seed(0)
    tensors = {
        k: v + 0.2 * torch.randn(v.shape, generator=gen, dtype=v.dtype) if v.is_floating_point() else v
        for k, v in world.adapter_tensors.items()
    }
    r = world.client.post(
        f"/v1/emulators/{world.emulator['id']}/adapters",
        headers=auth(world.keys["alice"]),
        files={"adapter": ("adapter.safetensors", io.BytesIO(adapter_bytes(tensors)))},
    )
    assert r.status_code == 202, r.text
    adapter_id = r.json()["adapter"]["id"]
    status = world.client.get(f"/v1/adapters/{adapter_id}", headers=auth(world.keys["alice"])).json()["status"]
    assert status == "evaluated", status
    return adapter_id


def test_lm_eval_local_completions_equals_its_hf_model_on_the_same_weights(
    world, files, tuned_adapter, tmp_path, monkeypatch
):
    monkeypatch.chdir(REPO)  # the task YAMLs name their data files relative to the repository
    monkeypatch.setenv("OPENAI_API_KEY", world.keys["alice"])  # local-completions sends it as the bearer key
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")  # not the user's cache
    merged = tmp_path / "merged"
    in_process_model(world, tuned_adapter).save_pretrained(merged)
    _tokenizer(world).save_pretrained(merged)
    loglikelihoods = []
    with loopback_server(world.client.app) as base_url:
        for adapter_id, folder in ((world.adapter_id, files["model"]), (tuned_adapter, merged)):
            api = evaluate(
                "local-completions",
                {
                    "model": adapter_id,
                    "base_url": f"{base_url}/completions",
                    "tokenizer": str(files["model"]),
                    "tokenizer_backend": "huggingface",
                    "max_length": MAX_LENGTH,
                    "max_retries": 1,
                },
            )
            hf = evaluate(
                "hf", {"pretrained": str(folder), "dtype": "float32", "device": "cpu", "max_length": MAX_LENGTH}
            )
            assert_same_figures(api, hf)
            loglikelihoods.append(torch.tensor([float(s["resps"][0][0]) for s in api["samples"]["scaleot_ppl"]]))
    # The tolerance tells the two models apart: the tuned adapter moves the log-likelihoods by far more.
    assert float((loglikelihoods[0] - loglikelihoods[1]).abs().max()) > 10 * ABS
