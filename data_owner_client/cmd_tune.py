"""`dataowner-client tune`: the data owner's whole recipe in one command (fetch and verify the emulator, fine-tune
its adapter layers locally, upload only the adapter, wait for the server's plug-in evaluation)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Any

import typer

from .cmd_adapter import with_upload_hint
from .cmd_emulator import fetch
from .errors import BadInputError, ServerError
from .options import Connection, EmulatorUrlOpt, Method, WaitOpt, connection_options, server_client
from .output import await_evaluation, columns, evaluation_failure, handled, measurement_caption, note, report
from .train_config import LR_FULL, LR_LORA, TrainConfig
from .transfer import EmulatorRef, ServerClient, check_plan_matches, parse_emulator_url, upload_adapter

D = TrainConfig()  # the recipe's defaults: every option below reads its default from here


@connection_options("api_key", "server_pubkey", "trust_on_first_use", "cache_dir", "as_json", "progress")
def tune(
    emulator_url: EmulatorUrlOpt,
    data: Annotated[
        Path,
        typer.Option(
            "--data",
            help="Training data: .txt, or .jsonl with {text} / {prompt, completion} / {question, choices, answer} / "
            "{messages} (chat: rendered with the model's chat template, loss on the assistant turns).",
        ),
    ],
    eval_data: Annotated[
        Path | None,
        typer.Option(
            "--eval-data",
            help="Evaluation data (same formats); scored locally on the emulator and uploaded so the "
            "server scores the plug-in on the same data.",
            show_default=False,
        ),
    ] = None,
    method: Annotated[
        Method,
        typer.Option(
            "--method",
            help="full: train the adapter layers' weights; lora: LoRA on their linear modules, merged before export.",
        ),
    ] = Method.full,
    epochs: Annotated[float, typer.Option(help="Passes over the training data (ignored with --max-steps).")] = D.epochs,
    max_steps: Annotated[
        int | None,
        typer.Option(
            help="Optimizer steps (overrides --epochs). More steps keep improving the emulator's copy but not "
            "always the full model: on SmolLM2's alpha=0.5 emulator at lr 1e-4 the plug-in was best after ~64 "
            "steps and worse after 512; for runs of hundreds of steps lower --lr (docs/benchmarks.md).",
            show_default=False,
        ),
    ] = None,
    lr: Annotated[
        float | None,
        typer.Option(
            help=f"Peak learning rate (default {LR_FULL:g} full, {LR_LORA:g} lora). Lower (3e-5) improves the "
            "plug-in more slowly and evenly: at 128 steps it ends where the default ends, at 512 steps it "
            "transferred far more (r 0.34 vs 0.14 on SmolLM2); full layers transferred more than LoRA at 32 "
            "steps (docs/benchmarks.md).",
            show_default=False,
        ),
    ] = None,
    anchor_decay: Annotated[
        float,
        typer.Option(
            help="Decay toward the issued weights (L2-SP; 0: off). 100 kept the plug-in improving from 64 to 128 "
            "steps on SmolLM2 (r 0.48 vs 0.47, about the seed spread) and left the emulator's copy worse; 1000 "
            "held the adapter back (r 0.29) (docs/benchmarks.md).",
        ),
    ] = D.anchor_decay,
    sam_rho: Annotated[
        float,
        typer.Option(
            help="Sharpness-aware minimisation radius (0: off; > 0 doubles the compute per step): the adapter "
            "settles where the emulator's loss is flat. On SmolLM2 no radius tried transferred better beyond the seed "
            "spread (r at 32 steps 0.647 at 0.01, 0.602 at 0.05, 0.149 at 0.5, against 0.655 off; at 128 steps "
            "0.47 at 0.01 against 0.46) (docs/benchmarks.md).",
        ),
    ] = D.sam_rho,
    batch_size: Annotated[int, typer.Option(help="Sequences per micro-batch.")] = D.batch_size,
    grad_accum: Annotated[int, typer.Option(help="Micro-batches per optimizer step.")] = D.grad_accum,
    seq_len: Annotated[int, typer.Option(help="Tokens per training sequence.")] = D.seq_len,
    seed: Annotated[int, typer.Option(help="Seed for initialisation and data order (runs are reproducible).")] = D.seed,
    device: Annotated[
        str, typer.Option(help="auto (CUDA with bf16 autocast when present, else CPU), cpu, cuda[:N].")
    ] = "auto",
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Adapter output folder (default ./adapter-EMULATOR_ID).", show_default=False),
    ] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the checkpoint in --out.")] = False,
    scheduler: Annotated[
        str, typer.Option(help="LR schedule (transformers get_scheduler name): cosine, linear, ...")
    ] = D.scheduler,
    warmup_ratio: Annotated[float, typer.Option(help="Fraction of steps spent warming up the LR.")] = D.warmup_ratio,
    lora_r: Annotated[
        int | None,
        typer.Option(
            help=f"LoRA rank (--method lora; default: the emulator's issued rank, else {D.lora_r}).", show_default=False
        ),
    ] = None,
    lora_alpha: Annotated[
        int | None,
        typer.Option(
            help=f"LoRA alpha (--method lora; default: the emulator's issued alpha, else {D.lora_alpha}).",
            show_default=False,
        ),
    ] = None,
    lora_dropout: Annotated[float, typer.Option(help="LoRA dropout (--method lora).")] = D.lora_dropout,
    save_every: Annotated[int, typer.Option(help="Checkpoint every N steps (also on Ctrl-C).")] = D.save_every,
    gradient_checkpointing: Annotated[
        bool,
        typer.Option(
            "--gradient-checkpointing",
            help="Recompute each layer's activations in the backward pass: less memory for about one more "
            "forward per step; the same result.",
        ),
    ] = D.gradient_checkpointing,
    eval_max_examples: Annotated[
        int | None, typer.Option(help="Cap local evaluation examples.", show_default=False)
    ] = None,
    upload: Annotated[
        bool, typer.Option("--upload/--no-upload", help="Upload the adapter when training is done.")
    ] = True,
    wait: WaitOpt = True,
    *,
    conn: Connection,
) -> None:
    """Download + verify the emulator, fine-tune its adapter layers locally, upload only the adapter,
    wait for the server's plug-in evaluation, and print zero-shot / emulator fine-tuned / plug-in side by side."""
    # torch-heavy imports stay inside the commands that train, so `--help` and `status` start fast.
    from shared.adapter import spec_from_json
    from shared.data import load_dataset
    from shared.emulator_file import load_emulator
    from shared.lora import LoraSpec

    from .export import read_adapter
    from .train import resolve_device
    from .tune import tune_emulator

    with handled(conn.as_json):
        settings = conn.settings()
        show = conn.show_progress
        ref = parse_emulator_url(emulator_url)
        lora_opts = {k: v for k, v in (("lora_r", lora_r), ("lora_alpha", lora_alpha)) if v is not None}
        cfg = TrainConfig(
            method=method.value,
            epochs=epochs,
            max_steps=max_steps,
            lr=lr,
            batch_size=batch_size,
            grad_accum=grad_accum,
            seq_len=seq_len,
            seed=seed,
            scheduler=scheduler,
            warmup_ratio=warmup_ratio,
            lora_dropout=lora_dropout,
            save_every=save_every,
            gradient_checkpointing=gradient_checkpointing,
            anchor_decay=anchor_decay,
            sam_rho=sam_rho,
            **lora_opts,
        )
        choice = resolve_device(device)
        # Read the data first: a broken file should fail in a second, not after a long download.
        train_ds = load_dataset(data)
        eval_ds = load_dataset(eval_data) if eval_data is not None else None
        out_dir = out or Path(f"adapter-{ref.emulator_id}")
        with server_client(ref.server, settings) as client:
            if upload and eval_data is None:
                _check_eval_data_not_required(client, ref)  # before the download and the training, not after
            eval_seq_len, eval_cap = seq_len, eval_max_examples
            if upload and eval_data is not None:  # score the emulator as the server will score M and the plug-in
                eval_seq_len, eval_cap = _server_eval_settings(client, ref, seq_len, eval_max_examples)
            ver = fetch(ref, settings, client, conn.trust_on_first_use, show)
            try:
                emu = load_emulator(ver.path, device="cpu")
            except Exception as exc:  # verified bytes the shared loader cannot read: the server's problem
                raise ServerError(f"the verified emulator file could not be loaded: {exc}") from exc
            check_plan_matches(ver.manifest, emu.plan.to_dict())
            expected = (
                spec_from_json({k: v.model_dump() for k, v in ver.info.adapter_spec.items()})
                if ver.info.adapter_spec
                else None
            )
            lora = LoraSpec.from_json(ver.manifest["lora"]) if ver.manifest.get("lora") else None  # signed
            if lora is not None and cfg.method == "lora":  # train the issued LoRA unless told otherwise
                cfg = dataclasses.replace(
                    cfg,
                    lora_r=lora_r if lora_r is not None else lora.r,
                    lora_alpha=lora_alpha
                    if lora_alpha is not None
                    else int(lora.alpha),  # issued as 16.0; a non-integer is refused below
                )
            note(
                f"layer plan {emu.plan.summary()} (A = adapter layers {emu.plan.adapter_layers}); "
                f"training on {choice.device}"
                + (f" with {choice.autocast_dtype} autocast" if choice.autocast_dtype else "")
            )
            identity = {
                "emulator_id": ref.emulator_id,
                "model_id": ver.manifest["model_id"],
                "emulator_sha256": ver.manifest["sha256"],
                "server": ref.server,
            }
            result = tune_emulator(
                emu.model,
                emu.tokenizer,
                emu.plan,
                train_ds,
                cfg,
                choice,
                out_dir,
                eval_data=eval_ds,
                eval_max_examples=eval_cap,
                eval_seq_len=eval_seq_len,
                resume=resume,
                identity=identity,
                expected_spec=expected,
                lora=lora,
                progress=show,
                log=note,
            )
            note(
                f"adapter written to {result.adapter_file} ({result.n_adapter_params} parameters, "
                f"{result.adapter_file.stat().st_size} bytes)"
            )
            doc: dict[str, Any] = {
                "emulator": {
                    "id": ref.emulator_id,
                    "model_id": ver.manifest["model_id"],
                    "sha256": ver.manifest["sha256"],
                    "path": str(ver.path),
                    "reused": ver.reused,
                },
                "adapter_dir": str(result.out_dir),
                "adapter_file": str(result.adapter_file),
                "training": result.adapter_config["training"],
                "metrics": dict(result.metrics),
                "adapter": None,
                "job": None,
            }
            job = adapter = None
            if upload:
                try:
                    adapter_file, upload_config = read_adapter(result.adapter_file)  # as `upload` would send it
                    created = upload_adapter(
                        client,
                        ref,
                        adapter_file,
                        eval_data=eval_data,
                        metrics=result.metrics or None,
                        adapter_config=upload_config,
                    )
                except ServerError as exc:
                    raise with_upload_hint(exc, ref, result.out_dir) from None
                (out_dir / "upload.json").write_text(created.model_dump_json(indent=2) + "\n")
                note(f"uploaded adapter {created.adapter.id}; evaluation job {created.job.id}")
                doc["adapter"] = created.adapter.model_dump(mode="json")
                doc["job"] = created.job.model_dump(mode="json")
                if wait:
                    job, adapter = await_evaluation(client, created, settings, show)
                    doc["adapter"], doc["job"] = adapter.model_dump(mode="json"), job.model_dump(mode="json")
                    doc["metrics"].update(zero_shot=adapter.evaluation.zero_shot, plug_in=adapter.evaluation.plug_in)
        failure = evaluation_failure(job, adapter)
        report(
            as_json=conn.as_json,
            doc=doc,
            columns=columns(result.metrics, adapter),
            header=f"adapter {doc['adapter']['id'] if doc['adapter'] else '(not uploaded)'}: "
            f"{adapter.status if adapter else 'evaluation not awaited'}" + measurement_caption(result.metrics, adapter),
            failure=failure,
        )
        if failure:
            raise failure


