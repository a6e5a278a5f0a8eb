"""A small in-process model-owner server for client tests, built from the real `shared` code.

It speaks the v1 wire contract (emulator description, file with Range/ETag, signed manifest, signing
keys, multipart adapter upload, jobs, adapters) over real HTTP on loopback (uvicorn in a thread),
and has switches to misbehave: tampered file / manifest, foreign signing key, cut-off downloads,
failing evaluations. The real server is exercised by test_e2e_real_server.py.
"""

from __future__ import annotations

import contextlib
import copy
import json
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse, Response, StreamingResponse

from scaleot_samples.tiny import byte_tokenizer, tiny_model
from shared.adapter import spec_from_json
from shared.architectures import decoder_layers, family_for
from shared.data import load_dataset
from shared.emulator_file import save_emulator
from shared.emulator_model import apply_plan
from shared.evaluation import evaluate
from shared.layer_plan import LayerPlan, Role
from shared.lora import LoraSpec, is_lora, issue_lora, load_adapter, merge_lora
from shared.signing import emulator_manifest, key_id, public_key_to_b64, sign_manifest
from shared.src import src_ranks
from tooling.procs import uvicorn_in_thread

API_KEY = "test-api-key"
NOW = "2025-01-01T00:00:00Z"


def build_tiny_emulator(
    path: Path, emulator_id: str, model_id: str, family: str = "llama", chat_template: bool = False
) -> dict[str, Any]:
    """A 4-layer emulator [adapter, harmonizer, frozen+SRC, adapter] of `tiny_model(family)`; `chat_template`:
    its tokenizer has one (chat data can be tuned on and scored)."""
    model = tiny_model(family, n_layers=4, hidden=32)
    fam = family_for(model.config)
    ranks = {2: src_ranks(decoder_layers(model)[2], fam.projections, 0.5)}
    plan = LayerPlan(
        roles=[Role.ADAPTER, Role.HARMONIZER, Role.FROZEN, Role.ADAPTER],
        ranks=ranks,
        method="scaleot",
        n_adapter=2,
        alpha=0.5,
        beta=0.5,
        bottleneck=8,
    )
    emulator = apply_plan(model, plan)
    info = save_emulator(
        emulator,
        plan,
        byte_tokenizer(chat_template),
        path,
        extra_metadata={"emulator_id": emulator_id, "model_id": model_id},
    )
    from shared.adapter import adapter_spec, spec_to_json

    return {
        "plan": plan,
        "sha256": info.sha256,
        "size_bytes": info.size_bytes,
        "n_params": info.n_params,
        "adapter_spec": spec_to_json(adapter_spec(emulator, plan.adapter_layers)),
        "lora": issue_lora(emulator, plan.adapter_layers).to_json(),
    }


@dataclass
class FakeState:
    emulator_file: Path
    emulator_id: str
    model_id: str
    built: dict[str, Any]
    family: str = "llama"
    chat_template: bool = False  # the full model's tokenizer has one (as the emulator built with it)
    key: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)
    # misbehaviour switches
    file_override: bytes | None = None  # serve these bytes instead of the file
    etag_override: str | None = None
    cut_after: int | None = None  # abort the body after this many bytes (once)
    manifest_patch: dict[str, Any] = field(default_factory=dict)  # applied AFTER signing (tampering)
    sign_with: Ed25519PrivateKey | None = None  # sign with a key that is not published
    manifest_emulator_id: str | None = None  # validly signed manifest for another emulator
    fail_evaluation: bool = False
    building_polls: int = 0  # report "building" for this many GETs of the emulator
    redirect_file: str | None = None  # answer the file request with a redirect to this URL
    default_eval: bool = True  # False: like a server without a default eval file (422 no_eval_data without one)
    upload_info: bool = True  # False: like an older server without GET .../upload-info (404)
    honour_eval_settings: bool = True  # False: like an older server, scoring with its own seq_len whatever was sent
    # records
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    uploads: list[dict[str, Any]] = field(default_factory=list)
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    adapters: dict[str, dict[str, Any]] = field(default_factory=dict)

    def file_bytes(self) -> bytes:
        return self.file_override if self.file_override is not None else self.emulator_file.read_bytes()


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


