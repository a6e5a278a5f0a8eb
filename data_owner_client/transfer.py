"""Talking to the model owner: fetch + verify the signed emulator, resumable download, upload, polling.

Trust model: nothing the server says is believed until it is tied to the signed manifest. The
manifest's signature is checked against a key the data owner trusts (pinned, or recorded on first
use), the manifest must name the emulator the URL names, and the downloaded bytes must match the
manifest's sha256 and size. Only then is the file handed to `shared.emulator_file.load_emulator`
(safetensors + JSON metadata; nothing is unpickled or executed).
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import BaseModel, ValidationError
from tqdm import tqdm

from shared import schemas
from shared.signing import (
    MANIFEST_FORMAT,
    IntegrityError,
    SignatureError,
    key_id,
    parse_pinned_key,
    public_key_from_b64,
    public_key_to_b64,
    trusted_keys_from_listing,
    verify_file,
    verify_signed_manifest,
)

from .errors import BadInputError, ServerError, TrustError

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
M = TypeVar("M", bound=BaseModel)


# ---------------------------------------------------------------- URLs


@dataclass(frozen=True)
class EmulatorRef:
    """An emulator resource URL split into the server base and the emulator id."""

    server: str  # e.g. "http://host:8000" (may carry a path prefix if the API sits behind one)
    emulator_id: str

    @property
    def url(self) -> str:
        return f"{self.server}/v1/emulators/{self.emulator_id}"


def parse_emulator_url(url: str) -> EmulatorRef:
    """`{server}/v1/emulators/{id}` -> EmulatorRef; anything else is a usage error."""
    parts = urlsplit(url.strip())
    m = re.fullmatch(r"(?P<prefix>.*?)/v1/emulators/(?P<id>[A-Za-z0-9_.~-]+)/?", parts.path)
    if parts.scheme not in ("http", "https") or not parts.netloc or m is None:
        raise BadInputError(f"--emulator-url {url!r} is not an emulator URL; expected "
                            "http(s)://SERVER/v1/emulators/ID (copy it from the model owner)")
    server = urlunsplit((parts.scheme, parts.netloc, m["prefix"], "", "")).rstrip("/")
    return EmulatorRef(server, m["id"])


def split_resource_url(url: str, collection: str) -> tuple[str, str] | None:
    """`{server}/v1/{collection}/{id}` -> (server, id), or None when `url` is not such a URL."""
    parts = urlsplit(url.strip())
    m = re.fullmatch(rf"(?P<prefix>.*?)/v1/{collection}/(?P<id>[A-Za-z0-9_.~-]+)/?", parts.path)
    if parts.scheme not in ("http", "https") or not parts.netloc or m is None:
        return None
    return urlunsplit((parts.scheme, parts.netloc, m["prefix"], "", "")).rstrip("/"), m["id"]


# ---------------------------------------------------------------- HTTP


def _error_message(response: httpx.Response) -> tuple[str | None, str]:
    """(code, message) from the server's `{"error": {"code", "message"}}` body, or the raw text."""
    try:
        body = schemas.ErrorBody.model_validate(response.json())
        return body.error.code, body.error.message
    except (ValueError, ValidationError):
        return None, (response.text or response.reason_phrase).strip()[:500]


def raise_for_status(response: httpx.Response) -> None:
    if 300 <= response.status_code < 400:  # not followed: the API key must go only to the server the user named
        raise ServerError(f"server redirected {response.request.method} {response.request.url} to "
                          f"{response.headers.get('location')!r}; redirects are not followed",
                          status_code=response.status_code)
    if response.status_code < 400:
        return
    code, message = _error_message(response)
    if response.status_code == 401 and not response.request.headers.get("authorization"):
        # The server's own hint names the model owner's admin command; the data owner needs a key from them.
        raise ServerError(f"server answered 401 for {response.request.method} {response.request.url}: no API key "
                          "was sent. Ask the model owner for an API key for your organization, then set "
                          "SCALEOT_API_KEY (or pass --api-key)", status_code=401, code=code or "unauthorized")
    hint = {401: " (the key in SCALEOT_API_KEY / --api-key was refused: ask the model owner for a valid one)",
            403: " (check SCALEOT_API_KEY: your organization may lack access; ask the model owner)"}.get(
        response.status_code, "")
    raise ServerError(f"server answered {response.status_code} {code or response.reason_phrase} for "
                      f"{response.request.method} {response.request.url}: {message}{hint}",
                      status_code=response.status_code, code=code)


