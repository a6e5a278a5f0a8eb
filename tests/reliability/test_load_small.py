"""CI-sized version of `python -m reliability.load`: a real `modelowner-server serve` on 127.0.0.1 with
8 emulator downloaders, 2 adapter uploaders and 2 job/status pollers for a few seconds. Every request ends
in a 2xx, a clean 4xx or a 503; none is lost; every download is complete; the database and data dir are
consistent afterwards. (Not marked `db`: it starts a server process; the PostgreSQL pass skips it.)"""

from __future__ import annotations

from reliability.harness import client, consistency_problems
from reliability.load import prepare, run_load, summary_table
from tooling.procs import wait_jobs_settled


def test_small_mixed_load_loses_nothing(tmp_path, new_database_url, files):
    db_url = new_database_url()
    srv, ctx = prepare(tmp_path, db_url, files=files, owners=2)
    try:
        result = run_load(
            srv,
            ctx["keys"],
            ctx["emulator"],
            ctx["model_id"],
            ctx["adapter"],
            downloaders=8,
            uploaders=2,
            pollers=2,
            duration=4.0,
        )
        print(summary_table(result))
        assert result["lost"] == 0, result["lost_examples"]
        assert result["unexpected"] == 0, result["unexpected_examples"]
        assert result["bad_downloads"] == 0
        assert result["downloads_ok"] >= 8 and result["uploads_accepted"] >= 2
        assert result["evaluations"].get("failed", 0) == 0, result["evaluations"]
        # The server imports torch and holds M: hundreds of MiB (docs/reliability.md: ~500). A sampler that reads
        # the wrong process (a launcher, an exited pid) gives 0 to a few MiB.
        assert result["rss_peak_MiB"] >= result["rss_before_MiB"] > 200, result
        with client(srv.url, ctx["keys"]["admin"]) as admin:
            wait_jobs_settled(admin, timeout=120)
            audit = admin.get("/v1/audit", params={"action": "download_emulator", "limit": 1}).json()
            assert audit["total"] >= result["downloads_ok"]
        assert consistency_problems(db_url, ctx["data_dir"]) == []
    finally:
        srv.stop()
