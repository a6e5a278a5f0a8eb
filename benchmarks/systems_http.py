"""The systems benchmark's HTTP rows, on the running server world: the client's download against
`python -m http.server`, the client's verify path against a raw sha256, and the server's RSS during an adapter
upload and parallel emulator downloads."""

from __future__ import annotations

import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

from benchmarks.harness import log
from benchmarks.measure import record, rounded
from benchmarks.systems_world import (
    MB,
    World,
    corpus_file,
    measure_rss,
    wait_http,
)
from tooling.procs import free_port, stop_process

# ---------------------------------------------------------------- 1. download throughput


def bench_download(w: World, prof: Any) -> list[dict[str, Any]]:
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
        static = subprocess.Popen(
            [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(static_root)],
            stdout=static_log,
            stderr=subprocess.STDOUT,
        )
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
            for which in ("api", "static") if rep % 2 == 0 else ("static", "api"):
                c = clients[which]
                part = out / f"{which}.part"
                part.unlink(missing_ok=True)
                c0, t0 = cpu_s(procs[which]), time.perf_counter()
                _fetch_into(c, EmulatorRef(c.server, w.emulator_id), part, 0, w.sha256, w.size, False)
                times[(which, "file")].append(time.perf_counter() - t0)
                cpu[which].append((cpu_s(procs[which]) - c0) / (w.size / 1024**3))
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
        stop_process(static)
        shutil.rmtree(w.root / "downloads", ignore_errors=True)
    tp = {k: w.size / statistics.median(v) / MB for k, v in times.items()}
    ratio = tp[("api", "file")] / tp[("static", "file")]
    paired = statistics.median(s / a for a, s in zip(times[("api", "file")], times[("static", "file")], strict=True))
    best = min(times[("static", "file")]) / min(times[("api", "file")])
    return [
        record(
            "download_throughput_api",
            rounded(tp[("api", "file")], 1),
            "MB/s",
            baseline=rounded(tp[("static", "file")], 1),
            ratio=rounded(ratio, 3),
            target="ratio >= 0.8",
            met=ratio >= 0.8,
            file_bytes=w.size,
            reps=prof.download_reps,
            api_seconds=[rounded(t, 3) for t in times[("api", "file")]],
            static_seconds=[rounded(t, 3) for t in times[("static", "file")]],
            client="data_owner_client.transfer._fetch_into (httpx stream, iter_bytes, write to a .part file)",
            baseline_server="python -m http.server (same file, same URL path, loopback)",
            ratio_paired_median=rounded(paired, 3),
            ratio_best_of=rounded(best, 3),
            server_cpu_s_per_gb={
                "api": rounded(statistics.median(cpu["api"]), 3),
                "static": rounded(statistics.median(cpu["static"]), 3),
            },
            transport_only={
                "api_mb_s": rounded(tp[("api", "discard")], 1),
                "static_mb_s": rounded(tp[("static", "discard")], 1),
                "ratio": rounded(tp[("api", "discard")] / tp[("static", "discard")], 3),
                "api_seconds": [rounded(t, 3) for t in times[("api", "discard")]],
                "static_seconds": [rounded(t, 3) for t in times[("static", "discard")]],
                "how": "same httpx stream, bytes discarded (no disk writes on the client)",
            },
        )
    ]


# ---------------------------------------------------------------- 2. verification throughput


def bench_verify(w: World, prof: Any) -> list[dict[str, Any]]:
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
        for which, fn in order if rep % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            fn()
            times[which].append(time.perf_counter() - t0)
    v, r = statistics.median(times["verify"]), statistics.median(times["raw"])
    v_tp, r_tp = w.size / v / MB, w.size / r / MB
    ratio = v_tp / r_tp
    return [
        record(
            "verify_throughput_client",
            rounded(v_tp, 1),
            "MB/s",
            baseline=rounded(r_tp, 1),
            ratio=rounded(ratio, 3),
            target="ratio >= 0.9",
            met=ratio >= 0.9,
            file_bytes=w.size,
            reps=prof.verify_reps,
            verify_seconds=[rounded(t, 4) for t in times["verify"]],
            raw_seconds=[rounded(t, 4) for t in times["raw"]],
            path="shared.signing.verify_signed_manifest + verify_file",
            baseline_path="hashlib.file_digest(f, 'sha256') (page-cached file)",
        )
    ]


# ---------------------------------------------------------------- 3. server memory


def bench_memory(w: World, prof: Any, work: Path) -> list[dict[str, Any]]:
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
            rss, created = measure_rss(
                w.server.pid,
                lambda: upload_adapter(client, ref, adapter_file, eval_data=eval_file, metrics={"bench": 1.0}),
            )
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
        except Exception as exc:
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
        record(
            "server_rss_growth_adapter_upload",
            upload_growth,
            "MB",
            target="< 64 MB",
            met=upload_growth < 64,
            adapter_bytes=adapter_bytes,
            adapter_mb=rounded(adapter_bytes / MB, 1),
            uploads=uploads,
            how="psutil RSS of the serve process every 20 ms; growth = peak during the request - median before; "
            "client: data_owner_client.transfer.upload_adapter (multipart, with a small eval file)",
        ),
        record(
            "server_rss_growth_parallel_downloads",
            dl["growth_mb"],
            "MB",
            target="< 64 MB",
            met=dl["growth_mb"] < 64,
            parallel=prof.parallel,
            file_bytes=w.size,
            aggregate_mb_s=rounded(agg, 1),
            **dl,
        ),
    ]
