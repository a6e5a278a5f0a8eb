"""The whole model-owner flow on a tiny model, through the ASGI app (jobs run inline)."""

from __future__ import annotations

import hashlib
import io
import json

import pytest
import torch
from server_helpers import adapter_bytes, auth

from shared import signing
from shared.schemas import Adapter, Emulator, Job, SignedManifest


def test_importance_job_reports_scores(world):
    job = Job.model_validate(
        world.client.get(f"/v1/jobs/{world.importance_job_id}", headers=auth(world.keys["admin"])).json()
    )
    assert job.status == "succeeded" and job.progress == 1.0
    assert len(job.result["scores"]) == 4 and sorted(job.result["ranking"]) == [0, 1, 2, 3]
    assert "loss" in job.metrics and len(job.metrics["scores"]) == 4
    assert job.metrics["phase"] == "rl"  # rl_interval=2 from the request: the last step was an RL update
    model = world.client.get(f"/v1/models/{world.model_id}", headers=auth(world.keys["alice"])).json()
    assert model["importance_ready"] is True and model["family"] == "llama" and model["n_layers"] == 4
    assert "path" not in model  # the server-side folder is never shown


def test_emulator_description_and_idempotency(world):
    emu = Emulator.model_validate(world.emulator)
    assert emu.status == "ready" and len(emu.adapter_layers) == 2
    assert emu.size_bytes == len(world.emulator_bytes)
    assert emu.sha256 == hashlib.sha256(world.emulator_bytes).hexdigest()
    assert emu.n_params < emu.full_model_params
    assert set(emu.adapter_spec) == set(world.adapter_tensors)
    assert emu.max_adapter_bytes >= sum(t.numel() * 4 for t in world.adapter_tensors.values())
    assert emu.file_url.endswith(f"/v1/emulators/{emu.id}/file")
    # Same (model, N_a, alpha, beta) from another org: the same emulator, no new job.
    r = world.client.post(
        "/v1/emulators",
        headers=auth(world.keys["bob"]),
        json={"model_id": world.model_id, "n_adapter": 2, "alpha": 0.5, "beta": 0.5},
    )
    assert r.status_code == 200 and r.json()["emulator"]["id"] == emu.id


def test_signature_verifies_and_tampering_is_caught(world, tmp_path):
    c, h = world.client, auth(world.keys["alice"])
    listing = c.get("/v1/signing-keys", headers=h).json()
    assert [k["status"] for k in listing["keys"]].count("active") == 1
    signed = c.get(f"/v1/emulators/{world.emulator['id']}/signature", headers=h).json()
    SignedManifest.model_validate(signed)
    active = next(k for k in listing["keys"] if k["status"] == "active")
    # Pin by fingerprint (key id) and by full public key: both verify.
    for pin in (active["key_id"], active["public_key"]):
        trusted = signing.trusted_keys_from_listing(listing, [pin])
        manifest = signing.verify_signed_manifest(signed, trusted)
    assert manifest["format"] == signing.MANIFEST_FORMAT and manifest["emulator_id"] == world.emulator["id"]
    assert manifest["layer_plan"] == world.emulator["plan"]
    path = tmp_path / "emu.safetensors"
    path.write_bytes(world.emulator_bytes)
    signing.verify_file(path, manifest)

    # A flipped byte in the file fails the integrity check.
    data = bytearray(world.emulator_bytes)
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(signing.IntegrityError):
        signing.verify_file(path, manifest)
    # An edited manifest (pointing at a different file) fails the signature check.
    forged = json.loads(json.dumps(signed))
    forged["manifest"]["sha256"] = hashlib.sha256(bytes(data)).hexdigest()
    with pytest.raises(signing.SignatureError):
        signing.verify_signed_manifest(forged, signing.trusted_keys_from_listing(listing))
    # A manifest signed by another key is refused.
    rogue_key = signing.Ed25519PrivateKey.generate()
    rogue = signing.sign_manifest(rogue_key, {k: v for k, v in manifest.items() if k != "key_id"})
    with pytest.raises(signing.SignatureError, match="not trusted"):
        signing.verify_signed_manifest(rogue, signing.trusted_keys_from_listing(listing))


def test_range_resume_gives_identical_bytes(world):
    c, h = world.client, auth(world.keys["alice"])
    url = f"/v1/emulators/{world.emulator['id']}/file"
    full = c.get(url, headers=h)
    assert full.headers["etag"] == f'"{world.emulator["sha256"]}"' and full.headers["accept-ranges"] == "bytes"
    size = len(full.content)
    cut = size // 3
    part = c.get(url, headers={**h, "Range": f"bytes={cut}-"})
    assert part.status_code == 206 and part.headers["content-range"] == f"bytes {cut}-{size - 1}/{size}"
    assert full.content[:cut] + part.content == full.content
    mid = c.get(url, headers={**h, "Range": "bytes=10-19"})
    assert mid.status_code == 206 and mid.content == full.content[10:20]
    tail = c.get(url, headers={**h, "Range": "bytes=-5"})
    assert tail.status_code == 206 and tail.content == full.content[-5:]
    bad = c.get(url, headers={**h, "Range": f"bytes={size}-"})
    assert bad.status_code == 416 and bad.headers["content-range"] == f"bytes */{size}"
    assert bad.json()["error"]["code"] == "range_not_satisfiable"
    # If-Range with a stale validator: the whole (new) file, 200.
    stale = c.get(url, headers={**h, "Range": f"bytes={cut}-", "If-Range": '"0000"'})
    assert stale.status_code == 200 and stale.content == full.content
    head = c.head(url, headers=h)
    assert head.status_code == 200 and int(head.headers["content-length"]) == size


