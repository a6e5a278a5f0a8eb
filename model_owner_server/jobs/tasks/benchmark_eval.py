"""The `benchmark_eval` job: lm-evaluation-harness tasks on the full model M zero-shot and on an adapter's plug-in.

The field's usual benchmark table for one adapter. lm-eval runs in this process on the already loaded M (and the
plugged copy M' = [A', E]) through its `HFLM` wrapper, so the figures are lm-eval's own metrics, computed as for
any Hugging Face model. Tasks come from the server's own folder (model_owner_server/benchmark_tasks: small local
tasks on public-domain text), SCALEOT_BENCHMARK_TASKS_DIR, or lm-eval's built-in catalogue when the task's data is
already on this machine: downloads are off, and a task whose data is missing fails the job naming the task.

The table is stored as the adapter's `benchmarks` evaluation (one row, replaced by a later run) and shown by
GET /v1/adapters/{id} (its owner and admins) and the console's adapter page.
"""

from __future__ import annotations

import math
import os
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

from model_owner_server.core.db import session_scope
from model_owner_server.jobs.context import JobContext, JobFailure, still_ours
from model_owner_server.jobs.runner import JobRunner
from model_owner_server.models import AdapterRow, EmulatorRow, Evaluation, RegisteredModel

SERVER_TASKS_DIR = Path(__file__).resolve().parents[2] / "benchmark_tasks"
KIND = "benchmarks"  # the evaluations row of an adapter that holds its table
BOOTSTRAP_ITERS = 100  # stderr of the perplexities (lm-eval's default is 100000: minutes per task on a CPU)


def task_dirs(settings: Any) -> list[Path]:
    """The folders of local task definitions: the server's own, then the model owner's (if set)."""
    extra = [Path(settings.benchmark_tasks_dir).expanduser()] if settings.benchmark_tasks_dir else []
    return [SERVER_TASKS_DIR, *extra]


def _offline() -> None:
    """No downloads from the benchmark job, whatever the worker's environment: lm-eval loads datasets through
    `datasets`, which would otherwise fetch a task's data from the Hub. The flags are read when the libraries are
    imported, so they are set both in the environment and on the already imported modules."""
    os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["DISABLE_MULTIPROC"] = "1"  # lm-eval's bootstrap would fork this worker, model and all
    import datasets.config
    import huggingface_hub.constants

    datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
    huggingface_hub.constants.HF_HUB_OFFLINE = True


def task_manager(settings: Any, tasks: list[str]) -> Any:
    """lm-eval's TaskManager for `tasks`: the local folders only when they hold every task (a fraction of a
    second), else with lm-eval's built-in catalogue too (indexing its ~15,000 task files takes half a minute on
    a small CPU, so that one is kept for the life of the worker)."""
    _offline()
    from lm_eval.tasks import TaskManager

    missing = [d for d in task_dirs(settings) if not d.is_dir()]
    if missing:
        raise JobFailure(
            f"the benchmark task folder {missing[0]} does not exist; fix SCALEOT_BENCHMARK_TASKS_DIR or unset it"
        )
    dirs = tuple(str(d) for d in task_dirs(settings))
    local = TaskManager(include_path=list(dirs), include_defaults=False)
    if all(t in local.all_tasks for t in tasks):
        return local
    return builtin_manager(dirs)


@lru_cache(maxsize=2)
def builtin_manager(dirs: tuple[str, ...]) -> Any:
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(dirs), include_defaults=True)


def check_tasks(manager: Any, tasks: list[str]) -> None:
    """Each task is known and loads offline (its data is here); else a JobFailure naming the task and why."""
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        ours = sorted(t for t in manager.all_tasks if t.startswith("scaleot_"))
        raise JobFailure(
            f"unknown lm-eval task(s): {', '.join(unknown)}. This server's own tasks: {', '.join(ours)}; lm-eval's "
            "built-in tasks run when their data is on this machine; others go in SCALEOT_BENCHMARK_TASKS_DIR"
        )
    for task in tasks:
        try:
            manager.load_task_or_group([task])  # builds the task: its dataset is read here
        except Exception as exc:
            raise JobFailure(
                f"task {task!r} cannot be loaded on this server: its data is not available offline (downloads "
                f"are off) or its definition is broken ({type(exc).__name__}: {str(exc)[:300]}). Put its data in "
                "the Hugging Face datasets cache, or define it with local files in SCALEOT_BENCHMARK_TASKS_DIR"
            ) from None


