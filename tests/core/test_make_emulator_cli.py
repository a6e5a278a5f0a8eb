"""`modelowner-server make-emulator`: baselines need no corpus; a ScaleOT build without one is refused clearly
and writes nothing."""

import json

from typer.testing import CliRunner

from model_owner_server.cli import app
from scaleot_samples.tiny import save_tiny_model_dir


def test_baseline_needs_no_corpus_and_scaleot_without_one_is_refused(tmp_path):
    model_dir = save_tiny_model_dir(tmp_path / "tiny", "llama", n_layers=6, hidden=32)
    runner = CliRunner()
    out = tmp_path / "ot.safetensors"
    res = runner.invoke(
        app,
        ["make-emulator", str(model_dir), "--method", "uniform_layerdrop", "--n-dropped", "1", "--output", str(out)],
    )
    assert res.exit_code == 0, res.output
    assert json.loads(res.output[res.output.index("{") :])["plan"] == "AAF.AA" and out.is_file()

    imp = tmp_path / "imp"
    res = runner.invoke(
        app,
        [
            "estimate-importance",
            str(model_dir),
            "--corpus",
            str(_corpus(tmp_path)),
            "--steps",
            "2",
            "--seq-len",
            "16",
            "--bottleneck",
            "4",
            "--output",
            str(imp),
        ],
    )
    assert res.exit_code == 0, res.output
    (imp / "importance.json").write_text(
        json.dumps({**json.loads((imp / "importance.json").read_text()), "corpus": str(tmp_path / "gone.txt")})
    )
    target = tmp_path / "scaleot.safetensors"
    res = runner.invoke(app, ["make-emulator", str(model_dir), "--importance", str(imp), "--output", str(target)])
    assert res.exit_code != 0 and "--corpus" in res.output and not target.exists()


def _corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("the river runs past the old stone house and into the green field. " * 60)
    return path


def test_the_gradient_term_options_reach_the_file_and_a_bad_match_is_refused(tmp_path):
    """--grad-weight / --grad-match (the settings' defaults) calibrate with the gradient term and record it in the
    file; an unknown --grad-match fails before the model loads and writes nothing."""
    model_dir = save_tiny_model_dir(tmp_path / "tiny", "llama", n_layers=6, hidden=32)
    runner = CliRunner()
    corpus = _corpus(tmp_path)
    imp = tmp_path / "imp"
    args = ["estimate-importance", str(model_dir), "--corpus", str(corpus), "--steps", "2", "--seq-len", "16"]
    res = runner.invoke(app, [*args, "--bottleneck", "4", "--output", str(imp)])
    assert res.exit_code == 0, res.output
    bad = tmp_path / "bad.safetensors"
    make = ["make-emulator", str(model_dir), "--importance", str(imp), "--corpus", str(corpus), "--seq-len", "16"]
    res = runner.invoke(app, [*make, "--grad-match", "everything", "--output", str(bad)])
    assert res.exit_code != 0 and "--grad-match" in res.output and not bad.exists()
    out = tmp_path / "grad.safetensors"
    opts = ["--calibration-steps", "2", "--grad-weight", "10", "--grad-match", "adapters", "--fidelity-blocks", "0"]
    res = runner.invoke(app, [*make, *opts, "--output", str(out)])
    assert res.exit_code == 0, res.output
    cal = json.loads(res.output[res.output.index("{") :])["calibration"]
    assert cal["config"]["grad_weight"] == 10.0 and cal["config"]["grad_match"] == "adapters"
    assert cal["final_grad_mismatch"] is not None and out.is_file()
