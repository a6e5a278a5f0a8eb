"""Ed25519 signing of emulator manifests, shared by the model owner (signs) and data owner (verifies).

The server signs a small JSON *manifest* (file sha256 + size, ids, layer plan, key id, issue time),
not the multi-MB file itself: the client verifies the signature over the manifest, then checks the
downloaded file against the manifest's sha256/size with `verify_file`.

Keys are identified by `key_id` = first 16 hex chars of sha256(raw 32-byte public key), so a
data owner can pin either the full public key (base64) or just that fingerprint. Several keys can be
published at once (rotation): every manifest names its key id, old manifests keep verifying through
their own key, and a key the server marks `revoked` is never put into the trusted set.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

MANIFEST_FORMAT = "scaleot-emulator-manifest/v1"
ALGORITHM = "Ed25519"
KEY_ID_HEX_CHARS = 16
_CHUNK = 1 << 20


class VerificationError(Exception):
    """Base of everything that means "do not trust this emulator"."""


class SignatureError(VerificationError):
    """Bad signature, unknown/revoked key id, malformed signed manifest, or key id mismatch."""


class IntegrityError(VerificationError):
    """The file does not match the manifest (size or sha256)."""


# ---------------------------------------------------------------- keys


def load_or_create_private_key(path: str | Path) -> Ed25519PrivateKey:
    """Load a PEM (PKCS8, unencrypted) Ed25519 key; generate it with mode 0600 if the file is absent."""
    path = Path(path)
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{path} holds a {type(key).__name__}, not an Ed25519 private key")
        return key
    path.parent.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    # O_EXCL: two processes starting at once must not both write a key; the loser reads the winner's.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return load_or_create_private_key(path)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
        f.flush()
        os.fsync(f.fileno())
    return key


def raw_public_bytes(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(public_key: Ed25519PublicKey) -> str:
    return hashlib.sha256(raw_public_bytes(public_key)).hexdigest()[:KEY_ID_HEX_CHARS]


def public_key_to_b64(public_key: Ed25519PublicKey) -> str:
    return base64.b64encode(raw_public_bytes(public_key)).decode("ascii")


def public_key_from_b64(text: str) -> Ed25519PublicKey:
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SignatureError(f"public key is not valid base64: {exc}") from None
    if len(raw) != 32:
        raise SignatureError(f"an Ed25519 public key is 32 bytes, got {len(raw)}")
    return Ed25519PublicKey.from_public_bytes(raw)


def parse_pinned_key(text: str) -> tuple[str, Ed25519PublicKey | None]:
    """Parse what a data owner pins: a base64 public key -> (its key id, key), or a key id -> (id, None).

    With only a fingerprint the caller fetches the published keys and keeps the one whose *computed*
    key id matches (see `trusted_keys_from_listing`), never trusting the server's claimed id.
    """
    text = text.strip()
    candidate = text.lower()
    if len(candidate) == KEY_ID_HEX_CHARS and all(c in "0123456789abcdef" for c in candidate):
        return candidate, None
    try:
        key = public_key_from_b64(text)
    except SignatureError as exc:
        raise SignatureError(
            f"pinned server key {text!r} is neither a {KEY_ID_HEX_CHARS}-hex-char key id nor a base64 "
            f"Ed25519 public key ({exc}); copy it from GET /v1/signing-keys"
        ) from None
    return key_id(key), key


def trusted_keys_from_listing(listing: dict[str, Any], pins: list[str] | None = None) -> dict[str, Ed25519PublicKey]:
    """Trusted keys from a `GET /v1/signing-keys` body: revoked keys dropped, ids recomputed.

    With `pins` (base64 keys or key ids), only keys matching a pin are kept; a pinned full key is
    trusted even if the listing lacks it (the listing is not needed to verify then).
    """
    entries = listing.get("keys") if isinstance(listing, dict) else None
    entries = [e for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []
    published: dict[str, Ed25519PublicKey] = {}
    for entry in entries:
        try:
            if entry.get("status") == "revoked" or entry.get("algorithm", ALGORITHM) != ALGORITHM:
                continue
            key = public_key_from_b64(entry["public_key"])
        except (SignatureError, KeyError, TypeError, AttributeError):
            continue
        published[key_id(key)] = key
    if not pins:
        return published
    revoked = {str(e.get("key_id")) for e in entries if e.get("status") == "revoked"}
    trusted: dict[str, Ed25519PublicKey] = {}
    for pin in pins:
        kid, pinned = parse_pinned_key(pin)
        if kid in revoked:
            continue
        if pinned is not None:
            trusted[kid] = pinned
        elif kid in published:
            trusted[kid] = published[kid]
    return trusted


# ---------------------------------------------------------------- manifests


def canonical_bytes(manifest: dict[str, Any]) -> bytes:
    """The exact bytes that are signed: sorted keys, no whitespace, UTF-8."""
    return json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def utc_now_iso() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def emulator_manifest(
    *,
    emulator_id: str,
    model_id: str,
    sha256: str,
    size_bytes: int,
    layer_plan: dict[str, Any],
    key_id: str,
    issued_at: str | None = None,
) -> dict[str, Any]:
    return {
        "format": MANIFEST_FORMAT,
        "emulator_id": emulator_id,
        "model_id": model_id,
        "sha256": sha256,
        "size_bytes": int(size_bytes),
        "layer_plan": layer_plan,
        "key_id": key_id,
        "issued_at": issued_at or utc_now_iso(),
    }


def sign_manifest(private_key: Ed25519PrivateKey, manifest: dict[str, Any]) -> dict[str, Any]:
    """Return `{"manifest", "signature" (base64), "key_id"}`; the manifest's key_id is filled in if absent."""
    kid = key_id(private_key.public_key())
    manifest = dict(manifest)
    if manifest.setdefault("key_id", kid) != kid:
        raise ValueError(f"manifest names key {manifest['key_id']!r} but is being signed with {kid!r}")
    signature = private_key.sign(canonical_bytes(manifest))
    return {"manifest": manifest, "signature": base64.b64encode(signature).decode("ascii"), "key_id": kid}