@contextmanager
def network_errors(what: str) -> Iterator[None]:
    """Turn transport failures (refused, reset, timeout) into a ServerError with context."""
    try:
        yield
    except httpx.TransportError as exc:
        raise ServerError(f"{what}: {type(exc).__name__}: {exc or 'connection failed'}") from exc


def parse_as(model: type[M], data: Any, what: str) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ServerError(f"unexpected {what} from the server: {exc.error_count()} invalid field(s): "
                          f"{exc.errors()[0]['loc']} {exc.errors()[0]['msg']}") from None


class ServerClient:
    """Thin httpx wrapper: bearer auth, JSON errors -> ServerError, transport errors -> ServerError."""

    def __init__(self, server: str, api_key: str | None, *, timeout: float = 60.0,
                 transport: httpx.BaseTransport | None = None):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.server = server.rstrip("/")
        # Redirects are not followed: the API key must only go to the server the user named.
        self.http = httpx.Client(headers=headers, timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
                                 transport=transport, follow_redirects=False)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> ServerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def url(self, path: str) -> str:
        return f"{self.server}{path}"

    def get_json(self, path: str) -> Any:
        with network_errors(f"cannot GET {self.url(path)}"):
            r = self.http.get(self.url(path))
        raise_for_status(r)
        try:
            return r.json()
        except ValueError:
            raise ServerError(f"GET {self.url(path)} did not return JSON") from None

    def emulator(self, emulator_id: str) -> schemas.Emulator:
        return parse_as(schemas.Emulator, self.get_json(f"/v1/emulators/{emulator_id}"), "emulator")

    def signed_manifest(self, emulator_id: str) -> dict[str, Any]:
        # Kept as a raw dict: the signature covers the exact manifest fields, not a re-serialised model.
        data = self.get_json(f"/v1/emulators/{emulator_id}/signature")
        if not isinstance(data, dict):
            raise SignatureError("the signature endpoint did not return a JSON object")
        return data

    def signing_keys(self) -> dict[str, Any]:
        return self.get_json("/v1/signing-keys")

    def job(self, job_id: str) -> schemas.Job:
        return parse_as(schemas.Job, self.get_json(f"/v1/jobs/{job_id}"), "job")

    def adapter(self, adapter_id: str) -> schemas.Adapter:
        return parse_as(schemas.Adapter, self.get_json(f"/v1/adapters/{adapter_id}"), "adapter")

    def upload_info(self, emulator_id: str) -> dict[str, Any] | None:
        """What an adapter upload needs (`eval_data_required`, eval suffixes, size caps), asked before training;
        None when the server does not say (a server without this endpoint): the caller must not rely on it."""
        try:
            data = self.get_json(f"/v1/emulators/{emulator_id}/upload-info")
        except ServerError as exc:
            if exc.status_code in (404, 405, 501):
                return None
            raise
        return data if isinstance(data, dict) else None


# ---------------------------------------------------------------- trust


