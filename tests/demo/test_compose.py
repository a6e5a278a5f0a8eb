"""docker-compose.yml, checked by a real Compose implementation (`config`: parse, interpolate, validate;
nothing is built or run, no Docker engine needed), plus the Dockerfiles' packaging rules.

Compose is found as the Docker CLI plugin (`docker compose`) or a standalone `docker-compose` (Debian's
`apt-get install docker-compose`, or the v2 binary). Without any, the compose tests skip and say so.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from .conftest import ROOT

COMPOSE_FILE = ROOT / "docker-compose.yml"
LONG_RUNNING = ("postgres", "redis", "server", "worker")
SERVER_SIDE = ("server", "worker", "model-owner", "worker-gpu")
CLIENT_SIDE = ("client", "client-gpu")


def _compose_cmd() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True, check=False).returncode == 0:
        return [docker, "compose"]
    standalone = shutil.which("docker-compose")
    if standalone and subprocess.run([standalone, "version"], capture_output=True, check=False).returncode == 0:
        return [standalone]
    return None


@pytest.fixture(scope="module")
def compose() -> list[str]:
    cmd = _compose_cmd()
    if cmd is None:
        pytest.skip("no Compose implementation found (neither `docker compose` nor `docker-compose`); "
                    "install one, e.g. `apt-get install docker-compose`")
    return cmd


@pytest.fixture(scope="module")
def env_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("compose")
    (d / "signing_key.pem").write_text("-----BEGIN PRIVATE KEY-----\nnot a real key\n-----END PRIVATE KEY-----\n")
    return d


def _run(compose: list[str], env_dir: Path, settings: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    env_file = env_dir / f"env-{len(settings)}-{abs(hash(tuple(sorted(settings.items()))))}"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in settings.items()))
    # Our own environment must not supply the required settings: only the env file does.
    env = {k: v for k, v in os.environ.items()
           if k not in ("POSTGRES_PASSWORD", "SIGNING_KEY_FILE", "DEMO_ARGS", "SCALEOT_PORT")
           and not k.startswith("COMPOSE_")}
    return subprocess.run([*compose, "-f", str(COMPOSE_FILE), "--project-directory", str(ROOT),
                           "--env-file", str(env_file), *args], cwd=env_dir, env=env, capture_output=True,
                          text=True, timeout=120, check=False)


def _settings(env_dir: Path) -> dict[str, str]:
    return {"POSTGRES_PASSWORD": "s3cret-test-pw", "SIGNING_KEY_FILE": str(env_dir / "signing_key.pem")}


@pytest.fixture(scope="module")
def config(compose, env_dir) -> dict:
    proc = _run(compose, env_dir, _settings(env_dir), "--profile", "gpu", "config")
    assert proc.returncode == 0, proc.stderr
    return yaml.safe_load(proc.stdout)


def readme_services() -> list[str]:
    """Service names from the README's docker-compose table (rows that start with | `name` |)."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("<!-- compose-services -->"):text.index("<!-- /compose-services -->")]
    return re.findall(r"^\|\s*`([a-z0-9-]+)`\s*\|", section, flags=re.MULTILINE)


def test_compose_file_is_valid_and_has_every_readme_service(config):
    services = set(config["services"])
    named = readme_services()
    assert len(named) >= 6
    missing = [s for s in named if s not in services]
    assert not missing, f"README names services that docker-compose.yml lacks: {missing}"
    assert set(LONG_RUNNING + SERVER_SIDE + CLIENT_SIDE) <= services


def test_required_secrets_fail_fast(compose, env_dir):
    full = _settings(env_dir)
    for missing in ("POSTGRES_PASSWORD", "SIGNING_KEY_FILE"):
        settings = {k: v for k, v in full.items() if k != missing}
        proc = _run(compose, env_dir, settings, "config", "-q")
        assert proc.returncode != 0, f"compose accepted a config without {missing}"
        assert missing in proc.stderr + proc.stdout


