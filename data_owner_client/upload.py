"""The adapter upload: one multipart POST of the adapter file (and the optional evaluation file and metrics)."""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from shared import schemas

from .api import EmulatorRef, ServerClient, network_errors, parse_as, raise_for_status


def upload_adapter(
    client: ServerClient,
    ref: EmulatorRef,
    adapter_file: Path,
    *,
    eval_data: Path | None = None,
    metrics: dict[str, Any] | None = None,
    adapter_config: dict[str, Any] | None = None,
) -> schemas.AdapterCreated:
    """POST the adapter safetensors (and optional eval file + metrics) as multipart; 202 -> adapter + job."""
    url = client.url(f"/v1/emulators/{ref.emulator_id}/adapters")
    data: dict[str, str] = {}
    if metrics is not None:
        data["metrics"] = json.dumps(metrics)
    if adapter_config is not None:
        data["adapter_config"] = json.dumps(adapter_config)
    with ExitStack() as stack:
        files = {
            "adapter": (adapter_file.name, stack.enter_context(open(adapter_file, "rb")), "application/octet-stream")
        }
        if eval_data is not None:  # keep the suffix: the server picks the reader by it
            files["eval_data"] = (
                eval_data.name,
                stack.enter_context(open(eval_data, "rb")),
                "application/octet-stream",
            )
        with network_errors(f"upload to {url} failed"):
            r = client.http.post(url, files=files, data=data)
    raise_for_status(r)
    return parse_as(schemas.AdapterCreated, r.json(), "upload response")
