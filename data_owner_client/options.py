"""The command-line options the `dataowner-client` commands share, each defined once.

`connection_options(...)` appends the named shared options (API key, server key, trust on first use, cache,
`--json`, `--progress`) to a command's signature, always in the same order, and hands them to the command as
one `Connection`; so `--help` lists them as before and no command repeats their declarations. A command that
takes `api_key` also gets the options that govern where the key may go (`--api-key-file`, `--insecure`,
`--allow-new-host`).
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import SecretStr, ValidationError

from .errors import BadInputError
from .key_safety import API_KEY_FLAG_WARNING, KeyServers, check_key_server, check_transport, read_key_file
from .settings import ClientSettings
from .transfer import EmulatorRef, ServerClient, parse_emulator_url


class Method(StrEnum):
    full = "full"
    lora = "lora"


EmulatorUrlOpt = Annotated[str, typer.Option("--emulator-url", help="The emulator resource: SERVER/v1/emulators/ID.")]
ApiKeyOpt = Annotated[
    str | None,
    typer.Option(
        "--api-key",
        help="API key; visible in the process list and shell history, so it warns: prefer env SCALEOT_API_KEY "
        "or --api-key-file.",
        show_default=False,
    ),
]
ApiKeyFileOpt = Annotated[
    Path | None,
    typer.Option(
        "--api-key-file",
        help="Read the API key from this file (mode 600; env SCALEOT_API_KEY_FILE).",
        show_default=False,
    ),
]
InsecureOpt = Annotated[
    bool,
    typer.Option(
        "--insecure",
        help="Allow sending the API key over plain http:// to a host that is not loopback (a private, trusted "
        "network only; env SCALEOT_INSECURE=1).",
    ),
]
AllowNewHostOpt = Annotated[
    bool,
    typer.Option(
        "--allow-new-host",
        help="Send the API key to a server it was never used with, without asking (otherwise a terminal prompt, "
        "or a refusal in scripts; env SCALEOT_ALLOW_NEW_HOST=1).",
    ),
]
PubkeyOpt = Annotated[
    str | None,
    typer.Option(
        "--server-pubkey",
        help="Pinned server signing key: base64 Ed25519 public key or its 16-hex key id (env SCALEOT_SERVER_PUBKEY).",
        show_default=False,
    ),
]
TofuOpt = Annotated[
    bool,
    typer.Option(
        "--trust-on-first-use", help="No pinned key: trust and record the key the server presents now (loud warning)."
    ),
]
CacheOpt = Annotated[
    Path | None,
    typer.Option(
        "--cache-dir",
        help="Download cache and trust records (env SCALEOT_CLIENT_CACHE, default ~/.cache/scaleot).",
        show_default=False,
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout (for scripts).")]
ProgressOpt = Annotated[
    bool | None,
    typer.Option(
        "--progress/--no-progress",
        help="Progress bars on stderr (default: when stderr is a terminal).",
        show_default=False,
    ),
]
WaitOpt = Annotated[bool, typer.Option("--wait/--no-wait", help="Wait for the server's plug-in evaluation.")]

# name -> (annotation, default), in the order `--help` lists them
_SHARED: dict[str, tuple[Any, Any]] = {
    "api_key": (ApiKeyOpt, None),
    "api_key_file": (ApiKeyFileOpt, None),
    "insecure": (InsecureOpt, False),
    "allow_new_host": (AllowNewHostOpt, False),
    "server_pubkey": (PubkeyOpt, None),
    "trust_on_first_use": (TofuOpt, False),
    "cache_dir": (CacheOpt, None),
    "as_json": (JsonOpt, False),
    "progress": (ProgressOpt, None),
}

# Every command that sends the API key also takes these (the key's source and where it may go).
_KEY_OPTIONS = {"api_key_file", "insecure", "allow_new_host"}


@dataclass(frozen=True)
class Connection:
    """The shared options as the user gave them (None / False: not given)."""

    api_key: str | None = None
    api_key_file: Path | None = None
    insecure: bool = False
    allow_new_host: bool = False
    server_pubkey: str | None = None
    trust_on_first_use: bool = False
    cache_dir: Path | None = None
    as_json: bool = False
    progress: bool | None = None

    def settings(self, **overrides: Any) -> ClientSettings:
        """Flags over `SCALEOT_*` environment variables over defaults; the API key read from where it was given."""
        try:
            env = ClientSettings()
            settings = env.with_overrides(
                server_pubkey=self.server_pubkey,
                client_cache=self.cache_dir,
                insecure=self.insecure or None,  # a flag can only switch these on
                allow_new_host=self.allow_new_host or None,
                **overrides,
            )
        except ValidationError as exc:
            raise BadInputError(f"invalid SCALEOT_* environment setting: {exc}") from None
        return settings.model_copy(update={"api_key": self._api_key(env), "api_key_file": None})

    def _api_key(self, env: ClientSettings) -> SecretStr | None:
        """--api-key (with a warning) or --api-key-file, else SCALEOT_API_KEY or SCALEOT_API_KEY_FILE."""
        if self.api_key is not None and self.api_key_file is not None:
            raise BadInputError("pass either --api-key or --api-key-file, not both")
        if self.api_key is not None:
            typer.echo(API_KEY_FLAG_WARNING, err=True)
            return SecretStr(self.api_key)
        if self.api_key_file is not None:
            return SecretStr(read_key_file(self.api_key_file))
        if env.api_key is not None and env.api_key_file is not None:
            raise BadInputError("both SCALEOT_API_KEY and SCALEOT_API_KEY_FILE are set: unset one of them")
        if env.api_key_file is not None:
            return SecretStr(read_key_file(env.api_key_file.expanduser()))
        return env.api_key

    @property
    def show_progress(self) -> bool:
        return sys.stderr.isatty() if self.progress is None else self.progress


def server_client(server: str, settings: ClientSettings) -> ServerClient:
    """A client for `server`; with an API key, only after the transport policy and the key's known servers allow
    it (see key_safety.py): nothing has been sent when these refuse."""
    api_key = settings.api_key.get_secret_value() if settings.api_key else None
    if api_key:
        if check_transport(server, insecure=settings.insecure):
            typer.echo(f"warning: sending your API key over plain http to {server} (--insecure)", err=True)
        check_key_server(
            api_key,
            server,
            KeyServers(settings.cache_dir / "key_servers.json"),
            allow_new_host=settings.allow_new_host,
            confirm=_confirm if _interactive() else None,
        )
    return ServerClient(server, api_key, timeout=settings.http_timeout_s, insecure=settings.insecure)


def _interactive() -> bool:
    """A person at a terminal who can answer a question (a script gets a refusal instead of a hanging prompt)."""
    return sys.stdin.isatty() and sys.stderr.isatty()


def _confirm(question: str) -> bool:
    try:
        return typer.confirm(question, default=False, err=True)
    except typer.Abort:  # Ctrl-C or end of input at the prompt: a no
        return False


def connection_options(*names: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Give a command (which takes `conn: Connection`) the named shared options instead of that parameter."""
    unknown = set(names) - set(_SHARED)
    if unknown:
        raise ValueError(f"unknown shared options {sorted(unknown)}")
    wanted = set(names) | (_KEY_OPTIONS if "api_key" in names else set())
    ordered = [n for n in _SHARED if n in wanted]

    def decorate(command: Callable[..., None]) -> Callable[..., None]:
        own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != "conn"]
        shared = [
            inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, annotation=_SHARED[n][0], default=_SHARED[n][1])
            for n in ordered
        ]

        @functools.wraps(command)
        def wrapper(**kwargs: Any) -> None:
            conn = Connection(**{n: kwargs.pop(n) for n in ordered})
            command(**kwargs, conn=conn)

        params = own + shared
        wrapper.__signature__ = inspect.Signature(params, return_annotation=None)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        return wrapper

    return decorate


def emulator_client(conn: Connection, emulator_url: str) -> tuple[ClientSettings, EmulatorRef, ServerClient]:
    """The settings, the parsed `--emulator-url` and a client for its server (use it in a `with`)."""
    settings = conn.settings()
    ref = parse_emulator_url(emulator_url)
    return settings, ref, server_client(ref.server, settings)
