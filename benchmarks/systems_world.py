"""The systems benchmark's world: a real `modelowner-server serve` process with organisations, a synthetic model
registered, stage 1 and one emulator built by a separate worker process (stopped before any measurement);
process helpers (console scripts, waiting for HTTP, stopping) and the RSS sampler the memory rows use."""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import httpx
import psutil

from benchmarks.harness import REPO
from benchmarks.measure import rounded
from tooling.procs import ServeProcess, console_script, stop_process, wait_job, wait_until

MB = 1024 * 1024
SERVED_EMULATOR = {"n_adapter": 1, "alpha": 0.5, "beta": 0.0}  # one adapter layer: the >= 100 MB upload


# ---------------------------------------------------------------- processes and RSS


def _log_tail(path: Path) -> str:
    return path.read_text(errors="replace")[-3000:] if path.exists() else ""


def _alive(proc: subprocess.Popen, what: str, log_file: Path) -> Callable[[], None]:
    def check() -> None:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{_log_tail(log_file)}")

    return check


def wait_http(url: str, proc: subprocess.Popen, log_file: Path, timeout: float = 120) -> None:
    """Until `url` answers below 500; RuntimeError with the end of the log when `proc` exits first."""

    def answers() -> bool:
        try:
            return httpx.get(url, timeout=2).status_code < 500
        except httpx.TransportError:
            return False

    try:
        wait_until(answers, timeout=timeout, interval=0.2, alive=_alive(proc, url, log_file), what=url)
    except TimeoutError as exc:
        raise RuntimeError(f"{exc}:\n{_log_tail(log_file)}") from None


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
    return {
        "baseline_mb": rounded(base / MB, 1),
        "peak_mb": rounded(peak / MB, 1),
        "growth_mb": rounded((peak - base) / MB, 1),
        "after_mb": rounded(statistics.median(after) / MB, 1) if after else None,
        "samples": len(during),
        "seconds": rounded(t1 - t0, 3),
    }, result


# ---------------------------------------------------------------- inputs


def corpus_file(work: Path) -> Path:
    """A plain-text corpus (stage 1 and training data) from the repository's own documentation."""
    out = work / "corpus.txt"
    if not out.is_file():
        parts = [
            p.read_text(errors="replace")
            for p in sorted(REPO.glob("*.md")) + sorted((REPO / "docs").glob("*.md"))
            if p.name != "benchmarks.md"
        ]
        text = "\n\n".join(parts)
        while len(text) < 60_000:
            text += "\n\n" + text
        work.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, out)
    return out


def synthetic_model_dir(work: Path, prof: Any) -> Path:
    """A local HF LLaMA folder (safetensors + byte-level tokenizer) with large layers; cached by shape."""
    out = work / f"served-llama-h{prof.hidden}-f{prof.ffn}-l{prof.n_layers}"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from scaleot_samples.tiny import EOS, byte_tokenizer

    tok = byte_tokenizer()
    eos = tok.convert_tokens_to_ids(EOS)
    cfg = LlamaConfig(
        num_hidden_layers=prof.n_layers,
        hidden_size=prof.hidden,
        intermediate_size=prof.ffn,
        num_attention_heads=prof.heads,
        num_key_value_heads=prof.heads,
        vocab_size=len(tok),
        max_position_embeddings=512,
        bos_token_id=eos,
        eos_token_id=eos,
        tie_word_embeddings=True,
    )
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
    server: ServeProcess
    emulator_id: str
    emulator_path: Path  # inside the server's data dir
    size: int
    sha256: str
    signed: dict[str, Any]
    keys_listing: dict[str, Any]
    root: Path
    log_file: Path
    setup_seconds: float


def start_world(prof: Any, work: Path, root: Path) -> World:
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
    env = {
        **os.environ,
        "SCALEOT_DATA_DIR": str(data_dir),
        "SCALEOT_DEVICE": "cpu",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "SCALEOT_IMPORTANCE_SEQ_LEN": "32",
        "SCALEOT_IMPORTANCE_BATCH_SIZE": "2",
        "SCALEOT_IMPORTANCE_MAX_BLOCKS": "64",
        "SCALEOT_EMBEDDED_WORKER": "false",
    }
    for k in (
        "SCALEOT_API_KEY",
        "SCALEOT_SERVER_PUBKEY",
        "SCALEOT_DATABASE_URL",
        "SCALEOT_QUEUE_URL",
        "SCALEOT_SIGNING_KEY",
        "SCALEOT_PUBLIC_URL",
        "SCALEOT_DEFAULT_EVAL",
        "SCALEOT_DEFAULT_CORPUS",
    ):
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

    log_file = root / "server.log"
    server = ServeProcess(env, log_file, args=("--no-worker", "--log-level", "warning"), cwd=root)
    base = server.url
    worker = None
    try:
        server.start()
        with open(root / "worker.log", "w") as worker_log:
            worker = subprocess.Popen(
                [*console_script("modelowner-server"), "worker"],
                env=env,
                cwd=root,
                stdout=worker_log,
                stderr=subprocess.STDOUT,
            )
        worker_alive = _alive(worker, "the worker", root / "worker.log")
        admin = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {admin_key}"}, timeout=120)
        owner = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {owner_key}"}, timeout=120)
        with admin, owner:
            r = admin.post("/v1/models", json={"name": "served-llama", "path": str(model_dir)})
            r.raise_for_status()
            model_id = r.json()["id"]
            admin.post(f"/v1/models/{model_id}/grants", json={"org": "acme"}).raise_for_status()
            r = admin.post(f"/v1/models/{model_id}/importance", json={"steps": 2, "corpus": str(corpus)})
            r.raise_for_status()
            wait_job(admin, r.json()["id"], timeout=900, interval=0.3, succeeded=True, alive=worker_alive)
            r = owner.post("/v1/emulators", json={"model_id": model_id, **SERVED_EMULATOR})
            r.raise_for_status()
            created = r.json()
            if created.get("job"):
                wait_job(owner, created["job"]["id"], timeout=900, interval=0.3, succeeded=True, alive=worker_alive)
            emu_id = created["emulator"]["id"]
            emu = owner.get(f"/v1/emulators/{emu_id}").json()
            signed = owner.get(f"/v1/emulators/{emu_id}/signature").json()
            listing = owner.get("/v1/signing-keys").json()
    except BaseException:
        stop_process(worker)
        server.stop()
        raise
    stop_process(worker)  # measurements see the API process alone
    path = data_dir / "emulators" / f"{emu_id}.safetensors"
    if not path.is_file():
        matches = list(data_dir.rglob(f"{emu_id}*.safetensors"))
        path = matches[0]
    return World(
        base,
        admin_key,
        owner_key,
        server,
        emu_id,
        path,
        int(emu["size_bytes"]),
        emu["sha256"],
        signed,
        listing,
        root,
        log_file,
        time.perf_counter() - t_setup,
    )