def verify_signed_manifest(signed: dict[str, Any], trusted: dict[str, Ed25519PublicKey]) -> dict[str, Any]:
    """Check structure, key id and signature; return the manifest. Raises `SignatureError`."""
    if not isinstance(signed, dict):
        raise SignatureError("signed manifest must be a JSON object with manifest, signature and key_id")
    manifest, signature, kid = signed.get("manifest"), signed.get("signature"), signed.get("key_id")
    if not isinstance(manifest, dict) or not isinstance(signature, str) or not isinstance(kid, str):
        raise SignatureError("malformed signed manifest: expected {manifest: object, signature: str, key_id: str}")
    if manifest.get("key_id") != kid:
        raise SignatureError(f"manifest says key {manifest.get('key_id')!r} but the envelope says {kid!r}")
    key = trusted.get(kid)
    if key is None:
        raise SignatureError(
            f"manifest signed by key {kid!r}, which is not trusted (unknown, revoked, or not the pinned key); "
            f"trusted: {sorted(trusted) or 'none'}"
        )
    if key_id(key) != kid:
        raise SignatureError(f"trusted key registered under {kid!r} actually has id {key_id(key)!r}")
    try:
        sig = base64.b64decode(signature, validate=True)
    except (binascii.Error, ValueError):
        raise SignatureError("signature is not valid base64") from None
    try:
        signed_bytes = canonical_bytes(manifest)
    except (ValueError, TypeError, RecursionError):  # lone surrogates, absurd nesting: nothing we signed
        raise SignatureError("malformed manifest: it has no canonical JSON form (invalid text or nesting)") from None
    try:
        key.verify(sig, signed_bytes)
    except InvalidSignature:
        raise SignatureError(
            "signature does not match the manifest: it was altered or not signed by this key"
        ) from None
    return manifest


def sha256_file(path: str | Path) -> tuple[str, int]:
    """Streaming sha256 and size of a file (never reads it whole)."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def verify_file(path: str | Path, manifest: dict[str, Any]) -> None:
    """Raise `IntegrityError` unless the file's size and sha256 match the (already verified) manifest."""
    try:
        expected_sha, expected_size = str(manifest["sha256"]).lower(), int(manifest["size_bytes"])
    except (KeyError, TypeError, ValueError):
        raise IntegrityError("manifest lacks a valid sha256/size_bytes") from None
    actual_size = os.path.getsize(path)
    if actual_size != expected_size:
        raise IntegrityError(
            f"{path}: size {actual_size} bytes, manifest says {expected_size}; "
            "the download is incomplete or altered, download it again"
        )
    actual_sha, _ = sha256_file(path)
    if actual_sha != expected_sha:
        raise IntegrityError(
            f"{path}: sha256 {actual_sha} does not match the manifest's {expected_sha}; "
            "the file was altered, download it again"
        )
