"""CI-sized version of `python -m reliability.flood` (issue 20, finding 4): on a real `modelowner-server serve`
with low request limits, organization A floods (8 requests in flight, back to back, from another process)
while organization B polls the control endpoints below its limit. A gets 429s, each with an integer
Retry-After; B gets none; nothing is lost. No timing assertions (docs/reliability.md has the figures).
(Not marked `db`: it starts a server process; the PostgreSQL pass skips it.)"""

from __future__ import annotations

from reliability.flood import flood_table, run_flood

LOW_LIMITS = {  # 2 requests/s per key (bursts of 10), 4/s per organization; B polls 1.5/s
    "SCALEOT_RATE_LIMIT_PER_KEY": "120",
    "SCALEOT_RATE_LIMIT_PER_ORG": "240",
    "SCALEOT_RATE_LIMIT_BURST_SECONDS": "5",
}


def test_a_flood_gets_429s_and_the_other_organization_none(tmp_path, new_database_url, files):
    result = run_flood(
        tmp_path,
        new_database_url(),
        files=files,
        duration=3.0,
        concurrency=8,
        poll_rate=1.5,
        limits_env=LOW_LIMITS,
        compare_without_limits=False,
    )
    print(flood_table(result))
    flood = result["phases"]["flood, quotas on"]
    a = flood["a"]
    assert a["statuses"].get(429, 0) > 0 and a["statuses"].get(200, 0) > 0, a
    assert a["bad_retry_after"] == 0, a  # every 429 says when to come back
    assert set(a["statuses"]) <= {200, 429}, a
    for phase in result["phases"].values():
        assert phase["b"]["requests"] > 0 and set(phase["b"]["statuses"]) == {200}, phase["b"]
        assert phase["b"]["lost"] == 0
    assert a["lost"] == 0
