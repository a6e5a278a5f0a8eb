"""`modelowner-server` command line (entry point `model_owner_server.cli:app`).

- `algorithm.py`  prepare-smollm2, import-gguf, estimate-importance, make-emulator: the algorithm on local
                  folders, exactly the code the API jobs run
- `service.py`    serve (REST API + embedded job worker), worker (job workers alone)
- `admin.py`      create-org, register-model, grant, audit-emulator, rotate-signing-key, revoke-signing-key
- `common.py`     the Typer app and what the commands share (error exit, model lookup, settings, database)
"""

from model_owner_server.cli import admin, algorithm, service
from model_owner_server.cli.common import app

# Each module registers its commands on `app` when imported; `--help` lists them in this order.
_ORDER = {module.__name__: i for i, module in enumerate((algorithm, service, admin))}
app.registered_commands.sort(key=lambda command: _ORDER[command.callback.__module__])

__all__ = ["app"]
