"""Load run: many data owners at once against a real `modelowner-server serve` on 127.0.0.1.

    .venv/bin/python -m reliability.load --downloaders 32 --uploaders 8 --pollers 8 --duration 30

- downloaders stream the emulator file over and over (each checks the byte count; every 10th also the
  sha256);
- uploaders post a valid adapter, then poll its evaluation job until it finishes, then upload again;
- pollers hit the control endpoints (job status, emulator description, model list, /healthz) ~10x/s each.
Every request must end in a 2xx, a clean 4xx or a 503: a transport error (reset, timeout) counts as
*lost*, any other status as *unexpected*. Reported: throughput, p50/p99 latency per endpoint group,
and the server's peak resident memory (psutil, sampled every 0.25 s). Loopback only, bounded in time.
The request limits and hourly quotas are off here (a few keys stand for many clients, and this run measures
throughput); `python -m reliability.flood` measures the limits: one organization's flood against another's
latency.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import secrets
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from reliability.harness import (
    ServerProcess,
    adapter_bytes_for,
    bootstrap,
    client,
    consistency_problems,
    fresh_database,
    importance_and_emulator,
    make_inputs,
    server_env,
)
from tooling.procs import wait_jobs_settled

ACCEPTED = {200, 202, 206} | set(range(400, 500)) | {503}
NO_QUOTAS = {  # see the module docstring
    f"SCALEOT_{name}": "0"
    for name in (
        "RATE_LIMIT_PER_KEY",
        "RATE_LIMIT_PER_ORG",
        "QUOTA_EMULATOR_BUILDS_PER_HOUR",
        "QUOTA_ADAPTER_UPLOADS_PER_HOUR",
        "QUOTA_EVALUATIONS_PER_HOUR",
        "MAX_ACTIVE_JOBS_PER_ORG",
    )
}


@dataclass
class Stats:
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    statuses: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    lost: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    bytes_down: int = 0
    downloads_ok: int = 0
    bad_downloads: list[str] = field(default_factory=list)
    uploads_ok: int = 0
    evaluations: Counter = field(default_factory=Counter)

    def record(self, group: str, status: int, seconds: float, what: str) -> None:
        self.latencies[group].append(seconds)
        self.statuses[group][status] += 1
        if status not in ACCEPTED:
            self.unexpected.append(f"{what}: {status}")


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


async def _timed(stats: Stats, group: str, what: str, coro) -> httpx.Response | None:
    t0 = time.perf_counter()
    try:
        r = await coro
    except httpx.HTTPError as exc:
        stats.lost.append(f"{what}: {type(exc).__name__}: {exc}")
        return None
    stats.record(group, r.status_code, time.perf_counter() - t0, what)
    return r


async def _downloader(http: httpx.AsyncClient, emu: dict, stats: Stats, deadline: float, worker: int) -> None:
    n = 0
    while time.monotonic() < deadline:
        n += 1
        check_sha = n % 10 == 1
        h = hashlib.sha256() if check_sha else None
        got = 0
        t0 = time.perf_counter()
        try:
            async with http.stream("GET", f"/v1/emulators/{emu['id']}/file") as r:
                async for chunk in r.aiter_bytes():
                    got += len(chunk)
                    if h is not None:
                        h.update(chunk)
                status = r.status_code
        except httpx.HTTPError as exc:
            stats.lost.append(f"download#{worker}.{n}: {type(exc).__name__}: {exc}")
            continue
        stats.record("download (full file)", status, time.perf_counter() - t0, f"download#{worker}.{n}")
        if status == 200:
            stats.bytes_down += got
            if got != emu["size_bytes"] or (h is not None and h.hexdigest() != emu["sha256"]):
                stats.bad_downloads.append(f"download#{worker}.{n}: {got} bytes")
            else:
                stats.downloads_ok += 1


async def _uploader(
    http: httpx.AsyncClient, emu: dict, adapter: bytes, stats: Stats, deadline: float, worker: int
) -> None:
    n = 0
    while time.monotonic() < deadline:
        n += 1
        r = await _timed(
            stats,
            "upload adapter",
            f"upload#{worker}.{n}",
            http.post(f"/v1/emulators/{emu['id']}/adapters", files={"adapter": ("adapter.safetensors", adapter)}),
        )
        if r is None or r.status_code != 202:
            await asyncio.sleep(0.2)
            continue
        stats.uploads_ok += 1
        job_id = r.json()["job"]["id"]
        while True:  # poll the evaluation (counted as control traffic), even past the deadline
            await asyncio.sleep(0.2)
            j = await _timed(
                stats, "control: GET /v1/jobs/{id}", f"job-poll#{worker}.{n}", http.get(f"/v1/jobs/{job_id}")
            )
            if j is not None and j.status_code == 200 and j.json()["status"] in ("succeeded", "failed"):
                stats.evaluations[j.json()["status"]] += 1
                break
            if time.monotonic() > deadline + 120:
                stats.unexpected.append(f"job {job_id} unfinished 120 s after the run")
                break


async def _poller(
    http: httpx.AsyncClient,
    emu: dict,
    model_id: str,
    job_id: str,
    stats: Stats,
    deadline: float,
    worker: int,
    interval: float,
) -> None:
    targets = [
        ("control: GET /v1/jobs/{id}", f"/v1/jobs/{job_id}"),
        ("control: GET /v1/emulators/{id}", f"/v1/emulators/{emu['id']}"),
        ("control: GET /v1/models", "/v1/models"),
        ("control: GET /healthz", "/healthz"),
    ]
    n = 0
    while time.monotonic() < deadline:
        group, path = targets[(n + worker) % len(targets)]
        n += 1
        await _timed(stats, group, f"poll#{worker}.{n} {path}", http.get(path))
        await asyncio.sleep(interval)


class MemorySampler:
    def __init__(self, server: ServerProcess, every: float = 0.25):
        self.server, self.every = server, every
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="rss-sampler")

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = self.server.rss_bytes()
            if rss:
                self.samples.append(rss)
            self._stop.wait(self.every)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


async def _run(
    url: str,
    keys: dict[str, str],
    emu: dict,
    model_id: str,
    job_id: str,
    adapter: bytes,
    *,
    downloaders: int,
    uploaders: int,
    pollers: int,
    duration: float,
    poll_interval: float,
) -> Stats:
    stats = Stats()
    deadline = time.monotonic() + duration
    limits = httpx.Limits(max_connections=downloaders + uploaders + pollers + 8, max_keepalive_connections=64)
    timeout = httpx.Timeout(120.0, connect=10.0)
    owners = [k for k in keys if k != "admin"]

    def new_client(i: int) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=url,
            headers={"Authorization": f"Bearer {keys[owners[i % len(owners)]]}"},
            limits=limits,
            timeout=timeout,
        )

    clients = [new_client(i) for i in range(max(1, len(owners)))]
    try:
        tasks = [_downloader(clients[i % len(clients)], emu, stats, deadline, i) for i in range(downloaders)]
        tasks += [_uploader(clients[i % len(clients)], emu, adapter, stats, deadline, i) for i in range(uploaders)]
        # Pollers act as the emulator's creator (the first data owner), so the build job is theirs to see.
        tasks += [_poller(clients[0], emu, model_id, job_id, stats, deadline, i, poll_interval) for i in range(pollers)]
        await asyncio.gather(*tasks)
    finally:
        for c in clients:
            await c.aclose()
    return stats


def run_load(
    server: ServerProcess,
    keys: dict[str, str],
    emu: dict,
    model_id: str,
    adapter: bytes,
    *,
    downloaders: int,
    uploaders: int,
    pollers: int,
    duration: float,
    poll_interval: float = 0.1,
) -> dict[str, Any]:
    """Run the mixed load against a started server; returns the figures (see `summary_table`)."""
    with client(server.url, keys[next(k for k in keys if k != "admin")]) as http:
        job_id = http.get(f"/v1/emulators/{emu['id']}").json()["job_id"]
    rss_before = server.rss_bytes()
    t0 = time.monotonic()
    with MemorySampler(server) as mem:
        stats = asyncio.run(
            _run(
                server.url,
                keys,
                emu,
                model_id,
                job_id,
                adapter,
                downloaders=downloaders,
                uploaders=uploaders,
                pollers=pollers,
                duration=duration,
                poll_interval=poll_interval,
            )
        )
    elapsed = time.monotonic() - t0
    groups = {}
    for group, lat in sorted(stats.latencies.items()):
        groups[group] = {
            "requests": len(lat),
            "p50_ms": round(1000 * _pct(lat, 0.5), 1),
            "p99_ms": round(1000 * _pct(lat, 0.99), 1),
            "max_ms": round(1000 * max(lat), 1),
            "statuses": dict(sorted(stats.statuses[group].items())),
        }
    control = [x for g, lat in stats.latencies.items() if g.startswith("control") for x in lat]
    total = sum(len(v) for v in stats.latencies.values())
    return {
        "clients": {"downloaders": downloaders, "uploaders": uploaders, "pollers": pollers},
        "duration_s": round(elapsed, 1),
        "requests": total,
        "requests_per_s": round(total / elapsed, 1),
        "lost": len(stats.lost),
        "lost_examples": stats.lost[:5],
        "unexpected": len(stats.unexpected),
        "unexpected_examples": stats.unexpected[:5],
        "bad_downloads": len(stats.bad_downloads),
        "downloads_ok": stats.downloads_ok,
        "download_MiB_per_s": round(stats.bytes_down / elapsed / 2**20, 1),
        "emulator_bytes": emu["size_bytes"],
        "uploads_accepted": stats.uploads_ok,
        "evaluations": dict(stats.evaluations),
        "control_p50_ms": round(1000 * _pct(control, 0.5), 1),
        "control_p99_ms": round(1000 * _pct(control, 0.99), 1),
        "rss_before_MiB": round(rss_before / 2**20, 1),
        "rss_peak_MiB": round(max(mem.samples or [0]) / 2**20, 1),
        "groups": groups,
    }


def summary_table(r: dict[str, Any]) -> str:
    c = r["clients"]
    lines = [
        f"Load: {c['downloaders']} downloaders + {c['uploaders']} uploaders + {c['pollers']} pollers, "
        f"{r['duration_s']} s, emulator {r['emulator_bytes'] / 2**20:.2f} MiB",
        "",
        "| figure | value |",
        "|---|---|",
        f"| requests (all) | {r['requests']} ({r['requests_per_s']}/s) |",
        f"| lost (transport errors) / unexpected status / corrupt downloads | {r['lost']} / {r['unexpected']} / "
        f"{r['bad_downloads']} |",
        f"| emulator downloads completed | {r['downloads_ok']} ({r['download_MiB_per_s']} MiB/s) |",
        f"| adapter uploads accepted / evaluations finished | {r['uploads_accepted']} / "
        f"{sum(r['evaluations'].values())} {r['evaluations']} |",
        f"| control endpoints p50 / p99 | {r['control_p50_ms']} ms / {r['control_p99_ms']} ms |",
        f"| server RSS before / peak | {r['rss_before_MiB']} MiB / {r['rss_peak_MiB']} MiB |",
        "",
        "| endpoint group | requests | p50 ms | p99 ms | max ms | statuses |",
        "|---|---|---|---|---|---|",
    ]
    for g, v in r["groups"].items():
        lines.append(f"| {g} | {v['requests']} | {v['p50_ms']} | {v['p99_ms']} | {v['max_ms']} | {v['statuses']} |")
    return "\n".join(lines)


def prepare(
    work: Path,
    db_url: str,
    *,
    n_layers: int = 4,
    hidden: int = 32,
    owners: int = 2,
    files: dict[str, Path] | None = None,
    extra_env: dict[str, str] | None = None,
) -> tuple[ServerProcess, dict[str, Any]]:
    """Inputs (a tiny model of the given size unless `files` is given), database, a started server, a ready
    emulator and a valid adapter."""
    files = files or make_inputs(work / "inputs", n_layers=n_layers, hidden=hidden)
    boot = bootstrap(db_url, files["model"], tuple(f"owner{i}" for i in range(owners)))
    env = server_env(
        work / "data", db_url, corpus=files["corpus"], eval_file=files["eval"], **{**NO_QUOTAS, **(extra_env or {})}
    )
    srv = ServerProcess(env, work / "server.log")
    srv.start()
    emu = importance_and_emulator(srv.url, boot["keys"], boot["model_id"], owner="owner0")
    with client(srv.url, boot["keys"]["owner0"]) as http:
        path = work / "emulator.safetensors"
        path.write_bytes(http.get(f"/v1/emulators/{emu['id']}/file").content)
    return srv, {
        "keys": boot["keys"],
        "model_id": boot["model_id"],
        "emulator": emu,
        "adapter": adapter_bytes_for(path),
        "data_dir": work / "data",
        "db_url": db_url,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--downloaders", type=int, default=32)
    ap.add_argument("--uploaders", type=int, default=8)
    ap.add_argument("--pollers", type=int, default=8)
    ap.add_argument("--duration", type=float, default=30.0, help="seconds of load (bounded: at most 600)")
    ap.add_argument("--layers", type=int, default=8, help="tiny model depth (emulator size)")
    ap.add_argument("--hidden", type=int, default=128, help="tiny model width (emulator size)")
    ap.add_argument("--owners", type=int, default=4, help="data-owner organizations sharing the clients")
    ap.add_argument(
        "--database-url",
        default="",
        help="default: SQLite in the work dir; a PostgreSQL URL gets a fresh schema, dropped afterwards",
    )
    ap.add_argument(
        "--queue-url", default="", help="default: SqliteHuey in the data dir; e.g. redis://127.0.0.1:6379/0"
    )
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="scaleot-load-"))
    with fresh_database(args.database_url, work) as db_url:
        result = _main_run(args, work, db_url)
    print(summary_table(result))
    print(f"consistency problems after the run: {len(result['consistency_problems'])}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


def _main_run(args: argparse.Namespace, work: Path, db_url: str) -> dict[str, Any]:
    extra = {}
    if args.queue_url:
        extra = {"SCALEOT_QUEUE_URL": args.queue_url, "SCALEOT_QUEUE_NAME": f"scaleot-load-{secrets.token_hex(4)}"}
    srv, ctx = prepare(work, db_url, n_layers=args.layers, hidden=args.hidden, owners=args.owners, extra_env=extra)
    try:
        result = run_load(
            srv,
            ctx["keys"],
            ctx["emulator"],
            ctx["model_id"],
            ctx["adapter"],
            downloaders=args.downloaders,
            uploaders=args.uploaders,
            pollers=args.pollers,
            duration=min(args.duration, 600.0),
        )
        with client(srv.url, ctx["keys"]["admin"]) as admin:
            wait_jobs_settled(admin, timeout=300)
        result["consistency_problems"] = consistency_problems(db_url, ctx["data_dir"])
        result["database"] = "PostgreSQL" if db_url.startswith("postgresql") else "SQLite"
        result["queue"] = "Redis" if args.queue_url.startswith("redis") else "SqliteHuey"
    finally:
        srv.stop()
    return result


if __name__ == "__main__":
    main()
