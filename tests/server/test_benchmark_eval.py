"""Server-side benchmark evaluation: lm-evaluation-harness tasks on M zero-shot and on an adapter's plug-in, as a
job (POST /v1/adapters/{id}/benchmarks, `modelowner-server eval-adapter`), stored beside the adapter's evaluation."""

from __future__ import annotations

import json
import re

import pytest
from server_helpers import auth
from sqlalchemy import func, select
from typer.testing import CliRunner

from model_owner_server.models import Evaluation, JobRow

pytestmark = pytest.mark.db
TASKS = ["scaleot_analogy", "scaleot_wikipedia"]


def _bench(world, body: dict, who: str = "admin"):
    return world.client.post(f"/v1/adapters/{world.adapter_id}/benchmarks", headers=auth(world.keys[who]), json=body)


def _job(world, job_id: str) -> dict:
    return world.client.get(f"/v1/jobs/{job_id}", headers=auth(world.keys["admin"])).json()


def _counts(world) -> tuple[int, int]:
    with world.sessions() as s:
        return (
            s.scalar(select(func.count()).select_from(JobRow)),
            s.scalar(select(func.count()).select_from(Evaluation)),
        )


def test_the_job_stores_one_lm_eval_table_for_m_and_the_plug_in(world):
    before = world.client.get(f"/v1/adapters/{world.adapter_id}", headers=auth(world.keys["alice"])).json()
    r = _bench(world, {"tasks": TASKS, "limit": 3})
    assert r.status_code == 202, r.text
    job = _job(world, r.json()["id"])
    assert job["status"] == "succeeded" and job["kind"] == "benchmark_eval", job

    after = world.client.get(f"/v1/adapters/{world.adapter_id}", headers=auth(world.keys["alice"])).json()
    bench = after["evaluation"]["benchmarks"]
    assert bench["harness"] == "lm-evaluation-harness 0.4.13" and bench["tasks"] == TASKS and bench["limit"] == 3
    assert bench["samples"] == {"scaleot_analogy": 3, "scaleot_wikipedia": 3}
    for column in ("zero_shot", "plug_in"):
        assert 0.0 <= bench[column]["scaleot_analogy"]["acc"] <= 1.0
        assert set(bench[column]["scaleot_wikipedia"]) >= {"word_perplexity", "byte_perplexity", "bits_per_byte"}
    # world's adapter is the emulator's own adapter layers, i.e. M's: plugged in, it is M again.
    assert bench["plug_in"]["scaleot_wikipedia"]["bits_per_byte"] == pytest.approx(
        bench["zero_shot"]["scaleot_wikipedia"]["bits_per_byte"], rel=1e-4
    )
    # The table sits beside the evaluation; the evaluation's two columns are untouched.
    assert after["evaluation"]["zero_shot"] == before["evaluation"]["zero_shot"]
    assert after["evaluation"]["plug_in"] == before["evaluation"]["plug_in"]

    # A second run replaces the table (one per adapter).
    r = _bench(world, {"tasks": ["scaleot_analogy"], "limit": 2})
    assert _job(world, r.json()["id"])["status"] == "succeeded"
    with world.sessions() as s:
        rows = s.scalars(select(Evaluation).where(Evaluation.adapter_id == world.adapter_id)).all()
    assert sorted(e.kind for e in rows) == ["benchmarks", "plug_in", "zero_shot"]
    bench = world.client.get(f"/v1/adapters/{world.adapter_id}", headers=auth(world.keys["admin"])).json()
    assert bench["evaluation"]["benchmarks"]["tasks"] == ["scaleot_analogy"]

    # The console's adapter page shows the table to the adapter's owner, and nothing to another data owner.
    client = world.client
    client.cookies.clear()
    sign_in(client, world.keys["alice"])
    page = client.get(f"/console/adapters/{world.adapter_id}").text
    table = page[page.index('<table id="benchmarks">') : page.index("</table>", page.index('id="benchmarks"'))]
    assert "lm-evaluation-harness 0.4.13" in table and "scaleot_analogy" in table and "acc_norm" in table
    assert "eval-adapter" not in page  # the how-to is for admins
    client.cookies.clear()
    sign_in(client, world.keys["bob"])
    assert client.get(f"/console/adapters/{world.adapter_id}").status_code == 404
    client.cookies.clear()


