"""The demo's settings (`DemoConfig`), and the invitation: all the data owner receives from the model owner."""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from tooling.procs import wait_until

ADMIN_ORG, DATA_ORG = "model-owner", "acme-data"


@dataclass
class DemoConfig:
    tiny: bool = False
    steps: int = 48  # stage-1 DL steps (an RL step comes every 2)
    warmup_steps: int = 10  # local-regression warm start of the harmonizers (cheap; they start far less weak)
    train_steps: int = 60  # the data owner's optimizer steps on the emulator
    # alpha 0.5: half the non-adapter layers replaced, an emulator of about 2/3 of M's size (docs/benchmarks.md).
    n_adapter: int = 4
    alpha: float = 0.5
    beta: float = 0.0
    seq_len: int = 128  # training and evaluation sequence length (client and server alike)
    batch_size: int = 4
    eval_max_examples: int = 64  # held-out blocks scored on both sides
    lr: float | None = None
    wiki_train_chars: int = 300_000
    train_works: int = 3
    eval_works: int = 1
    max_chars_per_work: int | None = None
    # > 0: the data owner also tunes on chat data (`messages` records: word analogies as conversations) for
    # that many steps, rendered with the model's chat template and scored on the assistant turns (--tiny)
    chat_steps: int = 0
    chat_turns: int = 3  # question/answer exchanges per conversation
    model_name: str = "smollm2-135m"
    seed: int = 0
    # Another base model than SmolLM2 (e.g. Gemma-3-270M): a prepared HF folder, or a GGUF file that the model
    # owner converts with `modelowner-server import-gguf` into models/<model_name>; registered with
    # compute_dtype when set (POST /v1/models, as `register-model --compute-dtype`).
    model_dir: str | None = None
    gguf: str | None = None
    compute_dtype: str | None = None
    calibration_steps: int | None = None  # SCALEOT_EMULATOR_CALIBRATION_STEPS for the server (None: its default)

    @property
    def model_title(self) -> str:
        if self.tiny:
            return "tiny random model"
        return self.model_name if (self.model_dir or self.gguf) else "SmolLM2-135M"

    @classmethod
    def for_args(cls, args: argparse.Namespace) -> DemoConfig:
        if args.tiny:
            cfg = cls(
                tiny=True,
                steps=4,
                warmup_steps=1,
                train_steps=4,
                n_adapter=2,
                alpha=0.5,
                beta=0.5,
                seq_len=256,  # byte tokens: a chat exchange (system prompt included) fits
                batch_size=2,
                eval_max_examples=8,
                wiki_train_chars=40_000,
                train_works=2,
                eval_works=1,
                max_chars_per_work=12_000,
                chat_steps=4,
                chat_turns=1,
                model_name="tiny-llama",
            )
        else:
            cfg = cls()
        scale = args.scale if args.scale is not None else float(os.environ.get("SCALEOT_DEMO_SCALE") or 1.0)
        if scale <= 0:
            raise SystemExit("SCALEOT_DEMO_SCALE / --scale must be > 0")
        cfg.steps = max(1, round(cfg.steps * scale))
        cfg.train_steps = max(1, round(cfg.train_steps * scale))
        for name in (
            "steps",
            "warmup_steps",
            "train_steps",
            "n_adapter",
            "alpha",
            "beta",
            "seq_len",
            "batch_size",
            "eval_max_examples",
            "lr",
            "seed",
            "model_name",
            "compute_dtype",
            "calibration_steps",
        ):
            value = getattr(args, name, None)
            if value is not None:
                setattr(cfg, name, value)
        model_dir, gguf = getattr(args, "model_dir", None), getattr(args, "gguf", None)
        if model_dir and gguf:
            raise SystemExit("--model-dir and --gguf are alternatives: give one")
        if (model_dir or gguf) and cfg.tiny:
            raise SystemExit("--tiny uses its own random model: --model-dir / --gguf need the real demo")
        cfg.model_dir = str(Path(model_dir).resolve()) if model_dir else None
        cfg.gguf = str(Path(gguf).resolve()) if gguf else None
        if (model_dir or gguf) and getattr(args, "model_name", None) is None:
            cfg.model_name = Path(model_dir or gguf).name.removesuffix(".gguf").lower()
        return cfg


@dataclass
class Invitation:
    """All the data owner receives from the model owner: no files, no database, no weights."""

    emulator_url: str
    api_key: str
    server_pubkey: str
    key_id: str = ""

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(self), f, indent=2)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path, wait_s: float = 0.0) -> Invitation:
        try:
            wait_until(path.is_file, timeout=wait_s, interval=2, what=f"the invitation at {path}")
        except TimeoutError:
            raise DemoError(
                f"no invitation at {path}: run the model-owner side first "
                "(`python scripts/demo.py --role model-owner ...`)"
            ) from None
        data = json.loads(path.read_text())
        return cls(
            **{k: data[k] for k in ("emulator_url", "api_key", "server_pubkey") if k in data},
            key_id=data.get("key_id", ""),
        )

    @property
    def server_url(self) -> str:
        return self.emulator_url.split("/v1/emulators/")[0]


class DemoError(RuntimeError):
    pass
