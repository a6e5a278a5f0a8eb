"""Reliability runs against a real `modelowner-server serve` on loopback: load, faults (kill -9, full disk).

`python -m reliability.load` and `python -m reliability.faults` write the figures quoted in
docs/reliability.md; tests/reliability runs small versions of both in CI.
"""
