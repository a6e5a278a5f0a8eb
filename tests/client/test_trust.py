"""Trust failures are refused with exit code 3 (bad config: 2); nothing unverified reaches the cache."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from data_owner_client.cli import app
from data_owner_client.errors import ExitCode
from shared.signing import public_key_to_b64


def _download(runner, fake, *extra: str):
    return runner.invoke(app, ["download", "--emulator-url", fake.emulator_url, *extra])


def _cached_files(env: dict[str, str]) -> list[Path]:
    d = Path(env["SCALEOT_CLIENT_CACHE"]) / "emulators"
    return sorted(d.glob("*")) if d.exists() else []


def test_pinned_key_and_fingerprint_accept(runner, fake, client_env, pinned_key_id, monkeypatch):
    r = _download(runner, fake)
    assert r.exit_code == 0, r.output
    path = Path(r.stdout.strip())
    assert path.read_bytes() == fake.state.emulator_file.read_bytes()
    monkeypatch.setenv("SCALEOT_SERVER_PUBKEY", pinned_key_id)  # the fingerprint alone is enough
    assert _download(runner, fake).exit_code == 0


def _tamper_file(state) -> None:
    data = bytearray(state.emulator_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    state.file_override = bytes(data)


def _tamper_manifest(state) -> None:  # attacker swaps the file AND the manifest's hash, cannot re-sign
    _tamper_file(state)
    state.manifest_patch = {"sha256": hashlib.sha256(state.file_override).hexdigest()}


CASES = {
    "wrong pinned key": (lambda s: None, "not trusted"),
    "tampered file": (_tamper_file, "does not match the manifest"),
    "oversized file": (
        lambda s: setattr(s, "file_override", s.emulator_file.read_bytes() + b"x"),
        "more than the signed",
    ),
    "tampered manifest": (_tamper_manifest, "signature does not match"),
    "unknown key id": (lambda s: setattr(s, "sign_with", Ed25519PrivateKey.generate()), "not trusted"),
    "emulator id mismatch": (lambda s: setattr(s, "manifest_emulator_id", "emu_other"), "substituted"),
    "etag mismatch": (lambda s: setattr(s, "etag_override", "ab" * 32), "ETag"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_trust_failures_are_refused(runner, fake, client_env, monkeypatch, case):
    tamper, message = CASES[case]
    tamper(fake.state)
    if case == "wrong pinned key":
        monkeypatch.setenv("SCALEOT_SERVER_PUBKEY", public_key_to_b64(Ed25519PrivateKey.generate().public_key()))
    r = _download(runner, fake)
    assert r.exit_code == ExitCode.VERIFICATION, r.output
    assert message in r.stderr
    assert not [p for p in _cached_files(client_env) if p.suffix == ".safetensors"]  # nothing accepted


def test_unpublished_pinned_fingerprint_is_refused(runner, fake, client_env, monkeypatch):
    monkeypatch.setenv("SCALEOT_SERVER_PUBKEY", "0123456789abcdef")
    r = _download(runner, fake)
    assert r.exit_code == ExitCode.VERIFICATION and "not among the server's published" in r.stderr


def test_no_trusted_key_is_a_usage_error(runner, fake, client_env, monkeypatch):
    monkeypatch.delenv("SCALEOT_SERVER_PUBKEY")
    r = _download(runner, fake)
    assert r.exit_code == ExitCode.BAD_INPUT and "--trust-on-first-use" in r.stderr
    monkeypatch.setenv("SCALEOT_SERVER_PUBKEY", "not a key")
    assert _download(runner, fake).exit_code == ExitCode.BAD_INPUT


def test_trust_on_first_use_warns_records_and_then_pins(runner, fake, client_env, pinned_key_id, monkeypatch):
    monkeypatch.delenv("SCALEOT_SERVER_PUBKEY")
    r = _download(runner, fake, "--trust-on-first-use")
    assert r.exit_code == 0, r.output
    assert "WARNING: TRUST ON FIRST USE" in r.stderr and pinned_key_id in r.stderr
    record = json.loads((Path(client_env["SCALEOT_CLIENT_CACHE"]) / "known_servers.json").read_text())
    assert record[fake.url]["key_id"] == pinned_key_id
    # Afterwards the recorded key is pinned: no flag needed, no warning.
    r = _download(runner, fake)
    assert r.exit_code == 0 and "WARNING" not in r.stderr
    # The server now presents another key: refused even with the flag (like ssh known_hosts).
    fake.state.key = Ed25519PrivateKey.generate()
    r = _download(runner, fake, "--trust-on-first-use")
    assert r.exit_code == ExitCode.VERIFICATION and "recorded on first use" in r.stderr


def test_verify_command_checks_a_local_file(runner, fake, client_env, tmp_path):
    assert _download(runner, fake).exit_code == 0
    r = runner.invoke(app, ["verify", "--emulator-url", fake.emulator_url])
    assert r.exit_code == 0 and r.stdout.startswith("OK"), r.output
    bad = tmp_path / "bad.safetensors"
    data = bytearray(fake.state.emulator_file.read_bytes())
    data[100] ^= 1
    bad.write_bytes(bytes(data))
    r = runner.invoke(app, ["verify", "--emulator-url", fake.emulator_url, "--file", str(bad)])
    assert r.exit_code == ExitCode.VERIFICATION and "sha256" in r.stderr


def test_client_never_unpickles_or_runs_server_code():
    """Static guard: the client reads safetensors + JSON only (no torch.load/pickle/remote code)."""
    import data_owner_client

    pkg = Path(data_owner_client.__file__).parent
    source = "\n".join(p.read_text() for p in pkg.glob("*.py"))
    patterns = (
        r"torch\.load\(",
        r"import pickle|pickle\.loads?\(",
        r"trust_remote_code\s*=\s*True",
        r"(?<![\w.])(eval|exec)\(",
    )
    for forbidden in patterns:
        assert not re.search(forbidden, source), forbidden
