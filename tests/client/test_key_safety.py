"""Where the API key may go (issue 20, finding 7): plain http only to loopback unless --insecure, never to another
origin (redirects, foreign URLs), to a host the key was never used with only after a warning and a yes, and read
from the environment or a private key file rather than the command line."""

from __future__ import annotations

import json
import os
import stat
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from safetensors.torch import save_file

from data_owner_client import api, options
from data_owner_client.api import ServerClient
from data_owner_client.cli import app
from data_owner_client.errors import BadInputError, ExitCode
from data_owner_client.key_safety import check_transport, is_loopback, key_fingerprint
from tooling.procs import free_port

from .fake_server import API_KEY

REMOTE = "http://models.example.com:8000/v1/emulators/emu_test"


# ---------------------------------------------------------------- helpers


class _Seen:
    """What a stand-in network saw: (url, Authorization header or None) per request."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str | None]] = []

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.requests.append((str(request.url), request.headers.get("authorization")))
        return httpx.Response(404, json={"error": {"code": "not_found", "message": "stand-in network"}})


@pytest.fixture
def network(monkeypatch: pytest.MonkeyPatch) -> _Seen:
    """Every httpx.Client the client makes talks to a stand-in for the internet: remote hosts without DNS."""
    seen = _Seen()
    real = httpx.Client

    class Client(real):  # type: ignore[misc, valid-type]
        def __init__(self, **kwargs: object) -> None:
            kwargs["transport"] = httpx.MockTransport(seen.handler)
            super().__init__(**kwargs)  # type: ignore[arg-type]

    class Retrying(api.RetryingClient):  # the server client's own subclass of the real httpx.Client
        def __init__(self, **kwargs: Any) -> None:
            kwargs["transport"] = httpx.MockTransport(seen.handler)
            super().__init__(**kwargs)

    monkeypatch.setattr(httpx, "Client", Client)
    monkeypatch.setattr(api, "RetryingClient", Retrying)
    return seen


class _Catcher(BaseHTTPRequestHandler):
    seen: list[tuple[str, str | None]]

    def do_GET(self) -> None:  # http.server calls it by this name
        self.seen.append((self.path, self.headers.get("Authorization")))
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def other_host() -> Iterator[tuple[str, list[tuple[str, str | None]]]]:
    """A second HTTP server on another loopback address (127.0.0.2; 127.0.0.1 on systems without it): the base
    URL, and the (path, Authorization) of each request it received."""
    seen: list[tuple[str, str | None]] = []
    handler = type("Catcher", (_Catcher,), {"seen": seen})
    try:
        httpd = ThreadingHTTPServer(("127.0.0.2", 0), handler)
    except OSError:
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    host, port = httpd.server_address[:2]
    try:
        yield f"http://{host!s}:{port}", seen
    finally:
        httpd.shutdown()
        httpd.server_close()


def _download(runner, url: str, *args: str, **kw):
    return runner.invoke(app, ["download", "--emulator-url", url, *args], **kw)


# ---------------------------------------------------------------- transport: https, or plain http to loopback only


@pytest.mark.parametrize("command", ["download", "verify", "upload", "tune", "status"])
def test_plain_http_to_a_remote_host_is_refused_before_the_key_is_sent(
    runner, network, client_env, train_file, tmp_path, command
):
    args = {
        "download": ["download", "--emulator-url", REMOTE],
        "verify": ["verify", "--emulator-url", REMOTE],
        "upload": ["upload", "--emulator-url", REMOTE, "--adapter", str(train_file)],
        "tune": ["tune", "--emulator-url", REMOTE, "--data", str(train_file), "--out", str(tmp_path / "a")],
        "status": ["status", "http://models.example.com:8000/v1/adapters/adp_1"],
    }[command]
    if command == "upload":  # a well-formed file: the refusal must come from the transport policy
        save_file({"w": torch.zeros(1)}, str(tmp_path / "adapter_layers.safetensors"))
        args[-1] = str(tmp_path / "adapter_layers.safetensors")
    r = runner.invoke(app, args)
    assert r.exit_code == ExitCode.BAD_INPUT, r.output
    assert "refusing to send your API key over plain http://" in r.stderr
    assert "--insecure" in r.stderr and "SCALEOT_INSECURE=1" in r.stderr and "https://" in r.stderr
    assert network.requests == []  # nothing left this machine


@pytest.mark.parametrize("how", ["flag", "env"])
def test_insecure_lets_the_key_travel_over_plain_http_with_a_warning(runner, network, client_env, monkeypatch, how):
    if how == "env":
        monkeypatch.setenv("SCALEOT_INSECURE", "1")
    r = _download(runner, REMOTE, *(["--insecure"] if how == "flag" else []))
    assert r.exit_code == ExitCode.SERVER, r.output  # the stand-in network answers 404
    assert "warning: sending your API key over plain http" in r.stderr
    assert network.requests == [("http://models.example.com:8000/v1/emulators/emu_test", f"Bearer {API_KEY}")]


def test_https_carries_the_key_without_a_flag(runner, network, client_env):
    r = _download(runner, REMOTE.replace("http://", "https://"))
    assert r.exit_code == ExitCode.SERVER and "plain http" not in r.stderr, r.output
    assert network.requests == [("https://models.example.com:8000/v1/emulators/emu_test", f"Bearer {API_KEY}")]


@pytest.mark.parametrize(
    ("server", "allowed"),
    [
        ("http://127.0.0.1:8000", True),
        ("http://127.8.9.10", True),
        ("http://localhost:8000", True),
        ("http://LOCALHOST.", True),
        ("http://[::1]:8000", True),
        ("https://models.example.com", True),
        ("http://models.example.com", False),
        ("http://192.0.2.7:8000", False),
        ("http://localhost.example.com", False),
        ("http://[::ffff:10.0.0.1]", False),
    ],
)
def test_transport_policy(server, allowed):
    assert is_loopback(server.split("//")[1].split(":8000")[0]) == (allowed and server.startswith("http://"))
    if allowed:
        assert check_transport(server, insecure=False) is False
        ServerClient(server, "k").close()
    else:
        with pytest.raises(BadInputError, match="--insecure"):
            ServerClient(server, "k")
        assert check_transport(server, insecure=True) is True  # allowed, and the caller is told to warn
    ServerClient(server, None).close()  # without a key nothing secret travels: no policy


# ---------------------------------------------------------------- the key goes to the server's origin only


def test_the_key_is_never_sent_to_another_origin(fake, other_host):
    base, seen = other_host
    with ServerClient(fake.url, API_KEY) as client:
        assert client.http.get(f"{base}/anything").status_code == 200
        assert client.http.get(fake.emulator_url).status_code == 200
    assert seen == [("/anything", None)]
    assert fake.state.requests[-1][2].get("authorization") == f"Bearer {API_KEY}"


def test_a_redirect_to_another_host_never_carries_the_key(runner, fake, client_env, other_host):
    base, seen = other_host
    fake.state.redirect_file = f"{base}/emulator"
    r = _download(runner, fake.emulator_url)
    assert r.exit_code == ExitCode.SERVER and "redirects are not followed" in r.stderr, r.output
    assert seen == []
    # Even a caller that turns redirects on does not hand the key over: httpx drops it across origins.
    with ServerClient(fake.url, API_KEY) as client:
        client.http.follow_redirects = True
        assert client.http.get(f"{fake.emulator_url}/file").status_code == 200
    assert seen == [("/emulator", None)]


# ---------------------------------------------------------------- the hosts each key was used with


def _record(tmp_path: Path) -> Path:
    return tmp_path / "cache" / "key_servers.json"


def _request_count(fake) -> int:
    return len(fake.state.requests)


@pytest.mark.parametrize("consent", ["flag", "env", "terminal"])
def test_a_key_goes_to_a_host_it_was_never_used_with_only_after_a_warning_and_a_yes(
    runner, fake, client_env, tmp_path, monkeypatch, consent
):
    assert _download(runner, fake.emulator_url).exit_code == 0  # first use: recorded, no question
    record = _record(tmp_path)
    assert stat.S_IMODE(record.stat().st_mode) == 0o600
    text = record.read_text()
    assert API_KEY not in text and key_fingerprint(API_KEY) in text and '"127.0.0.1"' in text

    other_name = fake.emulator_url.replace("127.0.0.1", "localhost")  # the same fake, under another host name
    before = _request_count(fake)
    r = _download(runner, other_name)
    assert r.exit_code == ExitCode.VERIFICATION, r.output
    assert "WARNING: your API key is about to be sent to a server it was never used with" in r.stderr
    assert "this server:    localhost" in r.stderr and "last used with: 127.0.0.1" in r.stderr
    assert "--allow-new-host" in r.stderr and "SCALEOT_ALLOW_NEW_HOST=1" in r.stderr
    assert _request_count(fake) == before  # refused before anything was sent

    kw: dict = {}
    args: list[str] = []
    if consent == "flag":
        args = ["--allow-new-host"]
    elif consent == "env":
        monkeypatch.setenv("SCALEOT_ALLOW_NEW_HOST", "1")
    else:
        monkeypatch.setattr(options, "_interactive", lambda: True)
        r = _download(runner, other_name, input="n\n")
        assert r.exit_code == ExitCode.VERIFICATION and "declined" in r.stderr, r.output
        assert _request_count(fake) == before
        kw = {"input": "y\n"}
    r = _download(runner, other_name, *args, **kw)
    assert r.exit_code == 0 and "WARNING" in r.stderr, r.output
    assert _request_count(fake) > before
    monkeypatch.delenv("SCALEOT_ALLOW_NEW_HOST", raising=False)
    monkeypatch.setattr(options, "_interactive", lambda: False)
    for url in (other_name, fake.emulator_url):  # both hosts are known now: no warning, no question
        r = _download(runner, url)
        assert r.exit_code == 0 and "WARNING" not in r.stderr, r.output
    entry = json.loads(record.read_text())[key_fingerprint(API_KEY)]
    assert set(entry["servers"]) == {"127.0.0.1", "localhost"} and entry["last_server"] == "127.0.0.1"
    assert stat.S_IMODE(record.stat().st_mode) == 0o600


def test_another_key_or_another_port_of_the_same_host_is_not_a_new_host(runner, fake, client_env, tmp_path):
    assert _download(runner, fake.emulator_url).exit_code == 0
    # A different key has its own record: its first use is not a change of host.
    r = runner.invoke(
        app, ["status", "job_x", "--server", fake.url.replace("127.0.0.1", "localhost")], env={"SCALEOT_API_KEY": "k2"}
    )
    assert "WARNING" not in r.stderr and r.exit_code == ExitCode.SERVER, r.output  # 401 from the fake
    # Another port on the same host: the same machine, no question (the connection fails: nothing listens).
    r = _download(runner, f"http://127.0.0.1:{free_port()}/v1/emulators/emu_test")
    assert "WARNING" not in r.stderr and "cannot GET" in r.stderr, r.output


# ---------------------------------------------------------------- where the key is read from


@pytest.mark.parametrize("how", ["flag", "env"])
def test_api_key_file_is_read_and_must_not_be_readable_by_others(runner, fake, client_env, tmp_path, monkeypatch, how):
    monkeypatch.delenv("SCALEOT_API_KEY")
    key_file = tmp_path / "api_key"
    key_file.write_text(f"{API_KEY}\n")
    os.chmod(key_file, 0o644)
    args = ["--api-key-file", str(key_file)] if how == "flag" else []
    if how == "env":
        monkeypatch.setenv("SCALEOT_API_KEY_FILE", str(key_file))
    r = _download(runner, fake.emulator_url, *args)
    assert r.exit_code == ExitCode.BAD_INPUT, r.output
    assert f"chmod 600 {key_file}" in r.stderr and "0644" in r.stderr
    assert fake.state.requests == []
    os.chmod(key_file, 0o600)
    r = _download(runner, fake.emulator_url, *args)
    assert r.exit_code == 0, r.output
    assert {h.get("authorization") for _, _, h in fake.state.requests} == {f"Bearer {API_KEY}"}
    assert "process list" not in r.stderr


def test_api_key_on_the_command_line_still_works_but_warns(runner, fake, client_env, monkeypatch):
    monkeypatch.delenv("SCALEOT_API_KEY")
    r = _download(runner, fake.emulator_url, "--api-key", API_KEY)
    assert r.exit_code == 0, r.output
    assert "process list" in r.stderr and "shell history" in r.stderr and "--api-key-file" in r.stderr
    assert fake.state.requests[-1][2].get("authorization") == f"Bearer {API_KEY}"
    r = _download(runner, fake.emulator_url)  # the environment: no warning
    assert r.exit_code == ExitCode.SERVER and "process list" not in r.stderr


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("both_flags", "either --api-key or --api-key-file"),
        ("both_env", "unset one of them"),
        ("empty_file", "expected the API key alone"),
        ("missing_file", "cannot read the API key file"),
    ],
)
def test_ambiguous_or_broken_key_sources_are_refused(runner, fake, client_env, tmp_path, monkeypatch, setup, message):
    key_file = tmp_path / "api_key"
    key_file.write_text("" if setup == "empty_file" else API_KEY)
    os.chmod(key_file, 0o600)
    args = {
        "both_flags": ["--api-key", API_KEY, "--api-key-file", str(key_file)],
        "empty_file": ["--api-key-file", str(key_file)],
        "missing_file": ["--api-key-file", str(tmp_path / "nope")],
        "both_env": [],
    }[setup]
    if setup == "both_env":
        monkeypatch.setenv("SCALEOT_API_KEY_FILE", str(key_file))
    r = _download(runner, fake.emulator_url, *args)
    assert r.exit_code == ExitCode.BAD_INPUT and message in r.stderr, r.output
    assert fake.state.requests == []


@pytest.mark.parametrize("command", ["tune", "download", "verify", "upload", "status"])
def test_help_names_the_key_options(runner, command):
    r = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200", "TERMINAL_WIDTH": None})
    text = " ".join(r.output.split())
    for option in ("--api-key-file", "--insecure", "--allow-new-host", "SCALEOT_INSECURE=1", "process list"):
        assert option in text, (command, option)
