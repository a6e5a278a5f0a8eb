"""`modelowner-server` with pause points, so a fault run can kill -9 it at a chosen moment.

    python -m reliability.fault_hooks serve --host 127.0.0.1 --port 8123

runs exactly the normal CLI, except that when SCALEOT_FAULT_PAUSE_DIR is set:
- `emulator_saved`: after an emulator build has written its complete temp file and before it is
  renamed into place (shared.emulator_file.save_emulator's atomic rename);
- `evaluate`: when a plug-in evaluation job starts scoring (shared.evaluation.evaluate);
the process stops while the file `<pause dir>/<point>` exists, and creates `<point>.reached` when it
gets there. Without the marker files nothing changes. Test/ops tooling only: never shipped in the server.
"""

from __future__ import annotations

import os
import time
from pathlib import Path


def _pause(point: str) -> None:
    folder = os.environ.get("SCALEOT_FAULT_PAUSE_DIR")
    if not folder:
        return
    marker = Path(folder) / point
    if not marker.exists():
        return
    (Path(folder) / f"{point}.reached").write_text(str(os.getpid()))
    while marker.exists():
        time.sleep(0.05)


def install() -> None:
    from shared import emulator_file, evaluation

    real_save, real_evaluate = emulator_file.save_model, evaluation.evaluate

    def save_model(model, filename, *args, **kwargs):
        result = real_save(model, filename, *args, **kwargs)
        _pause("emulator_saved")
        return result

    def evaluate(*args, **kwargs):
        _pause("evaluate")
        return real_evaluate(*args, **kwargs)

    emulator_file.save_model = save_model
    evaluation.evaluate = evaluate


def main() -> None:
    install()
    from model_owner_server.cli import app

    app(prog_name="modelowner-server")


if __name__ == "__main__":
    main()
