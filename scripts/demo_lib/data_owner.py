"""The data owner's side of the demo: its private data and one `dataowner-client tune` run, knowing only the
invitation's three strings; and the demo-only in-model reference (it needs both parties' material)."""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from data_owner_client.errors import ServerError
from data_owner_client.key_safety import is_loopback
from data_owner_client.transfer import ServerClient, parse_emulator_url

from .config import DemoConfig, DemoError, Invitation
from .console import fmt_seconds, say, step
from .data import chat_files, data_owner_files, model_owner_files
from .processes import clean_env, run_cmd, tool


@dataclass
class ClientResult:
    doc: dict[str, Any]
    emulator: dict[str, Any]
    train_titles: list[str]
    eval_titles: list[str]
    seconds: float
    chat: dict[str, Any] | None = None  # the chat-format tune's result (tune --json), when the demo ran one


def data_owner_flow(
    cfg: DemoConfig, invitation: Invitation, client_dir: Path, *, device: str = "auto", chat: bool = False
) -> ClientResult:
    """Everything the data owner does, in its own directory, knowing only the invitation's three strings.
    ``chat``: then one more tune on chat data (cfg.chat_steps steps), uploaded and scored the same way."""
    step("data owner: private data (Shakespeare), in its own directory")
    client_dir.mkdir(parents=True, exist_ok=True)
    train, evalf, train_titles, eval_titles = data_owner_files(cfg, client_dir / "data")
    say(f"  training on {', '.join(train_titles)} ({train.stat().st_size // 1000} kB)")
    say(f"  held-out evaluation: {', '.join(eval_titles)} ({evalf.stat().st_size // 1000} kB, a different work)")

    step("data owner: dataowner-client tune (download + verify, fine-tune the adapter locally, upload only it)")
    t = time.monotonic()
    doc = _tune(cfg, invitation, client_dir, train, evalf, "adapter", cfg.train_steps, device)
    seconds = time.monotonic() - t
    chat_doc = None
    if chat:
        step("data owner: the same on chat data (messages records, the model's chat template, assistant-turn loss)")
        chat_train, chat_eval = chat_files(cfg, client_dir / "data")
        say(
            f"  {len(chat_train.read_text().splitlines())} training and {len(chat_eval.read_text().splitlines())} held-out "
            f"conversations of {cfg.chat_turns} word-analogy question(s) each, asking for different word pairs"
        )
        chat_doc = _tune(cfg, invitation, client_dir, chat_train, chat_eval, "adapter-chat", cfg.chat_steps, device)
    ref = parse_emulator_url(invitation.emulator_url)
    try:
        # Sizes for the report, as the data owner sees them.
        with ServerClient(ref.server, invitation.api_key, insecure=_plain_http_off_loopback(ref.server)) as server:
            emu = server.get_json(f"/v1/emulators/{ref.emulator_id}")
    except ServerError as exc:
        raise DemoError(str(exc)) from None
    return ClientResult(doc, emu, train_titles, eval_titles, seconds, chat_doc)