def _check_eval_data_not_required(client: ServerClient, ref: EmulatorRef) -> None:
    """Ask the server whether an upload without --eval-data would be refused; a server that does not say
    (an older one) is not held to it: the upload itself then reports it, with the command to retry."""
    info = client.upload_info(ref.emulator_id)
    if info is not None and info.get("eval_data_required") is True:
        kinds = [str(k) for k in info.get("eval_data_suffixes") or []] or [".txt", ".jsonl"]
        suffixes = kinds[0] if len(kinds) == 1 else f"{', '.join(kinds[:-1])} or {kinds[-1]}"
        raise BadInputError(
            "this server has no default evaluation file, so it would refuse the adapter after "
            f"training (422 no_eval_data): pass --eval-data FILE ({suffixes}: the data the server "
            "scores the plug-in on), or --no-upload to train only",
            details={"eval_data_required": True},
        )


def _server_eval_settings(
    client: ServerClient, ref: EmulatorRef, seq_len: int, max_examples: int | None
) -> tuple[int, int | None]:
    """The local evaluation's seq_len and example cap within the server's caps (upload-info's eval_settings), so the
    server scores M and the plug-in exactly as this client scores the emulator (the settings travel with the upload).
    A server that does not say (an older one) scores with its own defaults; the table then says so."""
    info = client.upload_info(ref.emulator_id) or {}
    caps = info.get("eval_settings")
    if not isinstance(caps, dict):
        return seq_len, max_examples
    max_seq, max_n = caps.get("max_seq_len"), caps.get("max_examples_cap")
    if isinstance(max_seq, int) and seq_len > max_seq:
        note(f"evaluating with seq_len {max_seq}, the server's cap (training keeps --seq-len {seq_len})")
        seq_len = max_seq
    if isinstance(max_n, int) and (max_examples is None or max_examples > max_n):
        asked = "" if max_examples is None else f" (not {max_examples})"
        note(f"evaluating at most {max_n} examples{asked}: the server scores the plug-in on no more")
        max_examples = max_n
    return seq_len, max_examples
