"""Training checkpoints without pickle: trainable weights, optimizer moments and RNG state in safetensors,
step / losses / settings in JSON, replaced atomically, so an interrupted run continues bit-for-bit."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import BadInputError


def _atomic_dir_replace(tmp: Path, final: Path) -> None:
    old = final.with_name(final.name + ".old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(
    ckpt: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    step: int,
    losses: list[float],
    fingerprint: dict[str, Any],
) -> None:
    """Trainable weights + optimizer moments + RNG (safetensors) and step/losses/settings (JSON)."""
    tmp = ckpt.with_name(ckpt.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(
        {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad},
        tmp / "trainable.safetensors",
    )
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    scalars: dict[str, Any] = {}
    for idx, state in sd["state"].items():
        for k, v in state.items():
            if torch.is_tensor(v):
                tensors[f"state.{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{k}"] = v
    save_file(tensors, tmp / "optimizer.safetensors")
    (tmp / "trainer_state.json").write_text(
        json.dumps(
            {
                "step": step,
                "losses": losses,
                "fingerprint": fingerprint,
                "param_groups": sd["param_groups"],
                "optimizer_scalars": scalars,
            },
            indent=2,
        )
    )
    _atomic_dir_replace(tmp, ckpt)


def load_checkpoint(
    ckpt: Path, model: nn.Module, optimizer: torch.optim.Optimizer, fingerprint: dict[str, Any]
) -> tuple[int, list[float]]:
    try:
        state = json.loads((ckpt / "trainer_state.json").read_text())
        weights = load_file(ckpt / "trainable.safetensors")
        opt = load_file(ckpt / "optimizer.safetensors")
    except (OSError, ValueError) as exc:
        raise BadInputError(f"{ckpt}: unreadable checkpoint ({exc}); delete it to start over") from None
    differ = {k: (state["fingerprint"].get(k), v) for k, v in fingerprint.items() if state["fingerprint"].get(k) != v}
    if differ:
        changes = ", ".join(f"{k}: {a!r} now {b!r}" for k, (a, b) in differ.items())
        raise BadInputError(
            f"{ckpt} was written by a different run ({changes}); rerun with the same settings, "
            "or without --resume (delete the checkpoint) to start over"
        )
    params = dict(model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    if set(weights) != trainable:
        raise BadInputError(
            f"{ckpt}: checkpoint tensors do not match the trainable parameters; delete it to start over"
        )
    with torch.no_grad():
        for n, t in weights.items():
            params[n].copy_(t)
    opt_state: dict[int, dict[str, Any]] = {}
    for key, t in opt.items():
        if key.startswith("state."):
            _, idx, k = key.split(".", 2)
            opt_state.setdefault(int(idx), {})[k] = t
    for key, v in state["optimizer_scalars"].items():
        idx, k = key.split(".", 1)
        opt_state.setdefault(int(idx), {})[k] = v
    optimizer.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
    torch.set_rng_state(opt["rng.cpu"])
    cuda_states = [opt[k] for k in sorted(k for k in opt if k.startswith("rng.cuda."))]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)
    return int(state["step"]), [float(x) for x in state["losses"]]
