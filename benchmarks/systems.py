#!/usr/bin/env python
"""Systems benchmark: transfer, verification, training-step, server-memory and stage-2 costs of the service.

Every measurement runs the project's own code paths and compares them, in the same run, with a plain baseline:

  download    data_owner_client.transfer._fetch_into (the client's streaming download) from a real
              `modelowner-server serve` process (GET /v1/emulators/{id}/file) vs the SAME function reading the
              same file from `python -m http.server` on loopback           -> throughput ratio, target >= 0.8
  verify      shared.signing.verify_signed_manifest + verify_file (the client's verify path) vs
              hashlib.file_digest(sha256) over the same file                 -> throughput ratio, target >= 0.9
  train step  data_owner_client.train.train (method full) vs a minimal PyTorch loop (forward, loss, backward,
              AdamW step on the same trainable parameters), same emulator and batch shape; steady-state
              per-step medians, rounds interleaved                          -> time ratio, target <= 1.05
  server RSS  psutil RSS of the server process sampled every 20 ms while it receives a real, valid adapter
              upload (>= 100 MB in the full profile; data_owner_client.transfer.upload_adapter) and while it
              serves the emulator to 8 parallel downloads               -> growth over baseline, target < 64 MB
  stage 2     model_owner_server.scaleot.emulator.make_emulator from a cached stage-1 folder (load_importance)
              for SmolLM2-135M; emulator size vs the full model (bytes and parameters)

The server is a real process: migrations + organisations in a temp data dir, `modelowner-server serve
--no-worker` on 127.0.0.1, a separate `modelowner-server worker` for stage 1 and the emulator build (stopped
before any measurement, so the server process only serves). The served model is a synthetic LLaMA whose
single adapter layer is >= 100 MB (hidden 1536, FFN 4096, 4 layers, byte-level vocabulary).

Usage:
  .venv/bin/python benchmarks/systems.py            # full run: benchmarks/results/systems.json + docs/benchmarks.md
  .venv/bin/python benchmarks/systems.py --quick    # smaller files / fewer repetitions (results under the work dir)
  .venv/bin/python benchmarks/systems.py --tiny     # tiny random models, small files, seconds (the smoke test)

Caches (the synthetic model folder, the stage-1 result, the prepared SmolLM2) live under --work-dir
(default .cache/benchmarks/systems); the server's data dir is a fresh temp folder every run.
"""

from __future__ import annotations

import os

# Spinning OpenMP threads collapse throughput on a shared 2-core machine; must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import argparse
import hashlib
import itertools
import json
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Self

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import httpx
import psutil

MB = 1024 * 1024
DOCS_START, DOCS_END = "<!-- systems:start -->", "<!-- systems:end -->"
SERVED_EMULATOR = {"n_adapter": 1, "alpha": 0.5, "beta": 0.0}  # one adapter layer: the >= 100 MB upload


