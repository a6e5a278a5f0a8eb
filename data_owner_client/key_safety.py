"""Where the API key may go: the transport policy, the key's known servers, and where the key is read from.

The API key is the data owner's whole identity at the model owner, so the client sends it only
- over https, or over plain http to a loopback address (`--insecure` / `SCALEOT_INSECURE=1` opts out, for a
  private network such as a compose network);
- to a server this key was used with before, or, for a server it was never used with, after a loud warning and
  the user's yes (a terminal prompt, or `--allow-new-host` / `SCALEOT_ALLOW_NEW_HOST=1` for scripts). The
  record is `$SCALEOT_CLIENT_CACHE/key_servers.json` (mode 0600), keyed by a fingerprint of the key, never the
  key; like `known_servers.json` (trust on first use of the server's signing key), the first server a key is
  used with is recorded without a question;
- and it is read from `SCALEOT_API_KEY`, a key file (`--api-key-file` / `SCALEOT_API_KEY_FILE`, refused when
  group or others may read it) or, with a warning, `--api-key` (visible in the process list and shell history).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import stat
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .errors import BadInputError, TrustError

INSECURE_HINT = "--insecure (env SCALEOT_INSECURE=1)"
ALLOW_NEW_HOST_HINT = "--allow-new-host (env SCALEOT_ALLOW_NEW_HOST=1)"
API_KEY_FLAG_WARNING = (
    "warning: --api-key puts your API key in the process list (visible to other users of this machine) and in "
    "your shell history; prefer SCALEOT_API_KEY or --api-key-file FILE (chmod 600)"
)


# ---------------------------------------------------------------- transport


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and `localhost`: traffic that never leaves this machine."""
    host = host.strip("[]").lower().rstrip(".")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_transport(server: str, *, insecure: bool) -> bool:
    """Refuse to send the key over plain http to a host that is not loopback, unless the user opted out.

    Returns True when the key will travel in the clear because of `insecure` (the caller warns)."""
    parts = urlsplit(server)
    if parts.scheme == "https" or (parts.scheme == "http" and is_loopback(parts.hostname or "")):
        return False
    if insecure:
        return True
    raise BadInputError(
        f"refusing to send your API key over plain {parts.scheme}:// to {parts.netloc or server!r}, which is not "
        "a loopback address: anyone on the network path could read the key and act as your organization. "
        f"Use the server's https:// URL; only if the network between you and the server is private and trusted "
        f"(e.g. a docker compose network), pass {INSECURE_HINT}"
    )


def server_host(server: str) -> str:
    """The host name a key is pinned to (lowercase; the port is left out: another port of the same host is the
    same machine, and the scheme is the transport policy's business)."""
    return (urlsplit(server).hostname or "").lower().rstrip(".")


def server_origin(server: str) -> str:
    """scheme://host:port with the default port made explicit: where the Authorization header may go."""
    parts = urlsplit(server)
    host = (parts.hostname or "").lower().rstrip(".")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    shown = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{shown}:{port}"


# ---------------------------------------------------------------- the servers each key was used with


def key_fingerprint(api_key: str) -> str:
    """A domain-separated hash of the key: names it in the record without being usable as it."""
    return hashlib.sha256(b"scaleot-client-key-servers\0" + api_key.encode()).hexdigest()[:32]


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class KeyServers:
    """`{fingerprint: {"last_server": host, "servers": {host: {"first_used", "last_used"}}}}` in one JSON file
    (written atomically with mode 0600, like `trust.KnownServers`' known_servers.json)."""

    def __init__(self, path: Path):
        self.path = path

    def _load(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise BadInputError(
                f"{self.path}: unreadable record of the API key's servers ({exc}); fix or delete it"
            ) from None
        return data if isinstance(data, dict) else {}

    def servers(self, fingerprint: str) -> tuple[str | None, set[str]]:
        """(the server the key was last used with, every server it was used with)."""
        entry = self._load().get(fingerprint)
        if not isinstance(entry, dict):
            return None, set()
        servers = entry.get("servers")
        return entry.get("last_server"), set(servers) if isinstance(servers, dict) else set()

    def record(self, fingerprint: str, host: str) -> None:
        data = self._load()
        entry = data.get(fingerprint)
        servers: dict[str, Any] = {}
        if isinstance(entry, dict) and isinstance(entry.get("servers"), dict):
            servers = entry["servers"]
        now = _now()
        prev = servers.get(host)
        servers[host] = {"first_used": prev.get("first_used", now) if isinstance(prev, dict) else now, "last_used": now}
        data[fingerprint] = {"last_server": host, "servers": servers}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        try:
            with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
                if hasattr(os, "fchmod"):  # a leftover tmp keeps its old bits through O_TRUNC
                    os.fchmod(f.fileno(), 0o600)
                f.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, self.path)


def new_server_warning(fingerprint: str, last: str | None, host: str, record_path: Path) -> str:
    bar = "!" * 78
    return (
        f"\n{bar}\n!! WARNING: your API key is about to be sent to a server it was never used with\n"
        f"!!   this server:    {host}\n!!   last used with: {last}\n!!   key fingerprint: {fingerprint}\n"
        "!! Whoever runs this server receives your key and can act as your organization. If the URL did not\n"
        "!! come from the model owner (a moved server, a new name), stop and ask them.\n"
        f"!! Record: {record_path}\n{bar}\n"
    )


def check_key_server(
    api_key: str,
    server: str,
    known: KeyServers,
    *,
    allow_new_host: bool,
    confirm: Callable[[str], bool] | None,
    warn: Callable[[str], None] = lambda m: print(m, file=sys.stderr),
) -> None:
    """Record which server this key goes to; a server the key was never used with needs the user's yes first.

    `confirm` asks a person (None: nobody to ask, e.g. a script); `allow_new_host` is the yes given in advance.
    Refusing raises TrustError before the key has been sent anywhere.
    """
    fingerprint = key_fingerprint(api_key)
    host = server_host(server)
    last, servers = known.servers(fingerprint)
    if servers and host not in servers:
        warn(new_server_warning(fingerprint, last, host, known.path))
        if not allow_new_host:
            if confirm is None:
                raise TrustError(
                    f"not sending your API key to {host}: this key was last used with {last}. If the model owner "
                    f"moved the server or gave you this URL, rerun with {ALLOW_NEW_HOST_HINT}"
                )
            if not confirm(f"Send your API key to {host}?"):
                raise TrustError(f"not sending your API key to {host} (declined)")
    known.record(fingerprint, host)


# ---------------------------------------------------------------- where the key is read from


def read_key_file(path: Path) -> str:
    """The key in `path` (surrounding whitespace stripped); refused when group or others may access the file."""
    try:
        st = path.stat()
        if os.name == "posix" and stat.S_IMODE(st.st_mode) & 0o077:
            raise BadInputError(
                f"{path}: the API key file is accessible to group or others (mode "
                f"{stat.S_IMODE(st.st_mode):04o}); run `chmod 600 {path}` and retry"
            )
        key = path.read_text(encoding="utf-8").strip()
    except BadInputError:
        raise
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInputError(f"cannot read the API key file {path}: {exc}") from None
    if not key or any(c.isspace() for c in key):
        raise BadInputError(f"{path}: expected the API key alone on one line (the file is empty or has several words)")
    return key
