"""Smoke test of benchmarks/systems.py: the whole run on tiny models and small files (real server process,
http.server, uploads, training, stage 2). No timing assertions: only that it completes and that the JSON and
the markdown block are well formed."""

import importlib.util
import json
import math
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "systems.py"
KEYS = {"name", "value", "unit", "baseline", "ratio", "target", "met"}
EXPECTED = {
    "download_throughput_api",
    "verify_throughput_client",
    "server_rss_growth_adapter_upload",
    "server_rss_growth_parallel_downloads",
    "train_step_client",
    "stage2_build_seconds",
    "emulator_size_bytes",
    "emulator_params",
}


def _load():
    spec = importlib.util.spec_from_file_location("systems_bench", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve their module's annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def test_docs_block_is_replaced_or_appended(tmp_path):
    from benchmarks.results import update_docs_block

    start, end = "<!-- systems:start -->", "<!-- systems:end -->"
    block = f"{start}\nnew\n{end}"
    missing = tmp_path / "missing.md"
    update_docs_block(missing, "systems", "new")
    assert missing.read_text() == block + "\n"
    other = tmp_path / "other.md"
    other.write_text("# Benchmarks\n\nprivacy section\n")
    update_docs_block(other, "systems", "new")
    assert other.read_text() == "# Benchmarks\n\nprivacy section\n\n" + block + "\n"
    both = tmp_path / "both.md"
    both.write_text(f"# B\n\nbefore\n{start}\nold\nold\n{end}\nafter\n")
    update_docs_block(both, "systems", "new")
    assert both.read_text() == f"# B\n\nbefore\n{block}\nafter\n"


def test_tiny_run_writes_json_and_markdown(tmp_path):
    bench = _load()
    out, docs = tmp_path / "systems.json", tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\nkept\n")
    result = bench.main(["--tiny", "--work-dir", str(tmp_path / "work"), "--out", str(out), "--docs", str(docs)])

    data = json.loads(out.read_text())
    assert data["complete"] is True and result["complete"] is True
    assert data["profile"] == "tiny" and data["machine"]["logical_cores"] >= 1
    names = [r["name"] for r in data["records"]]
    assert set(names) == EXPECTED and len(names) == len(set(names))
    for r in data["records"]:
        assert r.keys() >= KEYS, r
        assert _number(r["value"]) and isinstance(r["unit"], str) and r["unit"]
        assert r["baseline"] is None or _number(r["baseline"])
        assert r["ratio"] is None or _number(r["ratio"])
        assert r["met"] in (True, False, None)
        assert (r["target"] is None) == (r["met"] is None)
    ratios = {r["name"] for r in data["records"] if r["ratio"] is not None}
    assert {"download_throughput_api", "verify_throughput_client", "train_step_client"} <= ratios

    text = docs.read_text()
    assert text.startswith("# Benchmarks\n\nkept\n")
    assert text.count("<!-- systems:start -->") == 1 and text.count("<!-- systems:end -->") == 1
    assert "| Measurement | Value | Baseline | Ratio | Target | Met |" in text
    assert "benchmarks/systems.py --tiny" in text
