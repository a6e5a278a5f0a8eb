"""Flood run: one organization floods the API while another keeps polling, against a real `modelowner-server
serve` on 127.0.0.1 (issue 20, finding 4: quotas and rate limits).

    .venv/bin/python -m reliability.flood --concurrency 32 --phase 20

Three phases of `--phase` seconds each:
1. *unloaded*: organization B alone polls the control endpoints (GET /v1/models, /v1/jobs, /v1/emulators,
   /v1/adapters), `--poll-rate` requests per second, one at a time;
2. *flood, quotas on*: the same, while organization A sends `--concurrency` requests at once, back to back,
   from a separate process (so A's client does not slow B's), with the server's default request limits;
3. *flood, quotas off*: the server restarted with the request limits off (SCALEOT_RATE_LIMIT_PER_KEY=0,
   SCALEOT_RATE_LIMIT_PER_ORG=0), same flood.
Reported: B's p50 / p99 latency per phase (and its ratio to the unloaded p99), B's 429s, A's request rate
and the share of A's answers that were 429 (each with an integer Retry-After), lost requests, and the
machine's load average. Loopback only, bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import httpx

from reliability.harness import ServerProcess, bootstrap, fresh_database, make_inputs, server_env
from reliability.load import _pct

CONTROL = ("/v1/models", "/v1/jobs?limit=10", "/v1/emulators?limit=10", "/v1/adapters?limit=10")
FLOOD = ("/v1/emulators", "/v1/jobs", "/v1/models", "/v1/adapters")
NO_LIMITS = {"SCALEOT_RATE_LIMIT_PER_KEY": "0", "SCALEOT_RATE_LIMIT_PER_ORG": "0"}


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)
    statuses: Counter = field(default_factory=Counter)
    lost: int = 0
    bad_retry_after: int = 0  # 429s without an integer Retry-After

    def add(self, r: httpx.Response, seconds: float) -> None:
        self.latencies.append(seconds)
        self.statuses[r.status_code] += 1
        if r.status_code == 429 and not r.headers.get("Retry-After", "").isdigit():
            self.bad_retry_after += 1

    def summary(self, elapsed: float) -> dict[str, Any]:
        n = len(self.latencies)
        return {
            "requests": n,
            "per_s": round(n / elapsed, 1) if elapsed > 0 else 0.0,
            "p50_ms": round(1000 * _pct(self.latencies, 0.5), 1),
            "p99_ms": round(1000 * _pct(self.latencies, 0.99), 1),
            "statuses": dict(sorted(self.statuses.items())),
            "share_429": round(self.statuses[429] / n, 3) if n else 0.0,
            "lost": self.lost,
            "bad_retry_after": self.bad_retry_after,
        }


async def _poll(url: str, key: str, start_at: float, duration: float, rate: float) -> Tally:
    """B: one request at a time on a fixed schedule (`rate` per second), each timed on its own."""
    tally = Tally()
    async with httpx.AsyncClient(
        base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=httpx.Timeout(60.0, connect=10.0)
    ) as http:
        await asyncio.sleep(max(0.0, start_at - time.time()))
        t_end, n = time.monotonic() + duration, 0
        while time.monotonic() < t_end:
            path = CONTROL[n % len(CONTROL)]
            n += 1
            t0 = time.perf_counter()
            try:
                r = await http.get(path)
            except httpx.HTTPError:
                tally.lost += 1
            else:
                tally.add(r, time.perf_counter() - t0)
            await asyncio.sleep(max(0.0, 1.0 / rate - (time.perf_counter() - t0)))
    return tally


async def _flood(url: str, key: str, start_at: float, duration: float, concurrency: int) -> Tally:
    tally = Tally()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(
        base_url=url, headers={"Authorization": f"Bearer {key}"}, limits=limits, timeout=httpx.Timeout(60.0)
    ) as http:
        await asyncio.sleep(max(0.0, start_at - time.time()))
        t_end = time.monotonic() + duration

        async def worker(i: int) -> None:
            n = i
            while time.monotonic() < t_end:
                n += 1
                t0 = time.perf_counter()
                try:
                    r = await http.get(FLOOD[n % len(FLOOD)])
                except httpx.HTTPError:
                    tally.lost += 1
                else:
                    tally.add(r, time.perf_counter() - t0)

        await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return tally


def flood_process(url: str, key: str, start_at: float, duration: float, concurrency: int) -> dict[str, Any]:
    """A's flood, run in a child process; returns its summary."""
    t = asyncio.run(_flood(url, key, start_at, duration, concurrency))
    return t.summary(duration)