class KnownServers:
    """Keys recorded in trust-on-first-use mode, per server (like ssh's known_hosts).

    A recorded key is trusted like a pinned one afterwards; a server that later signs with another
    key is refused until the user removes the record (key rotation must be confirmed by a human).
    """

    def __init__(self, path: Path):
        self.path = path

    def _load(self) -> dict[str, dict[str, str]]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise BadInputError(f"{self.path}: unreadable trust record ({exc}); fix or delete it") from None
        return data if isinstance(data, dict) else {}

    def get(self, server: str) -> tuple[str, Ed25519PublicKey] | None:
        entry = self._load().get(server)
        if not entry:
            return None
        key = public_key_from_b64(entry["public_key"])
        return key_id(key), key

    def record(self, server: str, key: Ed25519PublicKey) -> None:
        data = self._load()
        data[server] = {"key_id": key_id(key), "public_key": public_key_to_b64(key),
                        "first_seen": datetime.now(UTC).isoformat(timespec="seconds")}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, self.path)


@dataclass
class Trust:
    keys: dict[str, Ed25519PublicKey]
    source: str  # where the trust comes from, for error messages


def tofu_warning(server: str, kid: str, public_key_b64: str, record_path: Path) -> str:
    bar = "!" * 78
    return (f"\n{bar}\n!! WARNING: TRUST ON FIRST USE -- trusting a NEW, UNVERIFIED signing key\n"
            f"!!   server:     {server}\n!!   key id:     {kid}\n!!   public key: {public_key_b64}\n"
            f"!! Anyone able to intercept this connection could have supplied this key. Confirm the key id\n"
            f"!! with the model owner out of band, then pin it: SCALEOT_SERVER_PUBKEY={kid}\n"
            f"!! Recorded in {record_path}; a different key from this server will be refused.\n{bar}\n")