def _tune(
    cfg: DemoConfig,
    invitation: Invitation,
    client_dir: Path,
    train: Path,
    evalf: Path,
    out_dir: str,
    steps: int,
    device: str,
) -> dict[str, Any]:
    """One `dataowner-client tune --json` run in the data owner's directory; its JSON result."""
    shutil.rmtree(client_dir / out_dir, ignore_errors=True)  # a fresh adapter each run (no stale checkpoint)
    # The key travels in the environment, never on the command line (other users can read a process's arguments).
    env = clean_env(
        SCALEOT_API_KEY=invitation.api_key,
        SCALEOT_SERVER_PUBKEY=invitation.server_pubkey,
        SCALEOT_CLIENT_CACHE=str((client_dir / "cache").resolve()),
    )
    ref = parse_emulator_url(invitation.emulator_url)
    insecure = _plain_http_off_loopback(ref.server)
    env_note = "SCALEOT_API_KEY=sot_... SCALEOT_SERVER_PUBKEY=... "
    if insecure:
        # The client refuses to send its key over plain http off this machine; compose's private network
        # (http://server:8000) is the one place the demo does it, and says so.
        say(f"  {ref.server}: plain http on the compose demo's private network, so SCALEOT_INSECURE=1")
        env["SCALEOT_INSECURE"] = "1"
        env_note += "SCALEOT_INSECURE=1 "
    if not sys.stderr.isatty():
        env.setdefault("TQDM_MININTERVAL", "10")  # progress bars in a log: a line every 10 s, not every step
    cmd = [
        *tool("dataowner-client"),
        "tune",
        "--emulator-url",
        invitation.emulator_url,
        "--data",
        str(train.relative_to(client_dir)),
        "--eval-data",
        str(evalf.relative_to(client_dir)),
        "--max-steps",
        str(steps),
        "--batch-size",
        str(cfg.batch_size),
        "--seq-len",
        str(cfg.seq_len),
        "--eval-max-examples",
        str(cfg.eval_max_examples),
        "--seed",
        str(cfg.seed),
        "--device",
        device,
        "--out",
        out_dir,
        "--json",
        "--progress",
    ]
    if cfg.lr is not None:
        cmd += ["--lr", str(cfg.lr)]
    out = run_cmd(
        cmd,
        env=env,
        cwd=client_dir,
        capture=True,
        secret_output=True,
        env_note=env_note,
    )
    try:
        return json.loads(out)
    except json.JSONDecodeError:
        raise DemoError(f"dataowner-client printed no JSON result:\n{out[-2000:]}") from None


def _plain_http_off_loopback(server: str) -> bool:
    parts = urlsplit(server)
    return parts.scheme == "http" and not is_loopback(parts.hostname or "")


def in_model_reference(cfg: DemoConfig, owner_dir: Path, client_dir: Path, client: ClientResult) -> dict[str, Any]:
    """Demo-only diagnostic (it needs M and the private data together, which neither party has alone): the same
    adapter layers tuned directly inside M with the data owner's recipe, scored like the plug-in. It is the
    ceiling the plug-in is measured against (the transfer ratio)."""
    import torch

    from data_owner_client.train import TrainConfig, train_layers_in_model
    from model_owner_server.scaleot.model_io import load_causal_lm
    from shared.data import load_dataset, pad_id_for, training_examples
    from shared.device import resolve_device
    from shared.evaluation import evaluate

    step("diagnostic (demo only): the same adapter layers tuned inside the full model, same recipe and data")
    t = time.monotonic()
    model_dir, _ = model_owner_files(cfg, owner_dir)
    model, tok = load_causal_lm(model_dir)
    layers = list(client.emulator.get("adapter_layers") or [])
    data = load_dataset(client_dir / "data" / "shakespeare_train.txt")
    held_out = load_dataset(client_dir / "data" / "shakespeare_eval.txt")
    tcfg = TrainConfig(
        max_steps=cfg.train_steps,
        batch_size=cfg.batch_size,
        seq_len=cfg.seq_len,
        seed=cfg.seed,
        lr=cfg.lr,
        save_every=10**9,
    )
    m, _ = train_layers_in_model(
        model, layers, training_examples(data, tok, cfg.seq_len), tcfg, resolve_device("cpu"), pad_id=pad_id_for(tok)
    )
    with torch.no_grad():
        metrics = evaluate(
            m, tok, held_out, seq_len=cfg.seq_len, batch_size=cfg.batch_size, max_examples=cfg.eval_max_examples
        )
    say(f"  layers {layers} tuned in M: perplexity {metrics['perplexity']:.1f} ({fmt_seconds(time.monotonic() - t)})")
    return {"metrics": metrics, "seconds": round(time.monotonic() - t, 1)}