@lru_cache(maxsize=1)
def one_bos_hflm() -> type:
    """lm-eval's `HFLM` with one fix: a rolling window (perplexity tasks) starts with exactly one BOS.

    lm-eval 0.4.13's `loglikelihood_rolling` encodes the document with the tokenizer's default encoding, which
    for a BOS-adding tokenizer (Gemma, Llama, OPT) already starts with BOS, and then puts its prefix token (BOS)
    in front again: the first window was [<bos>, <bos>, text...] and the second <bos> was scored as a target.
    Here the document is encoded without special tokens while the rolling windows are built, so the prefix token
    is the only BOS. Multiple-choice contexts (`_encode_pair`) and empty contexts (already encoded without special
    tokens) are untouched: they get one BOS. A tokenizer whose default encoding adds nothing (GPT-2, SmolLM2)
    encodes exactly as before."""
    from lm_eval.models.huggingface import HFLM

    class OneBosHFLM(HFLM):
        _rolling = False

        def tok_encode(
            self, string: str, add_special_tokens: bool | None = None, *args: Any, **kwargs: Any
        ) -> list[int]:
            if self._rolling and add_special_tokens is None:
                add_special_tokens = False  # the window's prefix token is the document's BOS
            return super().tok_encode(string, add_special_tokens, *args, **kwargs)

        def loglikelihood_rolling(self, requests: Any, disable_tqdm: bool = False) -> Any:
            self._rolling = True
            try:
                return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)
            finally:
                self._rolling = False

    return OneBosHFLM


def run_tasks(
    model: Any,
    tokenizer: Any,
    manager: Any,
    tasks: list[str],
    *,
    limit: int | None,
    num_fewshot: int | None,
    batch_size: int,
) -> dict[str, Any]:
    """lm-eval's `simple_evaluate` on an already loaded model; returns per-task figures and sample counts."""
    import lm_eval

    lm = one_bos_hflm()(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(tasks),
        task_manager=manager,
        num_fewshot=num_fewshot,
        limit=limit,
        bootstrap_iters=BOOTSTRAP_ITERS,
        log_samples=False,
        verbosity="WARNING",
    )
    if out is None:  # only on a non-zero rank of a distributed run, which this never is
        raise JobFailure("lm-eval returned no results")
    return {
        "figures": {task: _figures(row) for task, row in out["results"].items()},
        "samples": {task: int(n.get("effective", 0)) for task, n in (out.get("n-samples") or {}).items()},
        "n_shot": {task: n for task, n in (out.get("n-shot") or {}).items() if isinstance(n, int)},
        "versions": {task: str(v) for task, v in (out.get("versions") or {}).items()},
        "max_length": int(lm.max_length),
    }


def _figures(row: dict[str, Any]) -> dict[str, float]:
    """lm-eval's "metric,filter" keys as "metric" (filter "none") or "metric (filter)"; finite numbers only
    (a stderr lm-eval could not compute is "N/A")."""
    figures: dict[str, float] = {}
    for key, value in row.items():
        if "," not in key or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        metric, flt = key.split(",", 1)
        if math.isfinite(value):
            figures[metric if flt == "none" else f"{metric} ({flt})"] = float(value)
    return figures