def make_app(state: FakeState) -> FastAPI:
    app = FastAPI()
    base_emulator = f"/v1/emulators/{state.emulator_id}"

    @app.middleware("http")
    async def auth_and_log(request: Request, call_next):
        state.requests.append((request.method, request.url.path, dict(request.headers)))
        if request.headers.get("authorization") != f"Bearer {API_KEY}":
            return _error(401, "unauthorized", "missing or wrong API key")
        return await call_next(request)

    def emulator_json() -> dict[str, Any]:
        b = state.built
        return {
            "id": state.emulator_id,
            "model_id": state.model_id,
            "n_adapter": 2,
            "alpha": 0.5,
            "beta": 0.5,
            "status": "ready",
            "job_id": None,
            "sha256": b["sha256"],
            "size_bytes": b["size_bytes"],
            "n_params": b["n_params"],
            "plan": b["plan"].to_dict(),
            "adapter_layers": b["plan"].adapter_layers,
            "adapter_spec": b["adapter_spec"],
            "max_adapter_bytes": None,
            "build_info": {"dtype": "float32", "lora": b["lora"]},
            "file_url": f"{base_emulator}/file",
            "signature_url": f"{base_emulator}/signature",
            "created_at": NOW,
        }

    @app.get("/v1/emulators/{eid}")
    def get_emulator(eid: str):
        if eid != state.emulator_id:
            return _error(404, "not_found", f"no emulator {eid}")
        if state.building_polls > 0:
            state.building_polls -= 1
            return {**emulator_json(), "status": "building", "sha256": None, "size_bytes": None}
        return emulator_json()

    @app.get("/v1/emulators/{eid}/file")
    def get_file(eid: str, request: Request):
        if state.redirect_file:
            return Response(status_code=307, headers={"Location": state.redirect_file})
        data = state.file_bytes()
        etag = f'"{state.etag_override or state.built["sha256"]}"'
        start, status = 0, 200
        headers = {"ETag": etag, "Accept-Ranges": "bytes"}
        rng = request.headers.get("range")
        if rng:
            start = int(rng.removeprefix("bytes=").split("-")[0])
            if start >= len(data):
                return Response(status_code=416, headers={"Content-Range": f"bytes */{len(data)}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        body = data[start:]
        headers["Content-Length"] = str(len(body))
        cut = state.cut_after
        state.cut_after = None

        def chunks():
            step = 4096
            for i in range(0, len(body), step):
                if cut is not None and start + i >= cut:
                    raise ConnectionAbortedError("simulated network failure")  # uvicorn drops the connection
                yield body[i : i + step]

        return StreamingResponse(chunks(), status_code=status, headers=headers, media_type="application/octet-stream")

    @app.get("/v1/emulators/{eid}/signature")
    def get_signature(eid: str):
        manifest = emulator_manifest(
            emulator_id=state.manifest_emulator_id or state.emulator_id,
            model_id=state.model_id,
            sha256=state.built["sha256"],
            size_bytes=state.built["size_bytes"],
            layer_plan=state.built["plan"].to_dict(),
            key_id=key_id((state.sign_with or state.key).public_key()),
            issued_at=NOW,
        ) | {"dtype": "float32", "lora": state.built["lora"]}
        signed = sign_manifest(state.sign_with or state.key, manifest)
        signed["manifest"].update(state.manifest_patch)
        return signed

    @app.get("/v1/signing-keys")
    def signing_keys():
        pub = state.key.public_key()
        return {
            "keys": [
                {
                    "key_id": key_id(pub),
                    "algorithm": "Ed25519",
                    "public_key": public_key_to_b64(pub),
                    "status": "active",
                    "created_at": NOW,
                }
            ]
        }

    @app.get("/v1/emulators/{eid}/upload-info")
    def upload_info(eid: str):
        if not state.upload_info:
            return _error(404, "not_found", "no such endpoint; see /docs for the API")
        if eid != state.emulator_id:
            return _error(404, "not_found", f"no emulator {eid}")
        return {
            "emulator_id": eid,
            "default_eval_data": state.default_eval,
            "eval_data_required": not state.default_eval,
            "eval_data_suffixes": [".txt", ".jsonl", ".json"],
            "max_adapter_bytes": None,
            "max_eval_bytes": 1 << 20,
        }

    @app.post(f"{base_emulator}/adapters", status_code=202)
    async def upload(
        adapter: UploadFile = File(...),
        eval_data: UploadFile | None = File(None),
        metrics: str | None = Form(None),
        adapter_config: str | None = Form(None),
    ):
        if eval_data is None and not state.default_eval:
            return _error(
                422,
                "no_eval_data",
                "this server has no default evaluation file; attach your eval "
                "file as the 'eval_data' part (.txt or .jsonl)",
            )
        raw = await adapter.read()
        eval_raw = await eval_data.read() if eval_data is not None else None
        record = {
            "adapter_bytes": raw,
            "adapter_filename": adapter.filename,
            "eval_filename": eval_data.filename if eval_data else None,
            "eval_bytes": eval_raw,
            "metrics": json.loads(metrics) if metrics else None,
            "adapter_config": json.loads(adapter_config) if adapter_config else None,
        }
        state.uploads.append(record)
        aid, jid = f"ad_{uuid.uuid4().hex[:8]}", f"job_{uuid.uuid4().hex[:8]}"
        state.jobs[jid] = {
            "id": jid,
            "kind": "evaluation",
            "status": "queued",
            "progress": 0.0,
            "message": "queued",
            "metrics": {},
            "result": {"adapter_id": aid},
            "error": None,
            "created_at": NOW,
            "updated_at": NOW,
            "_polls": 0,
            "_upload": record,
        }
        state.adapters[aid] = {
            "id": aid,
            "emulator_id": state.emulator_id,
            "model_id": state.model_id,
            "status": "evaluating",
            "sha256": "0" * 64,
            "size_bytes": len(raw),
            "method": (record["adapter_config"] or {}).get("method"),
            "adapter_config": record["adapter_config"],
            "client_metrics": record["metrics"],
            "evaluation": {},
            "job_id": jid,
            "error": None,
            "created_at": NOW,
        }
        return {"adapter": state.adapters[aid], "job": _public(state.jobs[jid])}

    @app.get("/v1/jobs/{jid}")
    def get_job(jid: str):
        job = state.jobs.get(jid)
        if job is None:
            return _error(404, "not_found", f"no job {jid}")
        job["_polls"] += 1
        if job["status"] == "queued":  # first poll: running, so the client really polls
            job.update(status="running", progress=0.5, message="plugging in")
        elif job["status"] == "running":
            _finish(state, job)
        return _public(job)

    @app.get("/v1/adapters/{aid}")
    def get_adapter(aid: str):
        if aid not in state.adapters:
            return _error(404, "not_found", f"no adapter {aid}")
        return state.adapters[aid]

    return app


def _public(job: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in job.items() if not k.startswith("_")}


def _finish(state: FakeState, job: dict[str, Any]) -> None:
    """Validate the upload like the server, plug it into the full tiny model, evaluate on the uploaded data."""
    aid = job["result"]["adapter_id"]
    adapter = state.adapters[aid]
    if state.fail_evaluation:
        job.update(status="failed", progress=1.0, message="failed", error="simulated evaluation failure")
        adapter.update(status="failed", error="simulated evaluation failure")
        return
    upload = job["_upload"]
    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / "adapter.safetensors"
        f.write_bytes(upload["adapter_bytes"])
        lora = LoraSpec.from_json(state.built["lora"])
        tensors = load_adapter(f, spec_from_json(state.built["adapter_spec"]), lora)
        full = tiny_model(state.family, n_layers=4, hidden=32)
        zero = plug = None
        if upload["eval_bytes"] is not None:
            e = Path(tmp) / upload["eval_filename"]
            e.write_bytes(upload["eval_bytes"])
            ds = load_dataset(e)
            tok = byte_tokenizer(state.chat_template)
            seq_len = 512 if ds.kind == "chat" else 64  # byte tokens: a conversation is a few hundred
            # Like the real server: the upload's own eval_settings when it carries them (one measurement).
            asked = (upload["metrics"] or {}).get("eval_settings") if state.honour_eval_settings else None
            cap = None
            if asked:
                seq_len, cap = asked["seq_len"], asked["max_examples"]
            settings = {"seq_len": seq_len, "max_examples": cap, "source": "client" if asked else "server default"}
            zero = evaluate(full, tok, ds, seq_len=seq_len, max_examples=cap)
            plugged = copy.deepcopy(full)
            if is_lora(tensors):
                merge_lora(plugged, tensors, lora)
            else:
                _missing, unexpected = plugged.load_state_dict(tensors, strict=False)
                assert not unexpected
            plug = evaluate(plugged, tok, ds, seq_len=seq_len, max_examples=cap)
    job.update(status="succeeded", progress=1.0, message="done", metrics={"plug_in": plug})
    evaluation = {"zero_shot": zero, "plug_in": plug, "eval_source": "upload"}
    if state.honour_eval_settings and zero is not None:
        evaluation["settings"] = settings
    adapter.update(status="evaluated", evaluation=evaluation)


class FakeServer:
    """uvicorn on 127.0.0.1:<free port> in a daemon thread."""

    def __init__(self, state: FakeState):
        self.state = state
        self.app = make_app(state)
        self._running = contextlib.ExitStack()

    def __enter__(self) -> FakeServer:
        self.port = self._running.enter_context(uvicorn_in_thread(self.app, timeout=10, log_level="critical"))
        return self

    def __exit__(self, *exc: object) -> None:
        self._running.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def emulator_url(self) -> str:
        return f"{self.url}/v1/emulators/{self.state.emulator_id}"
