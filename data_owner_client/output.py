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
from shared.eval_settings import EVAL_SETTINGS_KEY, counted, measurements

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
    """Metrics side by side: one column per stage (emulator zero-shot, fine-tuned, full zero-shot, plug-in).

    Columns side by side are one measurement: columns that counted different tokens (or questions) are never put
    next to each other; each group gets its own table, after a note saying what each counted."""
    present = {name: m for name, m in columns.items() if m}
    if not present:
        return "(no evaluation metrics)"
    groups = measurements(present)
    if len(groups) > 1:
        what = "; ".join(f"{', '.join(g)}: {_counted_text(present[g[0]])}" for g in groups)
        return (
            f"not one measurement, so not side by side ({what}); compare figures within a table only. "
            "The server scores with the settings an upload carries (dataowner-client tune sends them)\n\n"
            + "\n\n".join(_table({n: columns[n] for n in g}) for g in groups)
        )
    return _table(columns)


def _counted_text(metrics: dict[str, Any]) -> str:
    n = counted(metrics)
    if n is None:
        return "count not reported"
    return f"{n:,} questions" if "tokens" not in metrics else f"{n:,} tokens"


def measurement_caption(client_metrics: dict[str, Any] | None, adapter: schemas.Adapter | None) -> str:
    """A line under the header saying what the table measured: the evaluation settings, who chose them, the count
    every column scored, and the server's notes (a cap it applied). Empty when there is nothing to say."""
    mine = (client_metrics or {}).get(EVAL_SETTINGS_KEY)
    theirs = adapter.evaluation.settings if adapter is not None and adapter.evaluation else None
    cols = {k: v for k, v in columns(client_metrics, adapter).items() if v}
    one = len(measurements(cols)) == 1
    count = f"; every column scored {_counted_text(next(iter(cols.values())))}" if cols and one else ""
    if isinstance(theirs, dict):
        settings = _settings_text(theirs)
        if theirs.get("source") == "client":
            line = f"evaluation settings: {settings} (this client's, used by the server too){count}"
        else:
            line = f"evaluation settings: the server's ({settings}); the upload carried none{count}"
        notes = [str(n) for n in theirs.get("notes") or []]
        return "\n" + line + "".join(f"\nserver note: {n}" for n in notes)
    if isinstance(mine, dict):
        server = " (the server did not report its settings: an older server)" if adapter is not None else ""
        return f"\nevaluation settings: {_settings_text(mine)}{server}{count if adapter is None else ''}"
    return ""


def _settings_text(settings: dict[str, Any]) -> str:
    cap = settings.get("max_examples")
    return f"seq_len {settings.get('seq_len')}, " + ("all examples" if cap is None else f"max_examples {cap}")


def _table(columns: dict[str, dict[str, Any] | None]) -> str:
    present = {name: m for name, m in columns.items() if m}
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
