"""The emulator download: streamed into a sha256-keyed cache, resumable, and checked against the signed manifest."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from shared.signing import IntegrityError, verify_file

from .api import EmulatorRef, ServerClient, network_errors, raise_for_status
from .errors import ServerError, TrustError


def cache_path(cache_dir: Path, sha256: str) -> Path:
    return cache_dir / "emulators" / f"{sha256.lower()}.safetensors"


def _etag_sha(response: httpx.Response) -> str | None:
    etag = response.headers.get("etag")
    if not etag:
        return None
    return etag.removeprefix("W/").strip().strip('"').lower()


def download_emulator(
    client: ServerClient, ref: EmulatorRef, manifest: dict[str, Any], cache_dir: Path, *, progress: bool = True
) -> tuple[Path, bool]:
    """Stream the emulator into the sha256-keyed cache, resuming a `.part` file; verify; return (path, reused).

    An interrupted download keeps its `.part` file and the next call asks for `Range: bytes=N-`.
    The ETag (= sha256) of every response must be the signed one, so bytes of two different files
    are never stitched together. A cached file is reused after re-checking its hash.
    """
    sha, size = str(manifest["sha256"]).lower(), int(manifest["size_bytes"])
    final = cache_path(cache_dir, sha)
    if final.exists():
        try:
            verify_file(final, manifest)
            return final, True
        except IntegrityError:
            final.unlink()  # corrupted cache entry: fetch it again
    final.parent.mkdir(parents=True, exist_ok=True)
    part = final.with_name(final.name + ".part")
    offset = part.stat().st_size if part.exists() else 0
    if offset > size:
        part.unlink()
        offset = 0
    if offset < size:
        _fetch_into(client, ref, part, offset, sha, size, progress)
    try:
        verify_file(part, manifest)
    except IntegrityError:
        part.unlink()  # complete but wrong bytes: resuming from them could never succeed
        raise
    os.replace(part, final)
    return final, False


def _fetch_into(
    client: ServerClient, ref: EmulatorRef, part: Path, offset: int, sha: str, size: int, progress: bool
) -> None:
    url = client.url(f"/v1/emulators/{ref.emulator_id}/file")
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    written = offset
    with network_errors(f"download of {url} failed"), client.http.stream("GET", url, headers=headers) as r:
        if r.status_code == 416 and offset:  # our .part is not a prefix the server can continue
            part.unlink()
            raise ServerError(
                f"server refused to resume at byte {offset}; the partial file was removed, "
                "run the command again to download from the start"
            )
        raise_for_status(r)
        served = _etag_sha(r)
        if served is not None and served != sha:
            raise TrustError(
                f"the server is serving a file with ETag {served}, but the signed manifest "
                f"says sha256 {sha}; refusing it"
            )
        if r.status_code == 206:
            rng = r.headers.get("content-range", "")
            if not rng.startswith(f"bytes {offset}-"):
                raise ServerError(f"server answered range {rng!r} when asked for bytes {offset}-")
            mode = "ab"
        else:  # 200: the server ignored the Range header; start over
            mode, written = "wb", 0
        bar = tqdm(
            total=size,
            initial=written,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc="emulator",
            disable=not progress,
            leave=False,
        )
        try:
            with open(part, mode) as f:
                try:
                    for chunk in r.iter_bytes():  # as received: an interruption loses nothing
                        if written + len(chunk) > size:
                            raise IntegrityError(f"server sent more than the signed {size} bytes; refusing it")
                        f.write(chunk)
                        written += len(chunk)
                        bar.update(len(chunk))
                except httpx.TransportError as exc:
                    f.flush()
                    raise ServerError(
                        f"download interrupted at {written} of {size} bytes "
                        f"({type(exc).__name__}); run the command again to resume"
                    ) from exc
        finally:
            bar.close()
    if written != size:
        raise ServerError(f"download ended at {written} of {size} bytes; run the command again to resume")
