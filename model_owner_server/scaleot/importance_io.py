"""A stage-1 run on disk: `importance.safetensors` (scores + harmonizer weights) and `importance.json` (settings,
scores, ranking, sizes). Safetensors for tensors, JSON for settings; nothing pickled. Written under temporary
names and renamed, so a reader never sees half a run."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from safetensors.torch import load_file, save_file

from shared.modules import Harmonizer

from .importance import ImportanceConfig, ImportanceResult


def save_importance(result: ImportanceResult, out_dir: str | Path, extra: dict | None = None) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {"scores": result.scores.float().contiguous()}
    for i, h in result.harmonizers.items():
        for name, t in h.state_dict().items():
            tensors[f"harmonizers.{i}.{name}"] = t.detach().float().cpu().contiguous()
    n_layers = len(result.scores)
    hidden = next(iter(result.harmonizers.values())).norm.normalized_shape[0]
    record = {
        "format": "scaleot-importance/v1",
        "config": asdict(result.config),
        "n_layers": n_layers,
        "hidden_size": hidden,
        "scores": result.scores.tolist(),
        "ranking": result.ranking(),
        "seconds": round(result.seconds, 3),
        "n_model_params": result.n_model_params,
        "n_harmonizer_params": result.n_harmonizer_params,
        "harmonizer_fraction": result.n_harmonizer_params / max(1, result.n_model_params),
        "final_loss": next((h["loss"] for h in reversed(result.history) if h["phase"] == "dl"), None),
        **(extra or {}),
    }
    tmp = out / ".importance.safetensors.tmp"
    save_file(tensors, str(tmp))
    tmp.replace(out / "importance.safetensors")
    tmp_json = out / ".importance.json.tmp"
    tmp_json.write_text(json.dumps(record, indent=2))
    tmp_json.replace(out / "importance.json")
    return out


def load_importance(out_dir: str | Path) -> ImportanceResult:
    out = Path(out_dir)
    try:
        record = json.loads((out / "importance.json").read_text())
        tensors = load_file(str(out / "importance.safetensors"))
    except FileNotFoundError as exc:
        raise FileNotFoundError(
            f"{out} holds no importance run (importance.json + importance.safetensors); "
            "run `modelowner-server estimate-importance` first"
        ) from exc
    cfg = ImportanceConfig.from_dict(record["config"])
    harmonizers = {}
    for i in range(record["n_layers"]):
        h = Harmonizer(record["hidden_size"], cfg.bottleneck)
        h.load_state_dict({k.split(".", 2)[2]: v for k, v in tensors.items() if k.startswith(f"harmonizers.{i}.")})
        harmonizers[i] = h.requires_grad_(False)
    return ImportanceResult(
        tensors["scores"], harmonizers, cfg, [], record.get("seconds", 0.0), record.get("n_model_params", 0)
    )
