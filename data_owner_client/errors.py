"""Exit codes and the exceptions that carry them: the one place a script's contract is defined.

Every failure the CLI can report is mapped to exactly one of these codes by `exit_code_for`, so
`tune`, `download`, `verify`, `upload` and `status` all exit the same way for the same problem.
"""

from __future__ import annotations

import sys
from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    BAD_INPUT = 2  # usage, options, data files, local adapter files (same code click uses for usage errors)
    VERIFICATION = 3  # signature, untrusted key, hash/size/ETag mismatch, emulator id mismatch
    SERVER = 4  # server answered with an error, unexpected response, network failure, timeout
    EVALUATION_FAILED = 5  # upload accepted, but the server's plug-in evaluation job failed


EXIT_CODES_HELP = (
    "Exit codes: 0 success; 2 bad input (usage, options, data or adapter files); "
    "3 verification failure (signature, untrusted key, sha256/size, emulator id); "
    "4 server or network error; 5 the server's evaluation failed."
)


class ClientError(Exception):
    """A failure with a user-facing message and the exit code scripts rely on."""

    exit_code: ExitCode = ExitCode.SERVER

    def __init__(self, message: str, exit_code: ExitCode | None = None, details: dict | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code
        self.details = details or {}  # extra fields for the `--json` error object (e.g. upload_command)


class BadInputError(ClientError):
    exit_code = ExitCode.BAD_INPUT


class TrustError(ClientError):
    """Client-side verification failures that are not raised by shared.signing itself."""

    exit_code = ExitCode.VERIFICATION


class ServerError(ClientError):
    exit_code = ExitCode.SERVER

    def __init__(
        self, message: str, status_code: int | None = None, code: str | None = None, details: dict | None = None
    ):
        super().__init__(message, details=details)
        self.status_code = status_code
        self.code = code


class EvaluationFailedError(ClientError):
    exit_code = ExitCode.EVALUATION_FAILED


# The `code` of the `--json` error object when the server gave none.
ERROR_CODES = {
    ExitCode.BAD_INPUT: "bad_input",
    ExitCode.VERIFICATION: "verification_failed",
    ExitCode.SERVER: "server_error",
    ExitCode.EVALUATION_FAILED: "evaluation_failed",
}


def error_object(exc: BaseException, code: ExitCode) -> dict:
    """`{"error": {"code", "message", "exit_code", ...}}`: what `--json` prints on stdout for a failure."""
    server_code = exc.code if isinstance(exc, ServerError) else None
    err: dict = {"code": server_code or ERROR_CODES.get(code, "error"), "message": str(exc), "exit_code": int(code)}
    if isinstance(exc, ServerError) and exc.status_code is not None:
        err["http_status"] = exc.status_code
    if isinstance(exc, ClientError):
        err.update(exc.details)
    return {"error": err}


def exit_code_for(exc: BaseException) -> ExitCode | None:
    """The exit code for an expected failure; None for a bug (let it surface with its traceback)."""
    import httpx

    from shared.signing import VerificationError

    if isinstance(exc, ClientError):
        return exc.exit_code
    if isinstance(exc, VerificationError):
        return ExitCode.VERIFICATION
    if isinstance(exc, httpx.HTTPError):
        return ExitCode.SERVER
    # Modules that import torch are looked up, not imported: if one was never loaded, its error cannot be here.
    data, adapter = sys.modules.get("shared.data"), sys.modules.get("shared.adapter")
    if data is not None and isinstance(exc, data.DataError):
        return ExitCode.BAD_INPUT  # a data file the user must fix (the message names file and line)
    if adapter is not None and isinstance(exc, adapter.AdapterValidationError):
        return ExitCode.BAD_INPUT  # a local adapter file that does not match the issued spec
    return None
