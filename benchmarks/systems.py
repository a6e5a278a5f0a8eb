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
(default .cache/benchmarks/systems); the server's data dir is a fresh temp folder every run. The server world
and the RSS sampler are in systems_world.py, the download, verify and memory rows in systems_http.py, stage 2
and the training step in systems_training.py, the table and the docs block in systems_report.py.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

if str(Path(__file__).resolve().parents[1]) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil

from benchmarks.harness import DOCS, REPO, log, write_json
from benchmarks.measure import cpu_name, rounded
from benchmarks.results import update_docs_block
from benchmarks.systems_http import bench_download, bench_memory, bench_verify
from benchmarks.systems_report import markdown, table
from benchmarks.systems_training import bench_train, stage2
from benchmarks.systems_world import MB, SERVED_EMULATOR, start_world

DOCS_MARKER = "systems"  # the block of docs/benchmarks.md this benchmark owns


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


# adapter layer: 4*1536^2 + 3*1536*4096 = 28.3 M params = 113 MB fp32 (>= 100 MB)
FULL = Profile(
    "full",
    hidden=1536,
    ffn=4096,
    heads=12,
    n_layers=4,
    download_reps=7,
    verify_reps=7,
    uploads=2,
    parallel=8,
    smollm2=True,
    stage1_steps=4,
    stage1_seq_len=64,
    n_adapter=4,
    alpha=0.5,
    beta=0.5,
    train_batch=4,
    train_seq_len=128,
    train_rounds=3,
    train_steps=6,
    train_warmup=2,
)
PROFILES = {
    "full": FULL,
    # adapter layer: 4*768^2 + 3*768*2048 = 7.1 M params = 28 MB
    "quick": replace(
        FULL,
        name="quick",
        hidden=768,
        ffn=2048,
        download_reps=3,
        verify_reps=3,
        uploads=1,
        train_batch=2,
        train_seq_len=64,
        train_rounds=2,
        train_steps=4,
        train_warmup=1,
    ),
    "tiny": replace(
        FULL,
        name="tiny",
        hidden=64,
        ffn=128,
        heads=4,
        download_reps=2,
        verify_reps=2,
        uploads=1,
        smollm2=False,
        stage1_steps=2,
        stage1_seq_len=32,
        n_adapter=2,
        train_batch=2,
        train_seq_len=32,
        train_rounds=2,
        train_steps=3,
        train_warmup=1,
    ),
}


# ---------------------------------------------------------------- main


def machine() -> dict[str, Any]:
    import torch

    return {
        "logical_cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "cpu": cpu_name(),
        "memory_gb": rounded(psutil.virtual_memory().total / 1024**3, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "load_avg_start": [rounded(x, 2) for x in os.getloadavg()],
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="smaller files and fewer repetitions")
    g.add_argument("--tiny", action="store_true", help="tiny random models, small files (smoke test)")
    p.add_argument("--work-dir", default=str(REPO / ".cache" / "benchmarks" / "systems"), help="caches")
    p.add_argument(
        "--model-dir",
        default=None,
        help="a prepared SmolLM2 folder (default: prepare_smollm2 into .cache/benchmarks/smollm2)",
    )
    p.add_argument(
        "--render",
        default=None,
        metavar="JSON",
        help="only re-render: print the table of an existing results JSON and update --docs from it",
    )
    p.add_argument(
        "--out",
        default=None,
        help="JSON output (full: benchmarks/results/systems.json; else <work-dir>/systems_<profile>.json)",
    )
    p.add_argument(
        "--docs",
        default=None,
        help="markdown file whose systems block is replaced (full: docs/benchmarks.md; else none)",
    )
    p.add_argument("--no-docs", action="store_true", help="do not touch any markdown file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.render:
        doc = json.loads(Path(args.render).read_text())
        docs = None if args.no_docs else Path(args.docs) if args.docs else (DOCS if doc["profile"] == "full" else None)
        if docs is not None:
            update_docs_block(docs, DOCS_MARKER, markdown(doc))
        print(table(doc["records"]))
        return doc
    prof = PROFILES["tiny" if args.tiny else "quick" if args.quick else "full"]
    work = Path(args.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    out = (
        Path(args.out)
        if args.out
        else (
            REPO / "benchmarks" / "results" / "systems.json"
            if prof.name == "full"
            else work / f"systems_{prof.name}.json"
        )
    )
    docs = None if args.no_docs else (Path(args.docs) if args.docs else (DOCS if prof.name == "full" else None))
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
            world.server.stop()
        shutil.rmtree(root, ignore_errors=True)
    log("stage 2 build")
    s2, emulator_path = stage2(prof, work, args)
    log("training step")
    records += bench_train(prof, emulator_path, work)
    records += s2
    seconds = time.perf_counter() - t_start
    doc = {
        "benchmark": "systems",
        "profile": prof.name,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": cmd,
        "seconds": round(seconds, 1),
        "machine": info,
        "load_avg_end": [rounded(x, 2) for x in os.getloadavg()],
        "served_model": {
            "family": "llama",
            "hidden": prof.hidden,
            "ffn": prof.ffn,
            "layers": prof.n_layers,
            "heads": prof.heads,
            "emulator": SERVED_EMULATOR,
        },
        "records": records,
        "complete": True,
    }
    write_json(out, doc)
    block = markdown(doc)
    if docs is not None:
        update_docs_block(docs, DOCS_MARKER, block)
    print(table(records))
    targets = [r for r in records if r["met"] is not None]
    print(
        f"\n{sum(r['met'] for r in targets)}/{len(targets)} targets met; {out}"
        + (f"; {docs}" if docs is not None else "")
        + f"; {seconds:.0f}s"
    )
    return doc


if __name__ == "__main__":
    main()