def log(msg: str) -> None:
    print(f"[systems {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- profiles


@dataclass(frozen=True)
class Profile:
    name: str
    # synthetic served model (LLaMA, byte-level vocab): one adapter layer = 4*h*h + 3*h*ffn params (MHA)
    hidden: int
    ffn: int
    heads: int
    n_layers: int
    download_reps: int  # per server, interleaved
    verify_reps: int  # per path, interleaved
    uploads: int  # measured adapter uploads
    parallel: int  # parallel downloads during the RSS measurement
    # stage 2 + training
    smollm2: bool  # False: a tiny random LLaMA instead of SmolLM2 (tests)
    stage1_steps: int
    stage1_seq_len: int
    n_adapter: int
    alpha: float
    beta: float
    train_batch: int
    train_seq_len: int
    train_rounds: int  # interleaved rounds per loop
    train_steps: int  # optimizer steps per round
    train_warmup: int  # first steps of a round not measured


PROFILES = {
    # adapter layer: 4*1536^2 + 3*1536*4096 = 28.3 M params = 113 MB fp32 (>= 100 MB)
    "full": Profile("full", hidden=1536, ffn=4096, heads=12, n_layers=4, download_reps=7, verify_reps=7, uploads=2,
                    parallel=8, smollm2=True, stage1_steps=4, stage1_seq_len=64, n_adapter=4, alpha=0.5, beta=0.5,
                    train_batch=4, train_seq_len=128, train_rounds=3, train_steps=6, train_warmup=2),
    # adapter layer: 4*768^2 + 3*768*2048 = 7.1 M params = 28 MB
    "quick": Profile("quick", hidden=768, ffn=2048, heads=12, n_layers=4, download_reps=3, verify_reps=3, uploads=1,
                     parallel=8, smollm2=True, stage1_steps=4, stage1_seq_len=64, n_adapter=4, alpha=0.5, beta=0.5,
                     train_batch=2, train_seq_len=64, train_rounds=2, train_steps=4, train_warmup=1),
    "tiny": Profile("tiny", hidden=64, ffn=128, heads=4, n_layers=4, download_reps=2, verify_reps=2, uploads=1,
                    parallel=8, smollm2=False, stage1_steps=2, stage1_seq_len=32, n_adapter=2, alpha=0.5, beta=0.5,
                    train_batch=2, train_seq_len=32, train_rounds=2, train_steps=3, train_warmup=1),
}


# ---------------------------------------------------------------- records


def record(name: str, value: float, unit: str, *, baseline: float | None = None, ratio: float | None = None,
           target: str | None = None, met: bool | None = None, **details: Any) -> dict[str, Any]:
    return {"name": name, "value": value, "unit": unit, "baseline": baseline, "ratio": ratio, "target": target,
            "met": met, "details": details}


def _r(x: float | None, nd: int = 4) -> float | None:
    return None if x is None else round(float(x), nd)


# ---------------------------------------------------------------- helpers: processes, ports, RSS


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def script(name: str) -> list[str]:
    exe = Path(sys.executable).parent / name
    if exe.exists():
        return [str(exe)]
    found = shutil.which(name)
    if found is None:
        raise SystemExit(f"console script {name} not found; install the project (pip install -e .)")
    return [found]


def wait_http(url: str, proc: subprocess.Popen, log_file: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = log_file.read_text()[-3000:] if log_file.exists() else ""
            raise RuntimeError(f"{url} did not come up (exit {proc.poll()}):\n{tail}")
        time.sleep(0.2)


def stop(proc: subprocess.Popen | None, timeout: float = 15) -> None:
    """Stop one process this script started (by its handle)."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


class RssSampler:
    """Samples a process's RSS every `interval` seconds in a thread; `phase()` gives baseline and peak."""

    def __init__(self, pid: int, interval: float = 0.02):
        self.proc = psutil.Process(pid)
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append((time.perf_counter(), self.proc.memory_info().rss))
            except psutil.Error:
                return
            self._stop.wait(self.interval)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def between(self, t0: float, t1: float) -> list[int]:
        return [r for t, r in self.samples if t0 <= t <= t1]


def measure_rss(pid: int, action: Callable[[], Any], settle: float = 0.5) -> tuple[dict[str, Any], Any]:
    """RSS of `pid` before (median over `settle` s), peak while `action` runs, and after; growth = peak - before."""
    with RssSampler(pid) as sampler:
        time.sleep(settle)
        t0 = time.perf_counter()
        result = action()
        t1 = time.perf_counter()
        time.sleep(settle)
    before = sampler.between(0, t0)
    during = sampler.between(t0, t1) or before[-1:]
    after = sampler.between(t1, float("inf"))
    base = statistics.median(before)
    peak = max(during)
    return {"baseline_mb": _r(base / MB, 1), "peak_mb": _r(peak / MB, 1), "growth_mb": _r((peak - base) / MB, 1),
            "after_mb": _r(statistics.median(after) / MB, 1) if after else None, "samples": len(during),
            "seconds": _r(t1 - t0, 3)}, result


# ---------------------------------------------------------------- inputs


def corpus_file(work: Path) -> Path:
    """A plain-text corpus (stage 1 and training data) from the repository's own documentation."""
    out = work / "corpus.txt"
    if not out.is_file():
        parts = [p.read_text(errors="replace") for p in sorted(REPO.glob("*.md")) + sorted((REPO / "docs").glob("*.md"))
                 if p.name != "benchmarks.md"]
        text = "\n\n".join(parts)
        while len(text) < 60_000:
            text += "\n\n" + text
        work.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, out)
    return out


def synthetic_model_dir(work: Path, prof: Profile) -> Path:
    """A local HF LLaMA folder (safetensors + byte-level tokenizer) with large layers; cached by shape."""
    out = work / f"served-llama-h{prof.hidden}-f{prof.ffn}-l{prof.n_layers}"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from scaleot_samples.tiny import EOS, byte_tokenizer

    tok = byte_tokenizer()
    eos = tok.convert_tokens_to_ids(EOS)
    cfg = LlamaConfig(num_hidden_layers=prof.n_layers, hidden_size=prof.hidden, intermediate_size=prof.ffn,
                      num_attention_heads=prof.heads, num_key_value_heads=prof.heads, vocab_size=len(tok),
                      max_position_embeddings=512, bos_token_id=eos, eos_token_id=eos, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


# ---------------------------------------------------------------- the server world


@dataclass
class World:
    base: str
    admin_key: str
    owner_key: str
    server: subprocess.Popen
    emulator_id: str
    emulator_path: Path  # inside the server's data dir
    size: int
    sha256: str
    signed: dict[str, Any]
    keys_listing: dict[str, Any]
    root: Path
    log_file: Path
    setup_seconds: float


def start_world(prof: Profile, work: Path, root: Path) -> World:
    """Real server process with orgs, the synthetic model registered, stage 1 and one emulator built."""
    from model_owner_server import crud
    from model_owner_server.core.config import Settings
    from model_owner_server.core.db import (
        make_engine,
        make_session_factory,
        run_migrations,
    )

    t_setup = time.perf_counter()
    model_dir = synthetic_model_dir(work, prof)
    corpus = corpus_file(work)
    data_dir = root / "server-data"
    env = {**os.environ, "SCALEOT_DATA_DIR": str(data_dir), "SCALEOT_DEVICE": "cpu", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "SCALEOT_IMPORTANCE_SEQ_LEN": "32", "SCALEOT_IMPORTANCE_BATCH_SIZE": "2",
           "SCALEOT_IMPORTANCE_MAX_BLOCKS": "64", "SCALEOT_EMBEDDED_WORKER": "false"}
    for k in ("SCALEOT_API_KEY", "SCALEOT_SERVER_PUBKEY", "SCALEOT_DATABASE_URL", "SCALEOT_QUEUE_URL",
              "SCALEOT_SIGNING_KEY", "SCALEOT_PUBLIC_URL", "SCALEOT_DEFAULT_EVAL", "SCALEOT_DEFAULT_CORPUS"):
        env.pop(k, None)
    # Organisations: what `modelowner-server create-org` does, in-process (saves two interpreter starts).
    settings = Settings(_env_file=None, data_dir=data_dir)
    run_migrations(settings.db_url)
    engine = make_engine(settings.db_url)
    with make_session_factory(engine)() as s:
        _, admin_key = crud.create_org(s, "model-owner", "admin")
        _, owner_key = crud.create_org(s, "acme", "data-owner")
        s.commit()
    engine.dispose()

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log_file = root / "server.log"
    with open(log_file, "w") as server_log:  # the child keeps its own copy of the descriptor
        server = subprocess.Popen([*script("modelowner-server"), "serve", "--host", "127.0.0.1", "--port", str(port),
                                   "--no-worker", "--log-level", "warning"],
                                  env=env, cwd=root, stdout=server_log, stderr=subprocess.STDOUT)
    worker = None
    try:
        wait_http(f"{base}/healthz", server, log_file)
        with open(root / "worker.log", "w") as worker_log:
            worker = subprocess.Popen([*script("modelowner-server"), "worker"], env=env, cwd=root,
                                      stdout=worker_log, stderr=subprocess.STDOUT)
        admin = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {admin_key}"}, timeout=120)
        owner = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {owner_key}"}, timeout=120)
        with admin, owner:
            r = admin.post("/v1/models", json={"name": "served-llama", "path": str(model_dir)})
            r.raise_for_status()
            model_id = r.json()["id"]
            admin.post(f"/v1/models/{model_id}/grants", json={"org": "acme"}).raise_for_status()
            r = admin.post(f"/v1/models/{model_id}/importance", json={"steps": 2, "corpus": str(corpus)})
            r.raise_for_status()
            wait_job(admin, r.json()["id"], worker, root / "worker.log")
            r = owner.post("/v1/emulators", json={"model_id": model_id, **SERVED_EMULATOR})
            r.raise_for_status()
            created = r.json()
            if created.get("job"):
                wait_job(owner, created["job"]["id"], worker, root / "worker.log")
            emu_id = created["emulator"]["id"]
            emu = owner.get(f"/v1/emulators/{emu_id}").json()
            signed = owner.get(f"/v1/emulators/{emu_id}/signature").json()
            listing = owner.get("/v1/signing-keys").json()
    except BaseException:
        stop(worker)
        stop(server)
        raise
    stop(worker)  # measurements see the API process alone
    path = data_dir / "emulators" / f"{emu_id}.safetensors"
    if not path.is_file():
        matches = list(data_dir.rglob(f"{emu_id}*.safetensors"))
        path = matches[0]
    return World(base, admin_key, owner_key, server, emu_id, path, int(emu["size_bytes"]), emu["sha256"], signed,
                 listing, root, log_file, time.perf_counter() - t_setup)


def wait_job(http: httpx.Client, job_id: str, worker: subprocess.Popen, worker_log: Path, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while True:
        job = http.get(f"/v1/jobs/{job_id}").json()
        if job["status"] == "succeeded":
            return
        if job["status"] == "failed" or worker.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"job {job_id} {job['status']}: {job.get('message')}\n{worker_log.read_text()[-3000:]}")
        time.sleep(0.3)


# ---------------------------------------------------------------- 1. download throughput


def bench_download(w: World, prof: Profile) -> list[dict[str, Any]]:
    """The client's own streaming download (`_fetch_into`) against the API and against http.server."""
    from data_owner_client.transfer import EmulatorRef, ServerClient, _fetch_into

    static_root = w.root / "static"
    target = static_root / "v1" / "emulators" / w.emulator_id / "file"  # same URL path as the API
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(w.emulator_path, target)  # same inode: same page cache for both servers
    except OSError:
        shutil.copyfile(w.emulator_path, target)
    port = free_port()
    with open(w.root / "http.server.log", "w") as static_log:
        static = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                                   "--directory", str(static_root)], stdout=static_log, stderr=subprocess.STDOUT)
    static_base = f"http://127.0.0.1:{port}"
    # "file": the client's own download function (stream to a .part file); "discard": the same httpx stream
    # with the bytes dropped, which isolates the servers from the client's disk writes.
    times: dict[tuple[str, str], list[float]] = {(s, m): [] for s in ("api", "static") for m in ("file", "discard")}
    cpu: dict[str, list[float]] = {"api": [], "static": []}  # server CPU seconds per GB, file mode

    def cpu_s(p: psutil.Process) -> float:
        t = p.cpu_times()
        return t.user + t.system

    try:
        wait_http(f"{static_base}/", static, w.root / "http.server.log")
        procs = {"api": psutil.Process(w.server.pid), "static": psutil.Process(static.pid)}
        clients = {"api": ServerClient(w.base, w.owner_key), "static": ServerClient(static_base, None)}
        out = w.root / "downloads"
        out.mkdir(exist_ok=True)
        with open(w.emulator_path, "rb") as f:  # warm the page cache: both servers read from memory
            while f.read(8 * MB):
                pass
        for which, c in clients.items():  # warm-up: connection, route, imports
            _fetch_into(c, EmulatorRef(c.server, w.emulator_id), out / f"warm-{which}", 0, w.sha256, w.size, False)
            (out / f"warm-{which}").unlink()
        for rep in range(prof.download_reps):
            for which in (("api", "static") if rep % 2 == 0 else ("static", "api")):
                c = clients[which]
                part = out / f"{which}.part"
                part.unlink(missing_ok=True)
                c0, t0 = cpu_s(procs[which]), time.perf_counter()
                _fetch_into(c, EmulatorRef(c.server, w.emulator_id), part, 0, w.sha256, w.size, False)
                times[(which, "file")].append(time.perf_counter() - t0)
                cpu[which].append((cpu_s(procs[which]) - c0) / (w.size / 1024 ** 3))
                if part.stat().st_size != w.size:
                    raise RuntimeError(f"{which} download wrote {part.stat().st_size} of {w.size} bytes")
                part.unlink()
                t0 = time.perf_counter()
                n = 0
                with c.http.stream("GET", c.url(f"/v1/emulators/{w.emulator_id}/file")) as r:
                    r.raise_for_status()
                    for chunk in r.iter_bytes():
                        n += len(chunk)
                times[(which, "discard")].append(time.perf_counter() - t0)
                if n != w.size:
                    raise RuntimeError(f"{which} stream gave {n} of {w.size} bytes")
        for c in clients.values():
            c.close()
    finally:
        stop(static)
        shutil.rmtree(w.root / "downloads", ignore_errors=True)
    tp = {k: w.size / statistics.median(v) / MB for k, v in times.items()}
    ratio = tp[("api", "file")] / tp[("static", "file")]
    paired = statistics.median(s / a for a, s in zip(times[("api", "file")], times[("static", "file")]))
    best = min(times[("static", "file")]) / min(times[("api", "file")])
    return [record("download_throughput_api", _r(tp[("api", "file")], 1), "MB/s",
                   baseline=_r(tp[("static", "file")], 1), ratio=_r(ratio, 3), target="ratio >= 0.8",
                   met=ratio >= 0.8, file_bytes=w.size, reps=prof.download_reps,
                   api_seconds=[_r(t, 3) for t in times[("api", "file")]],
                   static_seconds=[_r(t, 3) for t in times[("static", "file")]],
                   client="data_owner_client.transfer._fetch_into (httpx stream, iter_bytes, write to a .part file)",
                   baseline_server="python -m http.server (same file, same URL path, loopback)",
                   ratio_paired_median=_r(paired, 3), ratio_best_of=_r(best, 3),
                   server_cpu_s_per_gb={"api": _r(statistics.median(cpu["api"]), 3),
                                        "static": _r(statistics.median(cpu["static"]), 3)},
                   transport_only={"api_mb_s": _r(tp[("api", "discard")], 1),
                                   "static_mb_s": _r(tp[("static", "discard")], 1),
                                   "ratio": _r(tp[("api", "discard")] / tp[("static", "discard")], 3),
                                   "api_seconds": [_r(t, 3) for t in times[("api", "discard")]],
                                   "static_seconds": [_r(t, 3) for t in times[("static", "discard")]],
                                   "how": "same httpx stream, bytes discarded (no disk writes on the client)"})]