def sign_in(client, key: str) -> None:
    """Sign in to the console through its form (double-submit CSRF cookie)."""
    page = client.get("/console/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
    r = client.post("/console/login", data={"api_key": key, "csrf_token": token}, follow_redirects=False)
    assert r.status_code == 303, r.text


def test_data_owners_see_only_their_own_adapters_figures_and_cannot_start_a_run(world):
    assert _bench(world, {"tasks": TASKS}, who="alice").status_code == 403  # admins run benchmarks
    assert world.client.get(f"/v1/adapters/{world.adapter_id}", headers=auth(world.keys["bob"])).status_code == 404
    listed = world.client.get("/v1/adapters", headers=auth(world.keys["bob"])).json()["adapters"]
    assert world.adapter_id not in {a["id"] for a in listed}


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"tasks": []}, 422, "tasks"),
        ({"tasks": ["scaleot_analogy; rm -rf /"]}, 422, "not a task name"),
        ({"tasks": ["scaleot_analogy", "scaleot_analogy"]}, 422, "named twice"),
        ({"tasks": ["scaleot_analogy"], "limit": 0}, 422, "limit"),
        ({"tasks": ["scaleot_analogy"], "limit": 10**6}, 422, "SCALEOT_BENCHMARK_MAX_LIMIT"),
        ({"tasks": ["scaleot_analogy"], "num_fewshot": 99}, 422, "num_fewshot"),
        ({"tasks": ["scaleot_analogy"], "device": "cuda"}, 422, "device"),
    ],
)
def test_bad_requests_are_refused_and_change_nothing(world, body, status, words):
    before = _counts(world)
    r = _bench(world, body)
    assert r.status_code == status and words in r.text, r.text
    assert _counts(world) == before


def test_an_adapter_that_is_not_evaluated_is_refused(world):
    with world.sessions() as s:
        from model_owner_server.models import AdapterRow

        s.get(AdapterRow, world.adapter_id).status = "evaluating"
        s.commit()
    try:
        before = _counts(world)
        r = _bench(world, {"tasks": TASKS})
        assert r.status_code == 409 and "evaluating" in r.json()["error"]["message"]
        assert _counts(world) == before
    finally:
        with world.sessions() as s:
            s.get(AdapterRow, world.adapter_id).status = "evaluated"
            s.commit()


def test_an_unknown_task_fails_the_job_naming_it(world, monkeypatch):
    # lm-eval's built-in index takes ~30 s to build on a small CPU; the unknown-name path is the same with a
    # local-only index, so the test uses one.
    from lm_eval.tasks import TaskManager

    from model_owner_server.jobs.tasks import benchmark_eval

    monkeypatch.setattr(
        benchmark_eval, "builtin_manager", lambda dirs: TaskManager(include_path=list(dirs), include_defaults=False)
    )
    r = _bench(world, {"tasks": ["scaleot_analogy", "no_such_task"]})
    job = _job(world, r.json()["id"])
    assert job["status"] == "failed" and "unknown lm-eval task(s): no_such_task" in job["error"], job
    assert "scaleot_analogy" in job["error"]  # it lists the server's own


def test_a_task_whose_data_is_not_offline_fails_naming_it(world, tmp_path, monkeypatch):
    """No downloads: a task on a Hub dataset that is not in the local cache fails before the model loads."""
    (tmp_path / "remote.yaml").write_text(
        "task: needs_the_hub\n"
        "dataset_path: scaleot-tests/not-a-cached-dataset\n"
        "output_type: multiple_choice\n"
        "test_split: test\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        "doc_to_target: answer\n"
    )
    monkeypatch.setattr(world.settings, "benchmark_tasks_dir", tmp_path)
    before = _counts(world)
    r = _bench(world, {"tasks": ["needs_the_hub"]})
    job = _job(world, r.json()["id"])
    assert job["status"] == "failed", job
    assert "task 'needs_the_hub'" in job["error"] and "not available offline" in job["error"], job["error"]
    assert _counts(world)[1] == before[1]  # no evaluation row stored


def test_eval_adapter_command_runs_the_same_job_and_prints_the_table(world, monkeypatch):
    from model_owner_server.cli import app

    monkeypatch.setenv("SCALEOT_DATA_DIR", str(world.settings.data_dir))
    monkeypatch.setenv("SCALEOT_DATABASE_URL", world.settings.database_url)
    monkeypatch.setenv("SCALEOT_DEVICE", "cpu")
    monkeypatch.setenv("SCALEOT_EVAL_BATCH_SIZE", "2")
    r = CliRunner().invoke(app, ["eval-adapter", world.adapter_id, "--tasks", "scaleot_analogy", "--limit", "2"])
    assert r.exit_code == 0, r.output
    assert "scaleot_analogy" in r.stdout and "acc_norm" in r.stdout and "M zero-shot" in r.stdout
    with world.sessions() as s:
        job = s.scalars(
            select(JobRow).where(JobRow.kind == "benchmark_eval").order_by(JobRow.created_at.desc())
        ).first()
        assert job.status == "succeeded" and job.params["tasks"] == ["scaleot_analogy"]
    r = CliRunner().invoke(app, ["eval-adapter", world.adapter_id, "--tasks", "a b", "--json"])
    assert r.exit_code == 2 and "not a task name" in r.output
    r = CliRunner().invoke(app, ["eval-adapter", "adp_missing", "--tasks", "scaleot_analogy"])
    assert r.exit_code == 2 and "no adapter 'adp_missing'" in r.output
    assert json.loads(json.dumps(job.params))  # the params are plain JSON (the queue speaks JSON)