def test_adapter_evaluation_side_by_side(world):
    c, h = world.client, auth(world.keys["alice"])
    job = c.get(f"/v1/jobs/{world.eval_job_id}", headers=h).json()
    assert job["status"] == "succeeded", job
    adapter = Adapter.model_validate(c.get(f"/v1/adapters/{world.adapter_id}", headers=h).json())
    assert adapter.status == "evaluated" and adapter.method == "full"
    zs, pi = adapter.evaluation.zero_shot, adapter.evaluation.plug_in
    assert zs["perplexity"] > 1 and pi["perplexity"] > 1
    # The adapter was extracted unchanged from the emulator, so M' == M: identical scores.
    assert pi["loss"] == pytest.approx(zs["loss"], rel=1e-5)
    assert adapter.evaluation.eval_source.startswith("server default")


def test_upload_with_eval_file_and_metrics_then_generate(world, files):
    c, h = world.client, auth(world.keys["alice"])
    tensors = {k: v + 0.01 * torch.randn_like(v) for k, v in world.adapter_tensors.items()}
    metrics = {"emulator_zero_shot": {"perplexity": 300.0}, "emulator_fine_tuned": {"perplexity": 120.0}}
    r = c.post(
        f"/v1/emulators/{world.emulator['id']}/adapters",
        headers=h,
        files={
            "adapter": ("a.safetensors", io.BytesIO(adapter_bytes(tensors))),
            "eval_data": ("mine.txt", files["eval"].read_bytes()),
        },
        data={"metrics": json.dumps(metrics), "adapter_config": json.dumps({"method": "lora", "r": 8})},
    )
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["job"]["status"] == "succeeded", body["job"]
    adapter = c.get(f"/v1/adapters/{body['adapter']['id']}", headers=h).json()
    assert adapter["client_metrics"] == metrics and adapter["method"] == "lora"
    assert adapter["adapter_config"] == {"method": "lora", "r": 8}
    assert adapter["evaluation"]["eval_source"] == "upload"
    evaluation = adapter["evaluation"]
    assert evaluation["plug_in"]["loss"] != pytest.approx(evaluation["zero_shot"]["loss"], rel=1e-9)
    ids = {a["id"] for a in c.get("/v1/adapters", headers=h).json()["adapters"]}
    assert {world.adapter_id, body["adapter"]["id"]} <= ids

    g = c.post(
        f"/v1/adapters/{body['adapter']['id']}/generate",
        headers=h,
        json={"prompt": "the quick brown", "max_new_tokens": 5},
    )
    assert g.status_code == 200, g.text
    assert isinstance(g.json()["completion"], str) and g.json()["max_new_tokens"] == 5
    too_many = c.post(
        f"/v1/adapters/{body['adapter']['id']}/generate",
        headers=h,
        json={"prompt": "x", "max_new_tokens": world.settings.max_new_tokens + 1},
    )
    assert too_many.status_code == 422


def test_emulator_needs_importance_run(world, files, tmp_path):
    from scaleot_samples.tiny import save_tiny_model_dir

    c, h = world.client, auth(world.keys["admin"])
    folder = save_tiny_model_dir(tmp_path / "gpt2", "gpt2", n_layers=4)
    r = c.post("/v1/models", headers=h, json={"name": "tiny-gpt2-no-importance", "path": str(folder)})
    assert r.status_code == 201, r.text
    r2 = c.post("/v1/emulators", headers=h, json={"model_id": r.json()["id"], "n_adapter": 1, "alpha": 0.5, "beta": 0})
    assert r2.status_code == 409 and r2.json()["error"]["code"] == "importance_missing"
    assert "importance" in r2.json()["error"]["message"]
    dup = c.post("/v1/models", headers=h, json={"name": "tiny-gpt2-no-importance", "path": str(folder)})
    assert dup.status_code == 409


def test_emulator_parameter_validation(world):
    c, h = world.client, auth(world.keys["alice"])
    for body in (
        {"model_id": world.model_id, "n_adapter": 4, "alpha": 0.5, "beta": 0.5},  # all layers
        {"model_id": world.model_id, "n_adapter": 0, "alpha": 0.5, "beta": 0.5},
        {"model_id": world.model_id, "n_adapter": 1, "alpha": 1.5, "beta": 0.5},
        {"model_id": world.model_id, "n_adapter": 1, "alpha": 0.5, "beta": 1.0},
        {"model_id": world.model_id, "n_adapter": 1, "alpha": 0.5, "beta": 0.5, "typo": 1},
    ):
        r = c.post("/v1/emulators", headers=h, json=body)
        assert r.status_code == 422, (body, r.text)
        assert r.json()["error"]["code"] == "validation_error"
