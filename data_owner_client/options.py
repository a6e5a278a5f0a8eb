"""The command-line options the `dataowner-client` commands share, each defined once.

`connection_options(...)` appends the named shared options (API key, server key, trust on first use, cache,
`--json`, `--progress`) to a command's signature, always in the same order, and hands them to the command as
one `Connection`; so `--help` lists them as before and no command repeats their declarations.
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
from pydantic import ValidationError

from .errors import BadInputError
from .settings import ClientSettings
from .transfer import EmulatorRef, ServerClient, parse_emulator_url


class Method(StrEnum):
    full = "full"
    lora = "lora"


EmulatorUrlOpt = Annotated[str, typer.Option("--emulator-url", help="The emulator resource: SERVER/v1/emulators/ID.")]
ApiKeyOpt = Annotated[
    str | None, typer.Option("--api-key", help="API key (prefer env SCALEOT_API_KEY).", show_default=False)
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
    "server_pubkey": (PubkeyOpt, None),
    "trust_on_first_use": (TofuOpt, False),
    "cache_dir": (CacheOpt, None),
    "as_json": (JsonOpt, False),
    "progress": (ProgressOpt, None),
}


@dataclass(frozen=True)
class Connection:
    """The shared options as the user gave them (None / False: not given)."""

    api_key: str | None = None
    server_pubkey: str | None = None
    trust_on_first_use: bool = False
    cache_dir: Path | None = None
    as_json: bool = False
    progress: bool | None = None

    def settings(self, **overrides: Any) -> ClientSettings:
        """Flags over `SCALEOT_*` environment variables over defaults."""
        try:
            return ClientSettings().with_overrides(
                api_key=self.api_key, server_pubkey=self.server_pubkey, client_cache=self.cache_dir, **overrides
            )
        except ValidationError as exc:
            raise BadInputError(f"invalid SCALEOT_* environment setting: {exc}") from None

    @property
    def show_progress(self) -> bool:
        return sys.stderr.isatty() if self.progress is None else self.progress


def server_client(server: str, settings: ClientSettings) -> ServerClient:
    api_key = settings.api_key.get_secret_value() if settings.api_key else None
    return ServerClient(server, api_key, timeout=settings.http_timeout_s)


def connection_options(*names: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Give a command (which takes `conn: Connection`) the named shared options instead of that parameter."""
    unknown = set(names) - set(_SHARED)
    if unknown:
        raise ValueError(f"unknown shared options {sorted(unknown)}")
    ordered = [n for n in _SHARED if n in names]

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