def resolve_trust(client: ServerClient, *, pinned: str | None, trust_on_first_use: bool,
                  signed: dict[str, Any], known: KnownServers,
                  warn: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> Trust:
    """The keys to verify `signed` with: pinned key > recorded TOFU key > (TOFU) the server's key now."""
    if pinned:
        try:
            kid, key = parse_pinned_key(pinned)
        except SignatureError as exc:
            raise BadInputError(str(exc)) from None
        if key is not None:
            return Trust({kid: key}, f"pinned key {kid}")
        # Only a fingerprint: take the published key whose *computed* id matches it.
        keys = trusted_keys_from_listing(client.signing_keys(), [pinned])
        if not keys:
            raise TrustError(f"the pinned key id {kid} is not among the server's published (non-revoked) "
                             "signing keys; the server may be an impostor, or the key was rotated: "
                             "ask the model owner for the current key id")
        return Trust(keys, f"pinned key {kid}")
    recorded = known.get(client.server)
    if recorded is not None:
        return Trust({recorded[0]: recorded[1]}, f"key {recorded[0]} recorded on first use in {known.path}")
    if not trust_on_first_use:
        raise BadInputError("no trusted server key: set SCALEOT_SERVER_PUBKEY (or --server-pubkey) to the "
                            "server's public key or key id, or pass --trust-on-first-use to accept and record "
                            "the key the server presents now")
    published = trusted_keys_from_listing(client.signing_keys())
    kid = str(signed.get("key_id"))
    if kid not in published:
        raise TrustError(f"the manifest is signed by key {kid!r}, which the server does not publish "
                         "(or has revoked) at /v1/signing-keys; refusing it")
    key = published[kid]
    known.record(client.server, key)
    warn(tofu_warning(client.server, kid, public_key_to_b64(key), known.path))
    return Trust({kid: key}, f"key {kid} trusted on first use")


def verify_manifest(ref: EmulatorRef, signed: dict[str, Any], trust: Trust) -> dict[str, Any]:
    """Signature, format and emulator id; returns the manifest. Raises SignatureError / TrustError."""
    try:
        manifest = verify_signed_manifest(signed, trust.keys)
    except SignatureError as exc:
        raise SignatureError(f"{exc} [trust: {trust.source}]") from None
    if manifest.get("format") != MANIFEST_FORMAT:
        raise TrustError(f"manifest format {manifest.get('format')!r} is not {MANIFEST_FORMAT!r}")
    if manifest.get("emulator_id") != ref.emulator_id:
        raise TrustError(f"the signed manifest is for emulator {manifest.get('emulator_id')!r}, but the URL "
                         f"names {ref.emulator_id!r}; refusing a substituted emulator")
    sha = str(manifest.get("sha256", "")).lower()
    if not _SHA256_RE.match(sha):  # it names the cache file: never let it be a path
        raise TrustError(f"manifest sha256 {manifest.get('sha256')!r} is not 64 hex digits")
    try:
        if int(manifest["size_bytes"]) < 0:
            raise ValueError
    except (KeyError, TypeError, ValueError):
        raise TrustError(f"manifest size_bytes {manifest.get('size_bytes')!r} is not a byte count") from None
    return manifest


def check_plan_matches(manifest: dict[str, Any], file_plan: dict[str, Any]) -> None:
    """The signed layer plan must be the plan inside the (hash-verified) file: a server-side mix-up guard."""
    signed_roles = (manifest.get("layer_plan") or {}).get("roles")
    if signed_roles is not None and list(signed_roles) != list(file_plan.get("roles", [])):
        raise TrustError(f"the signed layer plan {signed_roles} differs from the plan inside the emulator file "
                         f"{file_plan.get('roles')}; refusing it")


# ---------------------------------------------------------------- download


def cache_path(cache_dir: Path, sha256: str) -> Path:
    return cache_dir / "emulators" / f"{sha256.lower()}.safetensors"


def _etag_sha(response: httpx.Response) -> str | None:
    etag = response.headers.get("etag")
    if not etag:
        return None
    return etag.removeprefix("W/").strip().strip('"').lower()


def download_emulator(client: ServerClient, ref: EmulatorRef, manifest: dict[str, Any], cache_dir: Path,
                      *, progress: bool = True) -> tuple[Path, bool]:
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


def _fetch_into(client: ServerClient, ref: EmulatorRef, part: Path, offset: int, sha: str, size: int,
                progress: bool) -> None:
    url = client.url(f"/v1/emulators/{ref.emulator_id}/file")
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    written = offset
    with network_errors(f"download of {url} failed"):
        with client.http.stream("GET", url, headers=headers) as r:
            if r.status_code == 416 and offset:  # our .part is not a prefix the server can continue
                part.unlink()
                raise ServerError(f"server refused to resume at byte {offset}; the partial file was removed, "
                                  "run the command again to download from the start")
            raise_for_status(r)
            served = _etag_sha(r)
            if served is not None and served != sha:
                raise TrustError(f"the server is serving a file with ETag {served}, but the signed manifest "
                                 f"says sha256 {sha}; refusing it")
            if r.status_code == 206:
                rng = r.headers.get("content-range", "")
                if not rng.startswith(f"bytes {offset}-"):
                    raise ServerError(f"server answered range {rng!r} when asked for bytes {offset}-")
                mode = "ab"
            else:  # 200: the server ignored the Range header; start over
                mode, written = "wb", 0
            bar = tqdm(total=size, initial=written, unit="B", unit_scale=True, unit_divisor=1024,
                       desc="emulator", disable=not progress, leave=False)
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
                        raise ServerError(f"download interrupted at {written} of {size} bytes "
                                          f"({type(exc).__name__}); run the command again to resume") from exc
            finally:
                bar.close()
    if written != size:
        raise ServerError(f"download ended at {written} of {size} bytes; run the command again to resume")


# ---------------------------------------------------------------- the whole fetch step


@dataclass
class VerifiedEmulator:
    ref: EmulatorRef
    info: schemas.Emulator  # unsigned description (adapter spec, sizes); the server enforces it on upload
    manifest: dict[str, Any]  # signed: sha256, size, ids, layer plan
    path: Path  # the verified file in the cache
    reused: bool


def wait_for_emulator(client: ServerClient, ref: EmulatorRef, *, poll_s: float, timeout_s: float,
                      progress: bool) -> schemas.Emulator:
    """The emulator's description, waiting while the server still builds it.

    Polls the emulator itself, not its build job: the job may belong to the model owner's org.
    """
    info = client.emulator(ref.emulator_id)
    deadline = time.monotonic() + timeout_s
    with tqdm(desc="waiting for the emulator build", disable=not progress or info.status != "building",
              leave=False, bar_format="{desc} {elapsed}") as bar:
        while info.status == "building":
            if time.monotonic() > deadline:
                raise ServerError(f"emulator {ref.emulator_id} still building after {timeout_s:.0f}s; try again later")
            time.sleep(poll_s)
            bar.refresh()
            info = client.emulator(ref.emulator_id)
    if info.status == "failed":
        raise ServerError(f"the server failed to build emulator {ref.emulator_id}: {info.error or 'no reason given'}")
    return info


def fetch_verified_emulator(client: ServerClient, ref: EmulatorRef, *, cache_dir: Path, pinned: str | None,
                            trust_on_first_use: bool, progress: bool = True, poll_s: float = 1.0,
                            timeout_s: float = 3600.0) -> VerifiedEmulator:
    info = wait_for_emulator(client, ref, poll_s=poll_s, timeout_s=timeout_s, progress=progress)
    signed = client.signed_manifest(ref.emulator_id)
    trust = resolve_trust(client, pinned=pinned, trust_on_first_use=trust_on_first_use, signed=signed,
                          known=KnownServers(cache_dir / "known_servers.json"))
    manifest = verify_manifest(ref, signed, trust)
    path, reused = download_emulator(client, ref, manifest, cache_dir, progress=progress)
    return VerifiedEmulator(ref, info, manifest, path, reused)


# ---------------------------------------------------------------- upload + polling


def upload_adapter(client: ServerClient, ref: EmulatorRef, adapter_file: Path, *, eval_data: Path | None = None,
                   metrics: dict[str, Any] | None = None,
                   adapter_config: dict[str, Any] | None = None) -> schemas.AdapterCreated:
    """POST the adapter safetensors (and optional eval file + metrics) as multipart; 202 -> adapter + job."""
    url = client.url(f"/v1/emulators/{ref.emulator_id}/adapters")
    data: dict[str, str] = {}
    if metrics is not None:
        data["metrics"] = json.dumps(metrics)
    if adapter_config is not None:
        data["adapter_config"] = json.dumps(adapter_config)
    with ExitStack() as stack:
        files = {"adapter": (adapter_file.name, stack.enter_context(open(adapter_file, "rb")),
                             "application/octet-stream")}
        if eval_data is not None:  # keep the suffix: the server picks the reader by it
            files["eval_data"] = (eval_data.name, stack.enter_context(open(eval_data, "rb")),
                                  "application/octet-stream")
        with network_errors(f"upload to {url} failed"):
            r = client.http.post(url, files=files, data=data)
    raise_for_status(r)
    return parse_as(schemas.AdapterCreated, r.json(), "upload response")


def wait_for_job(client: ServerClient, job_id: str, *, poll_s: float, timeout_s: float, progress: bool,
                 desc: str = "server job") -> schemas.Job:
    """Poll `GET /v1/jobs/{id}` until it finishes, showing its progress and message."""
    deadline = time.monotonic() + timeout_s
    bar = tqdm(total=100, desc=desc, disable=not progress, leave=False, bar_format="{l_bar}{bar}| {postfix}")
    try:
        while True:
            job = client.job(job_id)
            bar.n = round(job.progress * 100)
            bar.set_postfix_str(f"{job.status} {job.message}"[:60], refresh=True)
            if job.finished:
                return job
            if time.monotonic() > deadline:
                raise ServerError(f"job {job_id} still {job.status} after {timeout_s:.0f}s; check it later with "
                                  f"`dataowner-client status {job_id} --server {client.server}`")
            time.sleep(poll_s)
    finally:
        bar.close()