def benchmark_eval_job(runner: JobRunner, ctx: JobContext, params: dict[str, Any]) -> dict[str, Any]:
    """Run `params["tasks"]` on M zero-shot and on adapter `params["adapter_id"]` plugged in; store the table."""
    from model_owner_server.scaleot.plugin import plug_in
    from shared.adapter import spec_from_json
    from shared.lora import issued_lora, load_adapter

    settings = runner.settings
    tasks = [str(t) for t in params["tasks"]]
    limit, num_fewshot = params.get("limit"), params.get("num_fewshot")
    with session_scope(runner.sessions) as s:
        adapter = s.get(AdapterRow, params["adapter_id"])
        if adapter is None or adapter.status != "evaluated":
            raise JobFailure(
                f"adapter {params['adapter_id']} was deleted or is not evaluated; benchmark an evaluated adapter"
            )
        emu = s.get(EmulatorRow, adapter.emulator_id)
        model_row = s.get(RegisteredModel, adapter.model_id)
        if emu is None or model_row is None:
            raise JobFailure(f"the emulator or the model of adapter {adapter.id} was deleted")
        spec, layers = spec_from_json(emu.adapter_spec or {}), list(emu.adapter_layers or [])
        lora = issued_lora(emu.build_info)
        adapter_path, adapter_id = runner.storage.abs(adapter.path), adapter.id
    ctx.update(0.01, f"checking the tasks {', '.join(tasks)}", force=True)
    manager = task_manager(settings, tasks)
    check_tasks(manager, tasks)  # before the model is loaded: a typo costs a second
    tensors = load_adapter(adapter_path, spec, lora)
    ctx.update(0.05, "loading the full model", force=True)
    model, tokenizer = runner.full_model(model_row, ctx, "benchmark_eval")
    started = time.monotonic()
    kw: dict[str, Any] = dict(limit=limit, num_fewshot=num_fewshot, batch_size=settings.eval_batch_size)
    ctx.update(0.1, "lm-eval on the full model zero-shot", force=True)
    with ctx.stage("zero_shot"):
        zero = run_tasks(model, tokenizer, manager, tasks, **kw)
    ctx.update(0.5, "lm-eval on the plug-in", force=True)
    with ctx.stage("plug_in"):
        plugged = plug_in(model, tensors, layers, spec, lora)
        try:
            plug = run_tasks(plugged, tokenizer, manager, tasks, **kw)
        finally:
            del plugged  # a standalone copy of M
    record = {
        "harness": f"lm-evaluation-harness {_lm_eval_version()}",
        "tasks": tasks,
        "limit": limit,
        "num_fewshot": num_fewshot,
        "batch_size": settings.eval_batch_size,
        "max_length": zero["max_length"],
        "samples": zero["samples"],
        "n_shot": zero["n_shot"],
        "versions": zero["versions"],
        "zero_shot": zero["figures"],
        "plug_in": plug["figures"],
        "seconds": round(time.monotonic() - started, 1),
        "compute_dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
    }
    with session_scope(runner.sessions) as s:
        still_ours(s, ctx)
        if s.get(AdapterRow, adapter_id) is None:
            raise JobFailure(f"adapter {adapter_id} was deleted while it was benchmarked; nothing was stored")
        row = s.query(Evaluation).filter_by(adapter_id=adapter_id, kind=KIND).one_or_none()
        if row is None:
            s.add(Evaluation(adapter_id=adapter_id, kind=KIND, eval_source=record["harness"], metrics=record))
        else:  # one table per adapter: a later run replaces it
            row.eval_source, row.metrics = record["harness"], record
    return {"adapter_id": adapter_id, "benchmarks": record}


def _lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


def table_rows(record: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (task, metric) of a stored table: M zero-shot and plug-in with their stderr (None where lm-eval
    gave none); what the console and `eval-adapter` show."""
    rows = []
    zero, plug = record.get("zero_shot") or {}, record.get("plug_in") or {}
    for task in sorted(set(zero) | set(plug)):
        z, p = zero.get(task) or {}, plug.get(task) or {}
        for metric in sorted(k for k in set(z) | set(p) if "_stderr" not in k):
            name, _, flt = metric.partition(" (")
            err = f"{name}_stderr" + (f" ({flt}" if flt else "")
            rows.append(
                {
                    "task": task,
                    "metric": metric,
                    "zero_shot": z.get(metric),
                    "zero_shot_stderr": z.get(err),
                    "plug_in": p.get(metric),
                    "plug_in_stderr": p.get(err),
                    "samples": (record.get("samples") or {}).get(task),
                }
            )
    return rows
