"""shared/signing.py unit tests, and signing-key rotation / revocation through the server."""

from __future__ import annotations

import copy
import os
import stat

import pytest
from fastapi.testclient import TestClient
from server_helpers import auth, fast_settings

from model_owner_server import crud
from model_owner_server.main import create_app
from model_owner_server.models import EmulatorRow, ImportanceRun, RegisteredModel
from shared import signing


@pytest.fixture
def key(tmp_path):
    return signing.load_or_create_private_key(tmp_path / "keys" / "k.pem")


def _manifest(kid: str) -> dict:
    return signing.emulator_manifest(
        emulator_id="emu_1",
        model_id="mdl_1",
        sha256="ab" * 32,
        size_bytes=123,
        layer_plan={"roles": ["adapter", "frozen"], "alpha": 0.5},
        key_id=kid,
    )


def test_key_file_is_private_and_stable(tmp_path, key):
    path = tmp_path / "keys" / "k.pem"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    again = signing.load_or_create_private_key(path)
    assert signing.key_id(again.public_key()) == signing.key_id(key.public_key())
    kid = signing.key_id(key.public_key())
    assert len(kid) == 16 and int(kid, 16) >= 0


def test_sign_verify_and_every_refusal(key):
    pub, kid = key.public_key(), signing.key_id(key.public_key())
    signed = signing.sign_manifest(key, _manifest(kid))
    assert signed["key_id"] == kid and signing.verify_signed_manifest(signed, {kid: pub}) == signed["manifest"]
    assert signing.canonical_bytes({"b": 1, "a": "é"}) == '{"a":"é","b":1}'.encode()

    def refused(mutate, match):
        bad = copy.deepcopy(signed)
        mutate(bad)
        with pytest.raises(signing.SignatureError, match=match):
            signing.verify_signed_manifest(bad, {kid: pub})

    refused(lambda s: s["manifest"].update(size_bytes=124), "does not match")
    refused(lambda s: s.update(signature=s["signature"][:-4] + "AAA="), "does not match")
    refused(lambda s: s.update(signature="%%%"), "base64")
    refused(lambda s: s.update(key_id="0" * 16), "says key")
    refused(lambda s: (s.update(key_id="0" * 16), s["manifest"].update(key_id="0" * 16)), "not trusted")
    refused(lambda s: s.pop("manifest"), "malformed")
    with pytest.raises(signing.SignatureError):
        signing.verify_signed_manifest(["not", "a", "dict"], {kid: pub})  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        signing.sign_manifest(key, {**_manifest(kid), "key_id": "someone-else"})


def test_verify_file(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"x" * 5000)
    sha, size = signing.sha256_file(path)
    signing.verify_file(path, {"sha256": sha, "size_bytes": size})
    with pytest.raises(signing.IntegrityError, match="size"):
        signing.verify_file(path, {"sha256": sha, "size_bytes": size + 1})
    path.write_bytes(b"y" + b"x" * 4999)
    with pytest.raises(signing.IntegrityError, match="sha256"):
        signing.verify_file(path, {"sha256": sha, "size_bytes": size})
    with pytest.raises(signing.IntegrityError):
        signing.verify_file(path, {})
    assert issubclass(signing.IntegrityError, signing.VerificationError)
    assert issubclass(signing.SignatureError, signing.VerificationError)


def test_pinning_and_listing(key):
    b64, kid = signing.public_key_to_b64(key.public_key()), signing.key_id(key.public_key())
    assert signing.parse_pinned_key(kid) == (kid, None)
    assert signing.parse_pinned_key(kid.upper())[0] == kid
    pinned_id, pinned_key = signing.parse_pinned_key(b64)
    assert pinned_id == kid and signing.public_key_to_b64(pinned_key) == b64
    for garbage in ("", "nothex!!", "QUJD"):
        with pytest.raises(signing.SignatureError):
            signing.parse_pinned_key(garbage)
    other = signing.Ed25519PrivateKey.generate().public_key()
    listing = {
        "keys": [
            {"key_id": kid, "algorithm": "Ed25519", "public_key": b64, "status": "retired"},
            {
                "key_id": signing.key_id(other),
                "algorithm": "Ed25519",
                "public_key": signing.public_key_to_b64(other),
                "status": "revoked",
            },
            {
                "key_id": "ffffffffffffffff",
                "algorithm": "Ed25519",
                "public_key": signing.public_key_to_b64(other),
                "status": "active",
            },  # lies about its id: filed under the computed id instead
        ]
    }
    trusted = signing.trusted_keys_from_listing(listing)
    assert kid in trusted and "ffffffffffffffff" not in trusted
    assert set(signing.trusted_keys_from_listing(listing, [kid])) == {kid}
    assert signing.trusted_keys_from_listing(listing, [signing.key_id(other)]) == {}  # revoked stays out


def test_key_rotation_and_revocation_through_the_server(tmp_path, new_database_url):
    """Rotate: a new key file -> new active key, old one retired but still verifying old manifests.
    Revoke: the old key disappears from the trusted set and its manifest is re-signed on request."""
    db_url = new_database_url()
    first = fast_settings(tmp_path / "data", db_url, signing_key=tmp_path / "k1.pem")
    with TestClient(create_app(first)) as c1:
        with c1.app.state.sessions() as s:
            _, key = crud.create_org(s, "ops", "admin")
            model = RegisteredModel(name="m", path="/nowhere")
            s.add(model)
            s.flush()
            run = ImportanceRun(model_id=model.id, status="succeeded", steps=1)
            s.add(run)
            s.flush()
            emu = EmulatorRow(
                model_id=model.id,
                importance_run_id=run.id,
                n_adapter=1,
                alpha=0.5,
                beta=0.0,
                status="ready",
                sha256="cd" * 32,
                size_bytes=10,
                plan={"roles": ["adapter"]},
            )
            s.add(emu)
            s.commit()
        old_signed = c1.get(f"/v1/emulators/{emu.id}/signature", headers=auth(key)).json()
    old_kid = old_signed["key_id"]

    second = fast_settings(tmp_path / "data", db_url, signing_key=tmp_path / "k2.pem")
    with TestClient(create_app(second)) as c2:
        h = auth(key)
        listing = c2.get("/v1/signing-keys", headers=h).json()
        status = {k["key_id"]: k["status"] for k in listing["keys"]}
        new_kid = next(k for k, v in status.items() if v == "active")
        assert status[old_kid] == "retired" and new_kid != old_kid
        # The old manifest is served unchanged and verifies through its (retired) key id.
        assert c2.get(f"/v1/emulators/{emu.id}/signature", headers=h).json() == old_signed
        signing.verify_signed_manifest(old_signed, signing.trusted_keys_from_listing(listing))

        with c2.app.state.sessions() as s:
            c2.app.state.keyring.revoke(s, old_kid)
            s.commit()
        listing = c2.get("/v1/signing-keys", headers=h).json()
        with pytest.raises(signing.SignatureError, match="not trusted"):
            signing.verify_signed_manifest(old_signed, signing.trusted_keys_from_listing(listing))
        fresh = c2.get(f"/v1/emulators/{emu.id}/signature", headers=h).json()
        assert fresh["key_id"] == new_kid
        manifest = signing.verify_signed_manifest(fresh, signing.trusted_keys_from_listing(listing, [new_kid]))
        assert manifest["sha256"] == "cd" * 32
