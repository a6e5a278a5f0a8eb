"""Streaming download into the sha256-keyed cache: resume after interruption, reuse when cached."""

from __future__ import annotations

from pathlib import Path

from data_owner_client.cli import app
from data_owner_client.errors import ExitCode


def _file_requests(fake) -> list[dict[str, str]]:
    return [h for m, p, h in fake.state.requests if p.endswith("/file")]


def test_interrupted_download_resumes_to_identical_bytes(runner, fake, client_env):
    original = fake.state.emulator_file.read_bytes()
    fake.state.cut_after = len(original) // 2
    r = runner.invoke(app, ["download", "--emulator-url", fake.emulator_url])
    assert r.exit_code == ExitCode.SERVER and "run the command again to resume" in r.stderr, r.output
    parts = list((Path(client_env["SCALEOT_CLIENT_CACHE"]) / "emulators").glob("*.part"))
    assert len(parts) == 1
    kept = parts[0].stat().st_size
    assert 0 < kept < len(original)

    r = runner.invoke(app, ["download", "--emulator-url", fake.emulator_url])
    assert r.exit_code == 0, r.output
    assert Path(r.stdout.strip()).read_bytes() == original
    assert _file_requests(fake)[-1].get("range") == f"bytes={kept}-"  # resumed, not restarted
    assert not parts[0].exists()


def test_cached_verified_file_is_reused(runner, fake, client_env, tmp_path):
    first = runner.invoke(app, ["download", "--emulator-url", fake.emulator_url])
    assert first.exit_code == 0
    n = len(_file_requests(fake))
    second = runner.invoke(app, ["download", "--emulator-url", fake.emulator_url, "--out", str(tmp_path / "e.st")])
    assert second.exit_code == 0, second.output
    assert len(_file_requests(fake)) == n  # no second transfer
    assert (tmp_path / "e.st").read_bytes() == fake.state.emulator_file.read_bytes()


def test_corrupted_cache_entry_is_fetched_again(runner, fake, client_env):
    r = runner.invoke(app, ["download", "--emulator-url", fake.emulator_url])
    cached = Path(r.stdout.strip())
    cached.write_bytes(b"garbage")
    r = runner.invoke(app, ["download", "--emulator-url", fake.emulator_url])
    assert r.exit_code == 0
    assert cached.read_bytes() == fake.state.emulator_file.read_bytes()


def test_waits_while_the_emulator_is_building(runner, fake, client_env, monkeypatch):
    monkeypatch.setenv("SCALEOT_POLL_INTERVAL_S", "0.01")
    fake.state.building_polls = 2
    r = runner.invoke(app, ["download", "--emulator-url", fake.emulator_url])
    assert r.exit_code == 0, r.output
    assert fake.state.building_polls == 0


def test_redirects_are_not_followed(runner, fake, client_env):
    fake.state.redirect_file = "http://elsewhere.invalid/emulator"  # the API key must not travel there
    r = runner.invoke(app, ["download", "--emulator-url", fake.emulator_url])
    assert r.exit_code == ExitCode.SERVER and "redirects are not followed" in r.stderr