def test_services_wiring(config):
    svc = config["services"]
    for name in LONG_RUNNING:
        assert svc[name].get("healthcheck", {}).get("test"), f"{name} has no health check"
    # the server side: database, queue, artifacts volume, signing key as a secret (never in the image)
    for name in SERVER_SIDE:
        env = svc[name]["environment"]
        assert env["SCALEOT_DATABASE_URL"].startswith("postgresql+psycopg://scaleot:s3cret-test-pw@postgres:5432/")
        assert env["SCALEOT_QUEUE_URL"] == "redis://redis:6379/0"
        assert env["SCALEOT_SIGNING_KEY"].startswith("/run/secrets/")
        assert any(_volume_source(v) == "artifacts" for v in svc[name]["volumes"])
        assert _secret_names(svc[name]) == {"scaleot_signing_key"}
    assert svc["server"]["environment"]["SCALEOT_EMBEDDED_WORKER"] in ("false", False)
    assert "worker" in svc["worker"]["command"]
    assert any(_volume_source(v) == "pgdata" for v in svc["postgres"]["volumes"])
    # the data owner shares no volume, database or secret with the server: only the network + invitation
    for name in CLIENT_SIDE:
        env = svc[name].get("environment") or {}
        assert not any(k in env for k in ("SCALEOT_DATABASE_URL", "SCALEOT_DATA_DIR", "SCALEOT_SIGNING_KEY"))
        assert not _secret_names(svc[name])
        sources = {_volume_source(v) for v in svc[name]["volumes"]}
        assert "artifacts" not in sources and "pgdata" not in sources
        assert "Dockerfile.client" in str(svc[name]["build"])
        entry = " ".join(svc[name]["entrypoint"])
        assert "--role data-owner" in entry
    assert "--server-url http://server:8000" in " ".join(svc["model-owner"]["entrypoint"])
    # published only on loopback
    for port in svc["server"].get("ports", []):
        assert "127.0.0.1" in str(port)
    # GPU variants: profile + device reservation + CUDA torch build
    for name in ("worker-gpu", "client-gpu"):
        assert svc[name].get("profiles") == ["gpu"]
        devices = svc[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
        assert "cu" in svc[name]["build"]["args"]["TORCH_INDEX_URL"]
    for name in ("server", "worker", "model-owner", "client"):
        assert not svc[name].get("profiles")
        assert "deploy" not in svc[name]


def _volume_source(v) -> str:
    return v.get("source", "") if isinstance(v, dict) else str(v).split(":")[0]


def _secret_names(service: dict) -> set[str]:
    return {s["source"] if isinstance(s, dict) else s for s in service.get("secrets") or []}


# ---------------------------------------------------------------- Dockerfiles (static rules, no engine)


@pytest.mark.parametrize("name", ["Dockerfile.server", "Dockerfile.client"])
def test_dockerfile_rules(name):
    text = (ROOT / name).read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    # CPU torch by default, installed before anything else
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in lines
    torch_at = next(i for i, ln in enumerate(lines) if "pip install" in ln and "torch==" in ln)
    # dependencies (from pyproject.toml alone) before the source, for the layer cache
    pyproject_at = next(i for i, ln in enumerate(lines) if ln.startswith("COPY pyproject.toml"))
    source_at = next(i for i, ln in enumerate(lines) if ln.startswith("COPY shared"))
    assert torch_at < pyproject_at < source_at
    # a non-root user at the end
    users = [ln for ln in lines if ln.startswith("USER ")]
    assert users and users[-1].split()[1] not in ("root", "0")
    # no key or password in the image
    for bad in ("POSTGRES_PASSWORD", "SCALEOT_API_KEY=", "PRIVATE KEY", ".pem", "SCALEOT_SIGNING_KEY="):
        assert bad not in text, f"{name} must not bake {bad!r} into the image"


def test_dockerignore_keeps_secrets_and_envs_out():
    patterns = {ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")}
    assert {".env", "*.pem", ".venv", ".git", "demo-run", "data"} <= patterns
