"""Fixtures for the demo / packaging tests: scripts/demo.py loaded as a module, and how to run it."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "scripts" / "demo.py"


def load_demo():
    name = "scaleot_demo_script"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, DEMO)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses need the module registered while it executes
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def demo():
    return load_demo()


def subprocess_env(**extra: str) -> dict[str, str]:
    """The test process's environment without SCALEOT_* settings (each party sets its own)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCALEOT_")}
    env.update(
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
        OMP_NUM_THREADS="1",
        OMP_WAIT_POLICY="PASSIVE",
    )
    env.update(extra)
    return env


def venv_tool(name: str) -> str:
    """A console script of the interpreter running the tests (the project's .venv)."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        pytest.skip(f"{name} is not installed next to {sys.executable}; run `make setup`")
    return str(path)
