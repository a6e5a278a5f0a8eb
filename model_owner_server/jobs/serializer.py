"""The job queue's wire format: JSON that names one task and one job id, never pickle.

huey's default serializer pickles each message, and unpickling runs whatever the bytes say: anyone who can
write to the queue (an unauthenticated Redis, the SQLite queue file) could run code in the worker, which holds
the full model. Our queue carries nothing but "run job <id>" (JobRunner.run reads the rest from the database),
so JobSerializer writes huey's Message as a JSON object and, on read, accepts exactly that shape: our one task
name, one `job_<hex>` argument, no kwargs, callbacks, chords or schedules. Anything else (pickle bytes
included) is refused with a logged error before any of it is interpreted; huey's worker loop logs the
exception, drops the message (it was already popped) and goes on with the next one.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from huey.registry import Message
from huey.serializer import Serializer

log = logging.getLogger("scaleot.jobs")

JOB_ID = re.compile(r"job_[0-9a-f]{1,64}")
TASK_ID = re.compile(r"[0-9a-fA-F-]{1,64}")  # huey's task ids are str(uuid4())
MAX_MESSAGE_BYTES = 4096  # a real message is ~400 bytes; refuse to parse anything much larger

# Fields that must be empty: chaining, chords, schedules and expiry would let a message do more than "run job X".
_MUST_BE_NULL = ("eta", "on_complete", "on_error", "expires", "expires_resolved", "timeout", "chord_config")


class RejectedQueueMessage(ValueError):
    """A queue message that is not one of ours: it is dropped without running anything."""


def _non_negative_number(value: Any, *, integer: bool) -> bool:
    kinds = (int,) if integer else (int, float)
    return isinstance(value, kinds) and not isinstance(value, bool) and value >= 0


class JobSerializer(Serializer):
    """huey Serializer for messages of the form `<task_name>(job_id)`, as JSON (see the module docstring)."""

    def __init__(self, task_name: str) -> None:
        super().__init__()
        self.task_name = task_name  # huey's registry name of our one task (module + name=)

    def _check(self, fields: Any) -> Message:
        """The Message these fields describe, or RejectedQueueMessage saying why they are not one of ours."""
        if not isinstance(fields, dict):
            raise RejectedQueueMessage(f"expected a JSON object, got {type(fields).__name__}")
        if set(fields) != set(Message._fields):
            unknown, missing = set(fields) - set(Message._fields), set(Message._fields) - set(fields)
            raise RejectedQueueMessage(f"wrong fields (unknown {sorted(unknown)}, missing {sorted(missing)})")
        if fields["name"] != self.task_name:
            raise RejectedQueueMessage(f"task {str(fields['name'])[:80]!r} is not {self.task_name!r}")
        task_id = fields["id"]
        if not isinstance(task_id, str) or not TASK_ID.fullmatch(task_id):
            raise RejectedQueueMessage("the task id is not a uuid")
        args = fields["args"]
        if not (isinstance(args, list | tuple) and len(args) == 1 and isinstance(args[0], str)):
            raise RejectedQueueMessage("the task takes exactly one argument, a job id")
        if not JOB_ID.fullmatch(args[0]):
            raise RejectedQueueMessage(f"argument {args[0][:80]!r} is not a job id (job_<hex>)")
        if fields["kwargs"] not in (None, {}):
            raise RejectedQueueMessage("the task takes no keyword arguments")
        for name in _MUST_BE_NULL:
            if fields[name] is not None:
                raise RejectedQueueMessage(f"{name} must be empty")
        if not (
            _non_negative_number(fields["retries"], integer=True)
            and _non_negative_number(fields["retry_delay"], integer=False)
        ):
            raise RejectedQueueMessage("retries and retry_delay must be non-negative numbers")
        if fields["retry_backoff"] is not None and not _non_negative_number(fields["retry_backoff"], integer=False):
            raise RejectedQueueMessage("retry_backoff must be a non-negative number")
        if fields["priority"] is not None and not _non_negative_number(fields["priority"], integer=True):
            raise RejectedQueueMessage("priority must be a non-negative integer")
        return Message(**{**fields, "args": (args[0],), "kwargs": {}})

    def _serialize(self, data: Any) -> bytes:
        # Only task messages go through here (results, revocations and locks are off for this queue); refuse
        # anything else rather than write what the reader would drop.
        if not isinstance(data, Message):
            raise TypeError(f"the job queue carries only job messages, not {type(data).__name__}")
        message = self._check(data._asdict())
        return json.dumps(message._asdict(), separators=(",", ":")).encode()

    def _deserialize(self, data: bytes | str) -> Message:
        try:
            if not isinstance(data, bytes | str):
                raise RejectedQueueMessage(f"expected bytes, got {type(data).__name__}")
            if len(data) > MAX_MESSAGE_BYTES:
                raise RejectedQueueMessage(f"{len(data)} bytes is too large for a job message")
            try:
                fields = json.loads(data if isinstance(data, str) else data.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                # e.g. huey's pickle format from an old producer, or a forged payload: never unpickled
                raise RejectedQueueMessage(
                    f"not JSON ({type(exc).__name__}); pickled messages are not accepted"
                ) from None
            return self._check(fields)
        except RejectedQueueMessage as exc:
            log.error(
                "dropped a job-queue message that is not one of ours (%s): nothing was run; if it came from this "
                "server, re-submit the job; otherwise something else can write to the queue: check who can reach "
                "it (Redis password, queue file permissions)",
                exc,
            )
            raise
