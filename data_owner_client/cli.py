"""`dataowner-client`: verify the model owner's emulator, fine-tune its adapter locally, upload only the adapter.

Human output goes to stdout (results) and stderr (progress, notes); `--json` prints one JSON
document on stdout for scripts, also on failure (`{"error": {"code", "message", "exit_code", ...}}`, with the
human message on stderr as usual). Every failure exits with a code from `errors.ExitCode`.

The commands live in `cmd_tune.py` (tune), `cmd_emulator.py` (download, verify) and `cmd_adapter.py` (upload,
status); the options they share in `options.py`; what they print in `output.py`.
"""

from __future__ import annotations

import typer

from .cmd_adapter import status, upload
from .cmd_emulator import download, verify
from .cmd_tune import tune
from .errors import EXIT_CODES_HELP

__all__ = ["app", "main"]

app = typer.Typer(
    name="dataowner-client",
    help="ScaleOT data-owner client: download and verify a signed emulator, fine-tune its adapter layers "
    "locally, upload only the adapter, and report the model owner's plug-in evaluation.",
    epilog=EXIT_CODES_HELP,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,  # rich tracebacks print locals, which may include the API key
    # Plain click help: rich's option table cuts long option names (--trust-on-first-use) at 80 columns;
    # click's layout never does, and uses up to 120 columns where the terminal has them.
    rich_markup_mode=None,
    context_settings={"max_content_width": 120},
)

for _name, _command in (
    ("tune", tune),
    ("download", download),
    ("verify", verify),
    ("upload", upload),
    ("status", status),
):
    app.command(_name, epilog=EXIT_CODES_HELP)(_command)


def main() -> None:  # `python -m data_owner_client`
    app()
