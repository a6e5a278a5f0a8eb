"""Talking to the model owner: the whole fetch step (wait for the build, trust the key, verify the signed
manifest, download), and the client library's one import point.

Trust model: nothing the server says is believed until it is tied to the signed manifest. The
manifest's signature is checked against a key the data owner trusts (pinned, or recorded on first
use), the manifest must name the emulator the URL names, and the downloaded bytes must match the
manifest's sha256 and size. Only then is the file handed to `shared.emulator_file.load_emulator`
(safetensors + JSON metadata; nothing is unpickled or executed).

One module per concern: `api.py` (URLs, HTTP client), `trust.py` (keys, manifest checks), `download.py`
(resumable, verified download), `upload.py` (adapter upload), `poll.py` (waiting on builds and jobs).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared import schemas

from .api import (
    EmulatorRef,
    ServerClient,
    network_errors,
    parse_as,
    parse_emulator_url,
    raise_for_status,
    split_resource_url,
)
from .download import _fetch_into, cache_path, download_emulator
from .poll import wait_for_emulator, wait_for_job
from .trust import KnownServers, Trust, check_plan_matches, resolve_trust, tofu_warning, verify_manifest
from .upload import upload_adapter

__all__ = [
    "EmulatorRef",
    "KnownServers",
    "ServerClient",
    "Trust",
    "VerifiedEmulator",
    "_fetch_into",
    "cache_path",
    "check_plan_matches",
    "download_emulator",
    "fetch_verified_emulator",
    "network_errors",
    "parse_as",
    "parse_emulator_url",
    "raise_for_status",
    "resolve_trust",
    "split_resource_url",
    "tofu_warning",
    "upload_adapter",
    "verify_manifest",
    "wait_for_emulator",
    "wait_for_job",
]


@dataclass
class VerifiedEmulator:
    ref: EmulatorRef
    info: schemas.Emulator  # unsigned description (adapter spec, sizes); the server enforces it on upload
    manifest: dict[str, Any]  # signed: sha256, size, ids, layer plan
    path: Path  # the verified file in the cache
    reused: bool


def fetch_verified_emulator(
    client: ServerClient,
    ref: EmulatorRef,
    *,
    cache_dir: Path,
    pinned: str | None,
    trust_on_first_use: bool,
    progress: bool = True,
    poll_s: float = 1.0,
    timeout_s: float = 3600.0,
) -> VerifiedEmulator:
    info = wait_for_emulator(client, ref, poll_s=poll_s, timeout_s=timeout_s, progress=progress)
    signed = client.signed_manifest(ref.emulator_id)
    trust = resolve_trust(
        client,
        pinned=pinned,
        trust_on_first_use=trust_on_first_use,
        signed=signed,
        known=KnownServers(cache_dir / "known_servers.json"),
    )
    manifest = verify_manifest(ref, signed, trust)
    path, reused = download_emulator(client, ref, manifest, cache_dir, progress=progress)
    return VerifiedEmulator(ref, info, manifest, path, reused)