# ---------------------------------------------------------------- 2. verification throughput


def bench_verify(w: World, prof: Profile) -> list[dict[str, Any]]:
    from shared.signing import (
        trusted_keys_from_listing,
        verify_file,
        verify_signed_manifest,
    )

    path = w.emulator_path
    trusted = trusted_keys_from_listing(w.keys_listing)

    def client_verify() -> None:
        manifest = verify_signed_manifest(w.signed, trusted)
        verify_file(path, manifest)

    def raw_hash() -> None:
        with open(path, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        if digest != w.sha256:
            raise RuntimeError("raw sha256 differs from the manifest")

    client_verify()  # warm: page cache and imports
    raw_hash()
    times: dict[str, list[float]] = {"verify": [], "raw": []}
    for rep in range(prof.verify_reps):
        order = (("verify", client_verify), ("raw", raw_hash))
        for which, fn in (order if rep % 2 == 0 else order[::-1]):
            t0 = time.perf_counter()
            fn()
            times[which].append(time.perf_counter() - t0)
    v, r = statistics.median(times["verify"]), statistics.median(times["raw"])
    v_tp, r_tp = w.size / v / MB, w.size / r / MB
    ratio = v_tp / r_tp
    return [record("verify_throughput_client", _r(v_tp, 1), "MB/s", baseline=_r(r_tp, 1), ratio=_r(ratio, 3),
                   target="ratio >= 0.9", met=ratio >= 0.9, file_bytes=w.size, reps=prof.verify_reps,
                   verify_seconds=[_r(t, 4) for t in times["verify"]], raw_seconds=[_r(t, 4) for t in times["raw"]],
                   path="shared.signing.verify_signed_manifest + verify_file",
                   baseline_path="hashlib.file_digest(f, 'sha256') (page-cached file)")]


# ---------------------------------------------------------------- 3. server memory


def bench_memory(w: World, prof: Profile, work: Path) -> list[dict[str, Any]]:
    from safetensors.torch import save_file

    from data_owner_client.errors import ServerError
    from data_owner_client.transfer import EmulatorRef, ServerClient, upload_adapter
    from shared.adapter import extract_adapter
    from shared.emulator_file import load_emulator

    ref = EmulatorRef(w.base, w.emulator_id)
    loaded = load_emulator(w.emulator_path)
    tensors = extract_adapter(loaded.model, loaded.plan.adapter_layers)
    del loaded
    adapter_file = w.root / "adapter_layers.safetensors"
    save_file(tensors, adapter_file, metadata={"format": "pt"})
    del tensors
    adapter_bytes = adapter_file.stat().st_size
    eval_file = w.root / "eval.txt"
    eval_file.write_text(corpus_file(work).read_text()[:4000])

    with ServerClient(w.base, w.owner_key, timeout=600) as client:
        # Warm-up: a small invalid adapter (rejected with 422) makes the server import its lazy validation
        # modules (torch, safetensors) so that one-time import cost is not counted as upload buffering.
        junk = w.root / "junk.safetensors"
        junk.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
        try:
            upload_adapter(client, ref, junk, eval_data=eval_file)
            log("warning: the server accepted the junk warm-up adapter")
        except ServerError as exc:  # expected: 422 invalid_adapter
            if exc.status_code != 422:
                raise
        uploads = []
        for _ in range(prof.uploads):
            rss, created = measure_rss(w.server.pid, lambda: upload_adapter(client, ref, adapter_file,
                                                                           eval_data=eval_file, metrics={"bench": 1.0}))
            if created.adapter.status not in ("evaluating", "queued", "pending", "evaluated"):
                log(f"unexpected adapter status {created.adapter.status}")
            rss["adapter_id"] = created.adapter.id
            uploads.append(rss)
    upload_growth = max(u["growth_mb"] for u in uploads)

    # 8 parallel downloads of the emulator, bytes discarded on the client side.
    errors: list[str] = []
    got: list[int] = []

    def one() -> None:
        try:
            with httpx.Client(headers={"Authorization": f"Bearer {w.owner_key}"}, timeout=600) as c:
                n = 0
                with c.stream("GET", f"{w.base}/v1/emulators/{w.emulator_id}/file") as r:
                    r.raise_for_status()
                    for chunk in r.iter_bytes():
                        n += len(chunk)
                got.append(n)
        except Exception as exc:  # noqa: BLE001
            errors.append(repr(exc))

    def parallel() -> None:
        threads = [threading.Thread(target=one) for _ in range(prof.parallel)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    dl, _ = measure_rss(w.server.pid, parallel)
    if errors or len(got) != prof.parallel or any(n != w.size for n in got):
        raise RuntimeError(f"parallel downloads failed: {errors or got}")
    agg = prof.parallel * w.size / dl["seconds"] / MB
    return [
        record("server_rss_growth_adapter_upload", upload_growth, "MB", target="< 64 MB", met=upload_growth < 64,
               adapter_bytes=adapter_bytes, adapter_mb=_r(adapter_bytes / MB, 1), uploads=uploads,
               how="psutil RSS of the serve process every 20 ms; growth = peak during the request - median before; "
                   "client: data_owner_client.transfer.upload_adapter (multipart, with a small eval file)"),
        record("server_rss_growth_parallel_downloads", dl["growth_mb"], "MB", target="< 64 MB",
               met=dl["growth_mb"] < 64, parallel=prof.parallel, file_bytes=w.size, aggregate_mb_s=_r(agg, 1), **dl),
    ]


# ---------------------------------------------------------------- 4. stage 2 (+ the emulator for training)


def stage2(prof: Profile, work: Path, args: argparse.Namespace) -> tuple[list[dict[str, Any]], Path]:
    import torch

    from model_owner_server.scaleot.emulator import make_emulator
    from model_owner_server.scaleot.importance import (
        ImportanceConfig,
        corpus_blocks,
        estimate_importance,
        load_importance,
        save_importance,
    )
    from model_owner_server.scaleot.model_io import load_causal_lm, prepare_smollm2

    if prof.smollm2:
        # The same prepared folder benchmarks/privacy_utility.py uses by default (prepare_smollm2 is idempotent).
        model_dir = Path(args.model_dir) if args.model_dir else prepare_smollm2(REPO / ".cache" / "benchmarks" /
                                                                               "smollm2")
        model_name = "SmolLM2-135M-Instruct"
    else:
        from scaleot_samples.tiny import save_tiny_model_dir

        model_dir = work / "tiny-llama-8L-h64"
        if not (model_dir / "model.safetensors").is_file():
            save_tiny_model_dir(model_dir, "llama", n_layers=8, hidden=64)
        model_name = "tiny-llama-8L-h64"
    t0 = time.perf_counter()
    model, tok = load_causal_lm(model_dir)
    load_s = time.perf_counter() - t0
    corpus = corpus_file(work)
    key = hashlib.sha256(json.dumps([model_name, prof.stage1_steps, prof.stage1_seq_len,
                                     hashlib.sha256(corpus.read_bytes()).hexdigest()]).encode()).hexdigest()[:12]
    stage1_dir = work / "stage1" / f"{model_name}-{key}"
    if not ((stage1_dir / "importance.json").is_file() and (stage1_dir / "importance.safetensors").is_file()):
        log(f"stage 1 ({prof.stage1_steps} steps) -> {stage1_dir}")
        train_b, val_b = corpus_blocks(tok, corpus, prof.stage1_seq_len, max_blocks=64)
        cfg = ImportanceConfig(steps=prof.stage1_steps, batch_size=2, rl_interval=2, n_candidates=2,
                               bottleneck=64 if prof.smollm2 else 8, device="cpu")
        result = estimate_importance(model, train_b, val_b, cfg)
        tmp = stage1_dir.with_name(stage1_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        save_importance(result, tmp)
        shutil.rmtree(stage1_dir, ignore_errors=True)
        os.replace(tmp, stage1_dir)
    out = work / "emulators" / f"{model_name}-a{prof.n_adapter}-{prof.alpha:g}-{prof.beta:g}.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    importance = load_importance(stage1_dir)
    info = make_emulator(model, tok, importance, prof.n_adapter, prof.alpha, prof.beta, out)
    build_s = time.perf_counter() - t0
    full_params, full_bytes = int(info.extra["full_model_params"]), int(info.extra["full_model_bytes"])
    n_layers = len(info.plan.roles)
    plan = {r: sum(1 for x in info.plan.roles if str(getattr(x, "value", x)) == r)
            for r in ("adapter", "harmonizer", "frozen", "dropped")}
    common = {"model": model_name, "n_layers": n_layers, "n_adapter": prof.n_adapter, "alpha": prof.alpha,
              "beta": prof.beta, "plan": plan}
    del model
    torch.set_grad_enabled(True)
    return [
        record("stage2_build_seconds", _r(build_s, 2), "s", stage1_cache=str(stage1_dir),
               model_load_seconds=_r(load_s, 2), includes="load_importance + make_emulator (plan, SRC, build, save)",
               **common),
        record("emulator_size_bytes", info.size_bytes, "bytes", baseline=full_bytes,
               ratio=_r(info.size_bytes / full_bytes, 4), full_model_bytes=full_bytes,
               note="baseline: the full model's parameter bytes (fp32, tied embeddings once); value: the emulator "
                    "file as served (safetensors + metadata)", **common),
        record("emulator_params", info.n_params, "params", baseline=full_params, ratio=_r(info.n_params / full_params, 4),
               **common),
    ], out


# ---------------------------------------------------------------- 5. training step


def bench_train(prof: Profile, emulator_path: Path, work: Path) -> list[dict[str, Any]]:
    import torch
    import torch.nn.functional as F

    from data_owner_client.train import (
        TrainConfig,
        freeze_except_adapter,
        resolve_device,
        set_seed,
        train,
    )
    from shared.data import collate, load_dataset, pad_id_for, training_examples
    from shared.emulator_file import load_emulator

    loaded = load_emulator(emulator_path)
    model, tok, plan = loaded.model, loaded.tokenizer, loaded.plan
    choice = resolve_device("cpu")
    examples = training_examples(load_dataset(corpus_file(work)), tok, prof.train_seq_len)
    if len(examples) < prof.train_batch:
        raise RuntimeError("corpus too small for one batch")
    pad_id = pad_id_for(tok)
    freeze_except_adapter(model, plan.adapter_layers)  # the client's own freezing
    params = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)
    cfg = TrainConfig(method="full", max_steps=prof.train_steps, batch_size=prof.train_batch,
                      seq_len=prof.train_seq_len, seed=0)
    batch = collate(examples[:prof.train_batch], pad_id)  # same shape as every batch `train` draws

    def client_round() -> list[float]:
        stamps: list[float] = []
        set_seed(0)
        train(model, examples, cfg, choice, pad_id=pad_id, checkpoint_dir=None, progress=False,
              on_step=lambda step, loss: stamps.append(time.perf_counter()))
        dts = [b - a for a, b in itertools.pairwise(stamps)]  # steps 2..S (step 1 has no start stamp)
        return dts[max(0, prof.train_warmup - 1):]  # steps W+1..S, as in plain_round

    def plain_round() -> list[float]:
        model.train()
        opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        dts = []
        for _ in range(prof.train_steps):
            t0 = time.perf_counter()
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            dts.append(time.perf_counter() - t0)
        model.eval()
        return dts[prof.train_warmup:]

    client: list[float] = []
    plain: list[float] = []
    for rnd in range(prof.train_rounds):
        for which in (("client", "plain") if rnd % 2 == 0 else ("plain", "client")):
            (client if which == "client" else plain).extend(client_round() if which == "client" else plain_round())
        log(f"train round {rnd + 1}/{prof.train_rounds}: client median {statistics.median(client):.3f}s, "
            f"plain median {statistics.median(plain):.3f}s")
    c, p = statistics.median(client), statistics.median(plain)
    ratio = c / p
    return [record("train_step_client", _r(c, 4), "s/step", baseline=_r(p, 4), ratio=_r(ratio, 3),
                   target="ratio <= 1.05", met=ratio <= 1.05, method="full", batch=prof.train_batch,
                   seq_len=prof.train_seq_len, rounds=prof.train_rounds, steps_per_round=prof.train_steps,
                   warmup_skipped_per_round=prof.train_warmup, trainable_params=n_trainable,
                   adapter_layers=list(plan.adapter_layers), emulator=emulator_path.name,
                   client_step_seconds=[_r(x, 4) for x in client], plain_step_seconds=[_r(x, 4) for x in plain],
                   path="data_owner_client.train.train (no checkpoint dir, progress off)",
                   baseline_path="forward, cross-entropy, backward, AdamW step, zero_grad on the same parameters")]


# ---------------------------------------------------------------- output


def machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"logical_cores": os.cpu_count(), "physical_cores": psutil.cpu_count(logical=False), "cpu": cpu,
            "memory_gb": _r(psutil.virtual_memory().total / 1024 ** 3, 1), "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
            "load_avg_start": [_r(x, 2) for x in os.getloadavg()]}


def fmt_value(r: dict[str, Any]) -> str:
    v, unit = r["value"], r["unit"]
    if unit == "bytes":
        return f"{v / MB:.1f} MB"
    if unit == "params":
        return f"{v / 1e6:.2f} M"
    return f"{v:g} {unit}"


def fmt_baseline(r: dict[str, Any]) -> str:
    b = r["baseline"]
    if b is None:
        return "–"
    return fmt_value({**r, "value": b})


TITLES = {
    "download_throughput_api": "Emulator download via API (vs `python -m http.server`)",
    "verify_throughput_client": "Client signature + sha256 verify (vs raw `hashlib.sha256`)",
    "train_step_client": "Client training step, method full (vs plain PyTorch loop)",
    "server_rss_growth_adapter_upload": "Server RSS growth, adapter upload",
    "server_rss_growth_parallel_downloads": "Server RSS growth, parallel emulator downloads",
    "stage2_build_seconds": "Stage 2 emulator build from cached stage 1",
    "emulator_size_bytes": "Emulator file size (vs full model)",
    "emulator_params": "Emulator parameters (vs full model)",
}


def table(records: list[dict[str, Any]]) -> str:
    lines = ["| Measurement | Value | Baseline | Ratio | Target | Met |", "|---|---|---|---|---|---|"]
    for r in records:
        title = TITLES.get(r["name"], r["name"])
        d = r["details"]
        if r["name"] == "server_rss_growth_adapter_upload":
            title += f" ({d['adapter_mb']:.0f} MB adapter)"
        if r["name"] == "server_rss_growth_parallel_downloads":
            title += f" ({d['parallel']} x {d['file_bytes'] / MB:.0f} MB)"
        if r["name"] == "stage2_build_seconds":
            title += f" ({d['model']}, N_a={d['n_adapter']}, α={d['alpha']:g}, β={d['beta']:g})"
        met = "–" if r["met"] is None else ("met" if r["met"] else "**missed**")
        ratio = "–" if r["ratio"] is None else f"{r['ratio']:g}"
        lines.append(f"| {title} | {fmt_value(r)} | {fmt_baseline(r)} | {ratio} | {r['target'] or '–'} | {met} |")
    return "\n".join(lines)


def notes(records: list[dict[str, Any]]) -> list[str]:
    """Measured context for each row (and the known cause of a missed target), generated from the numbers."""
    by = {r["name"]: r for r in records}
    out = []
    if "download_throughput_api" in by:
        r = by["download_throughput_api"]
        d = r["details"]
        cpu, tr = d["server_cpu_s_per_gb"], d["transport_only"]
        out.append(f"- Download: {d['file_bytes'] / MB:.0f} MB file, {d['reps']} interleaved repetitions; paired-median "
                   f"ratio {d['ratio_paired_median']:g}, best-of ratio {d['ratio_best_of']:g}; without the client's "
                   f"disk writes (bytes discarded) {tr['api_mb_s']:g} vs {tr['static_mb_s']:g} MB/s (ratio "
                   f"{tr['ratio']:g}). Server CPU per GB served: API {cpu['api']:g} s, http.server {cpu['static']:g} s."
                   + ("" if r["met"] else " Missed: the API server (pure-Python h11 + asyncio, 1 MB chunks through "
                      "the thread pool) needs several times the CPU per byte of http.server's blocking `sendall`, so "
                      "on this shared, CPU-contended machine it loses throughput; see the report for the fix."))
    if "server_rss_growth_adapter_upload" in by:
        r = by["server_rss_growth_adapter_upload"]
        d = r["details"]
        reps = ", ".join(f"{u['growth_mb']:g}" for u in d["uploads"])
        out.append(f"- Upload: adapter of {d['adapter_bytes'] / MB:.1f} MB; growth per upload {reps} MB (the row "
                   f"shows the largest, {r['value'] / d['adapter_mb']:.1f}x the adapter)."
                   + ("" if r["met"] else " Missed: the upload route validates the adapter with "
                      "`shared.adapter.load_and_validate_adapter_file`, which loads every tensor into memory "
                      "(safetensors `load_file` plus `isfinite` temporaries); the multipart intake itself streams "
                      "to a temp file. A chunked validator keeps the peak at a fixed buffer."))
    if "server_rss_growth_parallel_downloads" in by:
        d = by["server_rss_growth_parallel_downloads"]["details"]
        out.append(f"- Parallel downloads: {d['parallel']} concurrent streams, {d['aggregate_mb_s']:g} MB/s in total.")
    if "train_step_client" in by:
        d = by["train_step_client"]["details"]
        out.append(f"- Training step: emulator `{d['emulator']}`, batch {d['batch']} x {d['seq_len']} tokens, "
                   f"{d['trainable_params'] / 1e6:.1f} M trainable parameters (adapter layers {d['adapter_layers']}), "
                   f"{d['rounds']} rounds x {d['steps_per_round']} steps, {d['warmup_skipped_per_round']} warm-up "
                   "steps per round skipped.")
    if "stage2_build_seconds" in by:
        d = by["stage2_build_seconds"]["details"]
        plan = ", ".join(f"{n} {role}" for role, n in d["plan"].items())
        out.append(f"- Stage 2: plan {plan} over {d['n_layers']} layers; loading the full model took "
                   f"{d['model_load_seconds']:g} s more (not included).")
    return out


def markdown(doc: dict[str, Any]) -> str:
    m, cmd, served = doc["machine"], doc["command"], doc["served_model"]
    header = (f"Profile `{doc['profile']}`, {doc['created_at']}. Machine: {m['logical_cores']} logical cores "
              f"({m['cpu']}), {m['memory_gb']} GB RAM, Python {m['python']}, torch {m['torch']} "
              f"({m['torch_threads']} threads); CPU only, shared with other work (load average "
              f"{m['load_avg_start'][0]} at start, {doc['load_avg_end'][0]} at the end). Each ratio compares two "
              "paths measured in the same run, interleaved.")
    how = [
        ("- **Download**: the client's streaming download (`data_owner_client.transfer._fetch_into`, httpx, writes "
         "a `.part` file) of the emulator from a real `modelowner-server serve` process, against the same function "
         "reading the same file (hard link, same URL path) from `python -m http.server`, both on 127.0.0.1; ratio "
         "of the median throughputs over interleaved repetitions, file in the page cache."),
        ("- **Verify**: `shared.signing.verify_signed_manifest` + `verify_file` on the emulator file against "
         "`hashlib.file_digest(f, 'sha256')` over the same (page-cached) file."),
        ("- **Training step**: `data_owner_client.train.train` (method full, only the adapter layers trainable) "
         "against a minimal loop (forward, cross-entropy, backward, AdamW step) on the same emulator, parameters "
         "and batch shape; median steady-state step time, warm-up steps of each round skipped, rounds interleaved."),
        ("- **Server RSS**: psutil RSS of the server process sampled every 20 ms; growth = peak during the "
         "request(s) minus the median before. The upload is a real, valid adapter (every tensor of the emulator's "
         f"adapter layer of a synthetic LLaMA: hidden {served['hidden']}, FFN {served['ffn']}, {served['layers']} "
         "layers), sent by `upload_adapter` with an eval file; a rejected tiny upload first warms the server's "
         "lazy imports. Stage 1 and the emulator build run in a separate `modelowner-server worker` process that "
         "is stopped before measuring, so the evaluation job does not run inside the measured process."),
        ("- **Stage 2**: `load_importance` + `make_emulator` (plan, SRC, build, save) from a cached stage-1 folder "
         "(a few `estimate_importance` steps), full model already loaded."),
    ]
    return "\n".join([
        DOCS_START, "## Systems benchmark", "", header, "", table(doc["records"]), "", *notes(doc["records"]), "",
        ("How each row is measured (`benchmarks/systems.py`; every number and repetition is in "
         "`benchmarks/results/systems.json`):"),
        "", *how, "",
        f"Reproduce: `{cmd}` (about {doc['seconds'] / 60:.0f} minutes here; `--quick` for a smaller run).",
        DOCS_END,
    ])


def update_docs(path: Path, block: str) -> None:
    """Replace (or append) the block between the systems markers; leave the rest of the file untouched."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(block + "\n")
        return
    text = path.read_text()
    start, end = text.find(DOCS_START), text.find(DOCS_END)
    if start != -1 and end != -1 and end > start:
        new = text[:start] + block + text[end + len(DOCS_END):]
    else:
        new = text + ("" if text.endswith("\n") or not text else "\n") + ("\n" if text else "") + block + "\n"
    tmp = path.with_name(path.name + ".systems.tmp")
    tmp.write_text(new)
    os.replace(tmp, path)


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="smaller files and fewer repetitions")
    g.add_argument("--tiny", action="store_true", help="tiny random models, small files (smoke test)")
    p.add_argument("--work-dir", default=str(REPO / ".cache" / "benchmarks" / "systems"), help="caches")
    p.add_argument("--model-dir", default=None, help="a prepared SmolLM2 folder (default: prepare_smollm2 into "
                                                    ".cache/benchmarks/smollm2)")
    p.add_argument("--render", default=None, metavar="JSON",
                   help="only re-render: print the table of an existing results JSON and update --docs from it")
    p.add_argument("--out", default=None, help="JSON output (full: benchmarks/results/systems.json; "
                                               "else <work-dir>/systems_<profile>.json)")
    p.add_argument("--docs", default=None, help="markdown file whose systems block is replaced "
                                                "(full: docs/benchmarks.md; else none)")
    p.add_argument("--no-docs", action="store_true", help="do not touch any markdown file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.render:
        doc = json.loads(Path(args.render).read_text())
        docs = None if args.no_docs else Path(args.docs) if args.docs else (
            REPO / "docs" / "benchmarks.md" if doc["profile"] == "full" else None)
        if docs is not None:
            update_docs(docs, markdown(doc))
        print(table(doc["records"]))
        return doc
    prof = PROFILES["tiny" if args.tiny else "quick" if args.quick else "full"]
    work = Path(args.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out) if args.out else (REPO / "benchmarks" / "results" / "systems.json" if prof.name == "full"
                                           else work / f"systems_{prof.name}.json")
    docs = None if args.no_docs else (Path(args.docs) if args.docs else
                                      (REPO / "docs" / "benchmarks.md" if prof.name == "full" else None))
    cmd = ".venv/bin/python benchmarks/systems.py" + {"full": "", "quick": " --quick", "tiny": " --tiny"}[prof.name]
    t_start = time.perf_counter()
    info = machine()
    log(f"profile {prof.name}; machine {info['logical_cores']} cores, load {info['load_avg_start']}")
    records: list[dict[str, Any]] = []
    root = Path(tempfile.mkdtemp(prefix="scaleot-systems-"))
    world = None
    try:
        log("starting the server world (synthetic model, stage 1, emulator)")
        world = start_world(prof, work, root)
        log(f"emulator {world.emulator_id}: {world.size / MB:.1f} MB; setup {world.setup_seconds:.0f}s")
        log("download throughput")
        records += bench_download(world, prof)
        log("verification throughput")
        records += bench_verify(world, prof)
        log("server memory: upload and parallel downloads")
        records += bench_memory(world, prof, work)
    finally:
        if world is not None:
            stop(world.server)
        shutil.rmtree(root, ignore_errors=True)
    log("stage 2 build")
    s2, emulator_path = stage2(prof, work, args)
    log("training step")
    records += bench_train(prof, emulator_path, work)
    records += s2
    seconds = time.perf_counter() - t_start
    doc = {"benchmark": "systems", "profile": prof.name, "created_at": datetime.now(UTC).isoformat(
        timespec="seconds"), "command": cmd, "seconds": round(seconds, 1), "machine": info,
        "load_avg_end": [_r(x, 2) for x in os.getloadavg()],
        "served_model": {"family": "llama", "hidden": prof.hidden, "ffn": prof.ffn, "layers": prof.n_layers,
                         "heads": prof.heads, "emulator": SERVED_EMULATOR},
        "records": records, "complete": True}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    block = markdown(doc)
    if docs is not None:
        update_docs(docs, block)
    print(table(records))
    targets = [r for r in records if r["met"] is not None]
    print(f"\n{sum(r['met'] for r in targets)}/{len(targets)} targets met; {out}"
          + (f"; {docs}" if docs is not None else "") + f"; {seconds:.0f}s")
    return doc


if __name__ == "__main__":
    main()
