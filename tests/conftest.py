import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Tiny random-init models have nothing to protect, and their privacy audit measures noise: every server the
# tests start (in process or as a `serve` subprocess inheriting this environment) gets a permissive emulator
# policy. The default policy itself is tested in tests/server/test_emulator_policy.py, which passes
# `emulator_policy=EmulatorPolicy()` explicitly.
os.environ.setdefault(
    "SCALEOT_EMULATOR_POLICY",
    '{"min_alpha": 0.0, "max_n_adapter": 1024, "max_kept_share": 1.0, "require_audit": false}',
)
