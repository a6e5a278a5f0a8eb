"""Background jobs (importance estimation, emulator building, plug-in evaluation, privacy audits) on huey.

The queue message carries only the job id; everything a task needs is in the `jobs` row (`params`),
and everything it reports (status, progress, message, live metrics, result, error) goes back there,
so `GET /v1/jobs/{id}` works no matter which process or machine ran the task.

One module per concern:

- `context.py`   the job row seen from a running task: worker identity, JobContext (throttled progress and
                 metrics writes plus a heartbeat thread), JobFailure / JobCancelled, `still_ours`, `fail_job`
- `runner.py`    JobRunner: claim a job by id, run its handler (HANDLERS), record success or failure
- `cancel.py`    POST /v1/jobs/{id}/cancel: `request_cancel` and the cancelled jobs' error messages
- `queue.py`     huey wiring: `make_huey`, JobQueue (enqueue, submit, embedded consumer threads)
- `recovery.py`  crash recovery: fail jobs of dead workers, requeue lost messages, the periodic Reaper
- `tasks/`       the task bodies, one per job kind, each a recipe read top to bottom:
                 importance.py, emulator.py, evaluation.py, privacy_audit.py

Queue backends (`SCALEOT_QUEUE_URL`): unset -> SqliteHuey file under the data dir; `redis://...` ->
RedisHuey; `immediate` -> tasks run inline at enqueue time (tests, debugging).

Dead workers: a running job records `worker_id` (host:pid:nonce) and refreshes `heartbeat_at` every
`heartbeat_seconds`. On start the server fails running jobs whose local worker process is gone, and a
reaper fails jobs whose heartbeat went stale (a remote worker that died), with a reason saying so.
"""
