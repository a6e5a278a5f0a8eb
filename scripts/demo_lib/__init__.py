"""The two-party demo's parts (`scripts/demo.py` is the script): config.py (settings, the invitation), owner.py
and data_owner.py (each party's flow over the product's CLIs, REST API and client library), data.py (each
party's material), processes.py (child processes, the local server), report.py, console.py (output)."""
