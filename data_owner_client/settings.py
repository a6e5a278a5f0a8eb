"""The client's one settings object: flags override environment variables override defaults."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class ClientSettings(BaseSettings):
    """`SCALEOT_API_KEY`, `SCALEOT_SERVER_PUBKEY`, `SCALEOT_CLIENT_CACHE`, ... (prefix SCALEOT_)."""

    model_config = SettingsConfigDict(env_prefix="SCALEOT_", extra="ignore")

    api_key: SecretStr | None = None
    # A file holding the API key alone (mode 0600); kept off the command line and out of the environment.
    api_key_file: Path | None = None
    # Send the API key over plain http to a host that is not loopback (a private, trusted network only).
    insecure: bool = False
    # Send the API key to a server it was never used with, without asking (see key_safety.py).
    allow_new_host: bool = False
    # The server's Ed25519 public key (base64) or its 16-hex-char key id, from GET /v1/signing-keys.
    server_pubkey: str | None = None
    # Downloads (keyed by sha256), trust-on-first-use records. Env: SCALEOT_CLIENT_CACHE.
    client_cache: Path = Path("~/.cache/scaleot")
    # Used by `status` when given a bare adapter/job id instead of a URL.
    server_url: str | None = None
    http_timeout_s: float = 60.0
    poll_interval_s: float = 1.0
    wait_timeout_s: float = 3600.0

    @property
    def cache_dir(self) -> Path:
        return self.client_cache.expanduser()

    def with_overrides(self, **overrides: Any) -> ClientSettings:
        """A copy with the flags the user actually passed (None = not given, keep env/default)."""
        given = {k: v for k, v in overrides.items() if v is not None}
        if isinstance(given.get("api_key"), str):
            given["api_key"] = SecretStr(given["api_key"])
        return self.model_copy(update=given)