def run_phase(
    url: str, keys: dict[str, str], *, duration: float, poll_rate: float, concurrency: int = 0
) -> dict[str, Any]:
    """B polls for `duration` s; with `concurrency` > 0, A floods at the same time from another process."""
    start_at = time.time() + (3.0 if concurrency else 0.2)  # room for the child process to start
    load_before = os.getloadavg()[0]
    if not concurrency:
        b = asyncio.run(_poll(url, keys["steady"], start_at, duration, poll_rate))
        return {"b": b.summary(duration), "a": None, "load_avg_1m": round(load_before, 2)}
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        fut = pool.submit(flood_process, url, keys["flooder"], start_at, duration, concurrency)
        b = asyncio.run(_poll(url, keys["steady"], start_at, duration, poll_rate))
        a = fut.result(timeout=duration + 120)
    return {"b": b.summary(duration), "a": a, "load_avg_1m": round(os.getloadavg()[0], 2)}


def start_server(work: Path, db_url: str, files: dict[str, Path], env: dict[str, str], name: str) -> ServerProcess:
    full_env = server_env(work / "data", db_url, corpus=files["corpus"], eval_file=files["eval"])
    srv = ServerProcess({**full_env, **env}, work / f"{name}.log")
    srv.start()
    return srv


def run_flood(
    work: Path,
    db_url: str,
    *,
    files: dict[str, Path] | None = None,
    duration: float = 20.0,
    concurrency: int = 32,
    poll_rate: float = 8.0,
    limits_env: dict[str, str] | None = None,
    compare_without_limits: bool = True,
) -> dict[str, Any]:
    """The three phases (the third only with `compare_without_limits`); `limits_env` sets the limits of the
    first server (default: the server's defaults)."""
    files = files or make_inputs(work / "inputs")
    boot = bootstrap(db_url, files["model"], ("flooder", "steady"))
    keys = boot["keys"]
    phases: dict[str, Any] = {}
    srv = start_server(work, db_url, files, dict(limits_env or {}), "server-limits-on")
    try:
        phases["unloaded"] = run_phase(srv.url, keys, duration=duration, poll_rate=poll_rate)
        phases["flood, quotas on"] = run_phase(
            srv.url, keys, duration=duration, poll_rate=poll_rate, concurrency=concurrency
        )
    finally:
        srv.stop()
    if compare_without_limits:
        srv = start_server(work, db_url, files, NO_LIMITS, "server-limits-off")
        try:
            phases["flood, quotas off"] = run_phase(
                srv.url, keys, duration=duration, poll_rate=poll_rate, concurrency=concurrency
            )
        finally:
            srv.stop()
    base = phases["unloaded"]["b"]["p99_ms"]
    for p in phases.values():
        p["b"]["p99_vs_unloaded"] = round(p["b"]["p99_ms"] / base, 2) if base else None
    return {
        "duration_s": duration,
        "concurrency": concurrency,
        "poll_rate": poll_rate,
        "limits": limits_env or "server defaults",
        "cpus": os.cpu_count(),
        "phases": phases,
    }


def flood_table(r: dict[str, Any]) -> str:
    lines = [
        f"Flood: organization A sends {r['concurrency']} requests at once, back to back; organization B polls "
        f"{r['poll_rate']}/s; {r['duration_s']} s per phase; {r['cpus']} CPUs; limits: {r['limits']}",
        "",
        "| phase | load avg (1 min) | B requests | B p50 ms | B p99 ms | B p99 / unloaded | B 429s | "
        "A requests (/s) | A 429 share | lost |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, p in r["phases"].items():
        b, a = p["b"], p["a"]
        a_cells = f"{a['requests']} ({a['per_s']}/s) | {a['share_429']:.1%}" if a else "- | -"
        lost = b["lost"] + (a["lost"] if a else 0)
        lines.append(
            f"| {name} | {p['load_avg_1m']} | {b['requests']} | {b['p50_ms']} | {b['p99_ms']} | "
            f"{b['p99_vs_unloaded']} | {b['statuses'].get(429, 0)} | {a_cells} | {lost} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--phase", type=float, default=20.0, help="seconds per phase (bounded: at most 300)")
    ap.add_argument("--concurrency", type=int, default=32, help="A's requests in flight at once")
    ap.add_argument("--poll-rate", type=float, default=8.0, help="B's requests per second")
    ap.add_argument("--database-url", default="", help="default: SQLite in the work dir")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="scaleot-flood-"))
    with fresh_database(args.database_url, work) as db_url:
        result = run_flood(
            work, db_url, duration=min(args.phase, 300.0), concurrency=args.concurrency, poll_rate=args.poll_rate
        )
    print(flood_table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
