"""`dataowner-client download` and `verify`: the signed emulator, fetched into the cache or checked on disk."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Annotated, Any

import typer

from shared.signing import verify_file

from .errors import BadInputError
from .options import Connection, EmulatorUrlOpt, connection_options, emulator_client
from .output import emit_json, handled, note
from .settings import ClientSettings
from .transfer import (
    EmulatorRef,
    KnownServers,
    ServerClient,
    Trust,
    VerifiedEmulator,
    cache_path,
    fetch_verified_emulator,
    resolve_trust,
    verify_manifest,
)


def fetch(
    ref: EmulatorRef, settings: ClientSettings, client: ServerClient, tofu: bool, progress: bool
) -> VerifiedEmulator:
    """The verified emulator file (downloaded, or reused from the cache), with a note saying which."""
    ver = fetch_verified_emulator(
        client,
        ref,
        cache_dir=settings.cache_dir,
        pinned=settings.server_pubkey,
        trust_on_first_use=tofu,
        progress=progress,
        poll_s=settings.poll_interval_s,
        timeout_s=settings.wait_timeout_s,
    )
    note(
        f"verified emulator {ref.emulator_id} (model {ver.manifest['model_id']}, {ver.manifest['size_bytes']} bytes, "
        f"sha256 {ver.manifest['sha256'][:16]}..., key {ver.manifest['key_id']}); "
        f"{'reused cached file' if ver.reused else 'downloaded'} {ver.path}"
    )
    return ver


FileOpt = Annotated[
    Path | None, typer.Option("--file", help="The file to check (default: the cached download).", show_default=False)
]


@connection_options("api_key", "server_pubkey", "trust_on_first_use", "cache_dir", "as_json", "progress")
def download(
    emulator_url: EmulatorUrlOpt,
    out: Annotated[
        Path | None, typer.Option("--out", help="Also copy the verified file here.", show_default=False)
    ] = None,
    *,
    conn: Connection,
) -> None:
    """Download the emulator into the cache (resumable), verify signature, sha256 and size; print its path."""
    with handled(conn.as_json):
        settings, ref, client = emulator_client(conn, emulator_url)
        with client:
            ver = fetch(ref, settings, client, conn.trust_on_first_use, conn.show_progress)
        path = ver.path
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(ver.path, out)
            path = out
        if conn.as_json:
            emit_json({"path": str(path), "cache_path": str(ver.path), "reused": ver.reused, "manifest": ver.manifest})
        else:
            typer.echo(str(path))


@connection_options("api_key", "server_pubkey", "trust_on_first_use", "cache_dir", "as_json")
def verify(
    emulator_url: EmulatorUrlOpt,
    file: FileOpt = None,
    *,
    conn: Connection,
) -> None:
    """Check a local emulator file against the server's signed manifest (signature, key, emulator id, sha256, size)."""
    with handled(conn.as_json):
        settings, manifest, trust = _signed_manifest(conn, emulator_url)
        path = file or cache_path(settings.cache_dir, manifest["sha256"])
        if not path.is_file():
            raise BadInputError(
                f"{path}: no such file; run `dataowner-client download --emulator-url {emulator_url}` or pass --file"
            )
        verify_file(path, manifest)
        if conn.as_json:
            emit_json({"verified": True, "path": str(path), "trust": trust.source, "manifest": manifest})
        else:
            typer.echo(
                f"OK {path}: signed by {manifest['key_id']} ({trust.source}), "
                f"emulator {manifest['emulator_id']}, "
                f"model {manifest['model_id']}, sha256 {manifest['sha256']}, {manifest['size_bytes']} bytes"
            )


def _signed_manifest(conn: Connection, emulator_url: str) -> tuple[ClientSettings, dict[str, Any], Trust]:
    """The emulator's manifest, its signature checked with the key the user trusts (and that trust)."""
    settings, ref, client = emulator_client(conn, emulator_url)
    with client:
        signed = client.signed_manifest(ref.emulator_id)
        trust = resolve_trust(
            client,
            pinned=settings.server_pubkey,
            trust_on_first_use=conn.trust_on_first_use,
            signed=signed,
            known=KnownServers(settings.cache_dir / "known_servers.json"),
        )
        return settings, verify_manifest(ref, signed, trust), trust
