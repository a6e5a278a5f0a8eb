"""What the `dataowner-client` commands print: notes on stderr, results on stdout, `--json` documents,
the metrics table, and the one place that turns expected failures into a message and an exit code."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import typer

from shared import schemas

from .errors import ClientError, EvaluationFailedError, error_object, exit_code_for
from .settings import ClientSettings
from .transfer import ServerClient, wait_for_job


def note(message: str) -> None:
    typer.echo(message, err=True)


_json_emitted: ContextVar[bool] = ContextVar("_json_emitted", default=False)


@contextmanager
def handled(as_json: bool = False) -> Iterator[None]:
    """One place that turns expected failures into `error: ...` on stderr + the documented exit code, and
    with `--json` also into an `{"error": {...}}` document on stdout (unless the command already printed its
    document, which then carries the error itself)."""
    token = _json_emitted.set(False)
    try:
        yield
    except typer.Exit:
        raise
    except KeyboardInterrupt:
        note("interrupted (a training checkpoint was saved if any step finished; rerun with --resume)")
        if as_json and not _json_emitted.get():
            emit_json({"error": {"code": "interrupted", "message": "interrupted", "exit_code": 130}})
        raise typer.Exit(130) from None
    except Exception as exc:
        code = exit_code_for(exc)
        if code is None:
            raise  # a bug: keep the traceback
        note(f"error: {exc}")
        if as_json and not _json_emitted.get():
            emit_json(error_object(exc, code))
        raise typer.Exit(int(code)) from None
    finally:
        _json_emitted.reset(token)


def emit_json(doc: Any) -> None:
    typer.echo(json.dumps(doc, indent=2, default=str))
    _json_emitted.set(True)


# ---------------------------------------------------------------- result table

_ROW_ORDER = ("perplexity", "loss", "completion_loss", "assistant_loss", "accuracy", "accuracy_norm", "tokens", "n")


def comparison_table(columns: dict[str, dict[str, Any] | None]) -> str:
    """Metrics side by side: one column per stage (emulator zero-shot, fine-tuned, full zero-shot, plug-in)."""
    present = {name: m for name, m in columns.items() if m}
    if not present:
        return "(no evaluation metrics)"
    keys = {k for m in present.values() for k, v in m.items() if isinstance(v, (int, float))}
    rows = [k for k in _ROW_ORDER if k in keys] + sorted(keys - set(_ROW_ORDER))

    def cell(v: Any) -> str:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return "-"
        return f"{v:d}" if isinstance(v, int) else f"{v:.4f}" if abs(v) < 1e4 else f"{v:.4g}"

    width = max(12, *(len(n) for n in columns))
    lines = ["metric".ljust(16) + "".join(n.rjust(width + 2) for n in columns)]
    for k in rows:
        lines.append(k.ljust(16) + "".join(cell((columns[n] or {}).get(k)).rjust(width + 2) for n in columns))
    return "\n".join(lines)


def columns(client_metrics: dict[str, Any] | None, adapter: schemas.Adapter | None) -> dict[str, dict | None]:
    cm = client_metrics or (adapter.client_metrics if adapter else None) or {}
    ev = adapter.evaluation if adapter else None
    return {
        "emulator zero-shot": cm.get("emulator_zero_shot"),
        "emulator fine-tuned": cm.get("emulator_fine_tuned"),
        "full zero-shot": ev.zero_shot if ev else None,
        "plug-in": ev.plug_in if ev else None,
    }


# ---------------------------------------------------------------- the server's evaluation


def await_evaluation(
    client: ServerClient, created: schemas.AdapterCreated, settings: ClientSettings, progress: bool
) -> tuple[schemas.Job, schemas.Adapter]:
    job = wait_for_job(
        client,
        created.job.id,
        poll_s=settings.poll_interval_s,
        timeout_s=settings.wait_timeout_s,
        progress=progress,
        desc="plug-in evaluation",
    )
    return job, client.adapter(created.adapter.id)


def evaluation_failure(job: schemas.Job | None, adapter: schemas.Adapter | None) -> EvaluationFailedError | None:
    if job is not None and job.status == "failed":
        return EvaluationFailedError(
            f"the server's evaluation job {job.id} failed: {job.error or job.message or 'no reason given'}"
        )
    if adapter is not None and adapter.status == "failed":
        return EvaluationFailedError(
            f"the server's evaluation of adapter {adapter.id} failed: {adapter.error or 'no reason given'}"
        )
    return None


def report(
    *,
    as_json: bool,
    doc: dict[str, Any],
    columns: dict[str, dict | None],
    header: str,
    failure: ClientError | None = None,
) -> None:
    """The command's result: its JSON document (carrying `failure`, if any), or a header and the metrics table."""
    if as_json:
        if failure is not None:
            doc = {**doc, **error_object(failure, failure.exit_code)}
        emit_json(doc)
    else:
        typer.echo(header)
        typer.echo(comparison_table(columns))
