"""Which signing key to believe, and the checks that tie what the server says to the signed manifest.

The manifest's signature is checked against a key the data owner trusts (pinned, or recorded on first use,
like ssh's known_hosts), the manifest must name the emulator the URL names, and its sha256 and size must be
well formed (the sha256 names the cache file).
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from shared.signing import (
    MANIFEST_FORMAT,
    SignatureError,
    key_id,
    parse_pinned_key,
    public_key_from_b64,
    public_key_to_b64,
    trusted_keys_from_listing,
    verify_signed_manifest,
)

from .api import EmulatorRef, ServerClient
from .errors import BadInputError, TrustError

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


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
        data[server] = {
            "key_id": key_id(key),
            "public_key": public_key_to_b64(key),
            "first_seen": datetime.now(UTC).isoformat(timespec="seconds"),
        }
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
    return (
        f"\n{bar}\n!! WARNING: TRUST ON FIRST USE -- trusting a NEW, UNVERIFIED signing key\n"
        f"!!   server:     {server}\n!!   key id:     {kid}\n!!   public key: {public_key_b64}\n"
        f"!! Anyone able to intercept this connection could have supplied this key. Confirm the key id\n"
        f"!! with the model owner out of band, then pin it: SCALEOT_SERVER_PUBKEY={kid}\n"
        f"!! Recorded in {record_path}; a different key from this server will be refused.\n{bar}\n"
    )


def resolve_trust(
    client: ServerClient,
    *,
    pinned: str | None,
    trust_on_first_use: bool,
    signed: dict[str, Any],
    known: KnownServers,
    warn: Callable[[str], None] = lambda m: print(m, file=sys.stderr),
) -> Trust:
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
            raise TrustError(
                f"the pinned key id {kid} is not among the server's published (non-revoked) "
                "signing keys; the server may be an impostor, or the key was rotated: "
                "ask the model owner for the current key id"
            )
        return Trust(keys, f"pinned key {kid}")
    recorded = known.get(client.server)
    if recorded is not None:
        return Trust({recorded[0]: recorded[1]}, f"key {recorded[0]} recorded on first use in {known.path}")
    if not trust_on_first_use:
        raise BadInputError(
            "no trusted server key: set SCALEOT_SERVER_PUBKEY (or --server-pubkey) to the "
            "server's public key or key id, or pass --trust-on-first-use to accept and record "
            "the key the server presents now"
        )
    published = trusted_keys_from_listing(client.signing_keys())
    kid = str(signed.get("key_id"))
    if kid not in published:
        raise TrustError(
            f"the manifest is signed by key {kid!r}, which the server does not publish "
            "(or has revoked) at /v1/signing-keys; refusing it"
        )
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
        raise TrustError(
            f"the signed manifest is for emulator {manifest.get('emulator_id')!r}, but the URL "
            f"names {ref.emulator_id!r}; refusing a substituted emulator"
        )
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
        raise TrustError(
            f"the signed layer plan {signed_roles} differs from the plan inside the emulator file "
            f"{file_plan.get('roles')}; refusing it"
        )
