"""The systems benchmark's model-side rows: the stage-2 build from a cached stage 1 (and the emulator file the
training row uses), and the client's training step against a minimal PyTorch loop."""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import REPO, log
from benchmarks.measure import record, rounded
from benchmarks.systems_world import corpus_file


def stage2(prof: Any, work: Path, args: argparse.Namespace) -> tuple[list[dict[str, Any]], Path]:
    import torch

    from model_owner_server.scaleot.corpus import corpus_blocks
    from model_owner_server.scaleot.emulator import make_emulator
    from model_owner_server.scaleot.importance import ImportanceConfig, estimate_importance
    from model_owner_server.scaleot.importance_io import load_importance, save_importance
    from model_owner_server.scaleot.model_io import load_causal_lm, prepare_smollm2

    if prof.smollm2:
        # The prepared folder the model benchmarks use by default (harness.load_model; prepare_smollm2 is idempotent).
        model_dir = (
            Path(args.model_dir) if args.model_dir else prepare_smollm2(REPO / ".cache" / "benchmarks" / "smollm2")
        )
        model_name = "SmolLM2-135M-Instruct"
    else:
        from scaleot_samples.tiny import save_tiny_model_dir

        model_dir = work / "tiny-llama-8L-h64"
        if not (model_dir / "model.safetensors").is_file():
            save_tiny_model_dir(model_dir, "llama", n_layers=8, hidden=64)
        model_name = "tiny-llama-8L-h64"
    t0 = time.perf_counter()
    model, tok = load_causal_lm(model_dir)
    load_s = time.perf_counter() - t0
    corpus = corpus_file(work)
    key = hashlib.sha256(
        json.dumps(
            [model_name, prof.stage1_steps, prof.stage1_seq_len, hashlib.sha256(corpus.read_bytes()).hexdigest()]
        ).encode()
    ).hexdigest()[:12]
    stage1_dir = work / "stage1" / f"{model_name}-{key}"
    if not ((stage1_dir / "importance.json").is_file() and (stage1_dir / "importance.safetensors").is_file()):
        log(f"stage 1 ({prof.stage1_steps} steps) -> {stage1_dir}")
        train_b, val_b = corpus_blocks(tok, corpus, prof.stage1_seq_len, max_blocks=64)
        cfg = ImportanceConfig(
            steps=prof.stage1_steps,
            batch_size=2,
            rl_interval=2,
            n_candidates=2,
            bottleneck=64 if prof.smollm2 else 8,
            device="cpu",
        )
        result = estimate_importance(model, train_b, val_b, cfg)
        tmp = stage1_dir.with_name(stage1_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        save_importance(result, tmp)
        shutil.rmtree(stage1_dir, ignore_errors=True)
        os.replace(tmp, stage1_dir)
    out = work / "emulators" / f"{model_name}-a{prof.n_adapter}-{prof.alpha:g}-{prof.beta:g}.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    importance = load_importance(stage1_dir)
    info = make_emulator(model, tok, importance, prof.n_adapter, prof.alpha, prof.beta, out)
    build_s = time.perf_counter() - t0
    full_params, full_bytes = int(info.extra["full_model_params"]), int(info.extra["full_model_bytes"])
    n_layers = len(info.plan.roles)
    plan = {
        r: sum(1 for x in info.plan.roles if str(getattr(x, "value", x)) == r)
        for r in ("adapter", "harmonizer", "frozen", "dropped")
    }
    common = {
        "model": model_name,
        "n_layers": n_layers,
        "n_adapter": prof.n_adapter,
        "alpha": prof.alpha,
        "beta": prof.beta,
        "plan": plan,
    }
    del model
    torch.set_grad_enabled(True)
    return [
        record(
            "stage2_build_seconds",
            rounded(build_s, 2),
            "s",
            stage1_cache=str(stage1_dir),
            model_load_seconds=rounded(load_s, 2),
            includes="load_importance + make_emulator (plan, SRC, build, save)",
            **common,
        ),
        record(
            "emulator_size_bytes",
            info.size_bytes,
            "bytes",
            baseline=full_bytes,
            ratio=rounded(info.size_bytes / full_bytes, 4),
            full_model_bytes=full_bytes,
            note="baseline: the full model's parameter bytes (fp32, tied embeddings once); value: the emulator "
            "file as served (safetensors + metadata)",
            **common,
        ),
        record(
            "emulator_params",
            info.n_params,
            "params",
            baseline=full_params,
            ratio=rounded(info.n_params / full_params, 4),
            **common,
        ),
    ], out


# ---------------------------------------------------------------- 5. training step


def bench_train(prof: Any, emulator_path: Path, work: Path) -> list[dict[str, Any]]:
    import torch
    import torch.nn.functional as F

    from data_owner_client.train import (
        TrainConfig,
        freeze_except_adapter,
        resolve_device,
        set_seed,
        train,
    )
    from shared.data import collate, load_dataset, pad_id_for, training_examples
    from shared.emulator_file import load_emulator

    loaded = load_emulator(emulator_path)
    model, tok, plan = loaded.model, loaded.tokenizer, loaded.plan
    choice = resolve_device("cpu")
    examples = training_examples(load_dataset(corpus_file(work)), tok, prof.train_seq_len)
    if len(examples) < prof.train_batch:
        raise RuntimeError("corpus too small for one batch")
    pad_id = pad_id_for(tok)
    freeze_except_adapter(model, plan.adapter_layers)  # the client's own freezing
    params = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)
    cfg = TrainConfig(
        method="full", max_steps=prof.train_steps, batch_size=prof.train_batch, seq_len=prof.train_seq_len, seed=0
    )
    batch = collate(examples[: prof.train_batch], pad_id)  # same shape as every batch `train` draws

    def client_round() -> list[float]:
        stamps: list[float] = []
        set_seed(0)
        train(
            model,
            examples,
            cfg,
            choice,
            pad_id=pad_id,
            checkpoint_dir=None,
            progress=False,
            on_step=lambda step, loss: stamps.append(time.perf_counter()),
        )
        dts = [b - a for a, b in itertools.pairwise(stamps)]  # steps 2..S (step 1 has no start stamp)
        return dts[max(0, prof.train_warmup - 1) :]  # steps W+1..S, as in plain_round

    def plain_round() -> list[float]:
        model.train()
        opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        dts = []
        for _ in range(prof.train_steps):
            t0 = time.perf_counter()
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            dts.append(time.perf_counter() - t0)
        model.eval()
        return dts[prof.train_warmup :]

    client: list[float] = []
    plain: list[float] = []
    for rnd in range(prof.train_rounds):
        for which in ("client", "plain") if rnd % 2 == 0 else ("plain", "client"):
            (client if which == "client" else plain).extend(client_round() if which == "client" else plain_round())
        log(
            f"train round {rnd + 1}/{prof.train_rounds}: client median {statistics.median(client):.3f}s, "
            f"plain median {statistics.median(plain):.3f}s"
        )
    c, p = statistics.median(client), statistics.median(plain)
    ratio = c / p
    return [
        record(
            "train_step_client",
            rounded(c, 4),
            "s/step",
            baseline=rounded(p, 4),
            ratio=rounded(ratio, 3),
            target="ratio <= 1.05",
            met=ratio <= 1.05,
            method="full",
            batch=prof.train_batch,
            seq_len=prof.train_seq_len,
            rounds=prof.train_rounds,
            steps_per_round=prof.train_steps,
            warmup_skipped_per_round=prof.train_warmup,
            trainable_params=n_trainable,
            adapter_layers=list(plan.adapter_layers),
            emulator=emulator_path.name,
            client_step_seconds=[rounded(x, 4) for x in client],
            plain_step_seconds=[rounded(x, 4) for x in plain],
            path="data_owner_client.train.train (no checkpoint dir, progress off)",
            baseline_path="forward, cross-entropy, backward, AdamW step, zero_grad on the same parameters",
        )
    ]
