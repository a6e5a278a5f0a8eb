"""Models as model owners have them: sharded / half-precision / untied HF folders for register-model, GGUF files
for import-gguf (dequantised), and loading errors that name the folder and what is missing."""

import importlib.util
import json

import gguf
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from model_owner_server.cli import app
from model_owner_server.crud import inspect_model_folder
from model_owner_server.scaleot.gguf_import import import_gguf
from model_owner_server.scaleot.model_io import ModelLoadError, check_model_folder, load_causal_lm
from scaleot_samples.tiny import byte_tokenizer, save_tiny_model_dir, tiny_model
from shared.modules import count_params

IDS = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize(
    "family,dtype,shard",
    [
        ("llama", torch.float32, "20KB"),  # sharded, tied embeddings
        ("gpt_neox", torch.bfloat16, None),  # bf16 checkpoint, untied
        ("phi3", torch.float16, "30KB"),  # fp16, sharded, untied
    ],
)
def test_registered_folder_kinds_load_in_the_requested_dtype(tmp_path, family, dtype, shard):
    folder = save_tiny_model_dir(tmp_path / "m", family, dtype=dtype, max_shard_size=shard)
    assert (folder / "model.safetensors.index.json").is_file() == bool(shard)
    files = check_model_folder(folder)
    assert len(files) > 1 if shard else [f.name for f in files] == ["model.safetensors"]
    reference = tiny_model(family).to(dtype)

    facts = inspect_model_folder(folder)  # what register-model records
    assert facts["n_params"] == count_params(reference)  # tied embeddings stored and counted once
    assert facts["n_bytes"] == facts["n_params"] * reference.dtype.itemsize

    model, tok = load_causal_lm(folder)  # default: float32, whatever the checkpoint dtype
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    ref_sd = reference.float().state_dict()
    assert all(torch.equal(v, ref_sd[k]) for k, v in model.state_dict().items())  # every shard, losslessly
    assert torch.allclose(logits(model), logits(reference.float()), atol=1e-5)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tied == (family == "llama")
    half, _ = load_causal_lm(folder, dtype=dtype)
    assert {p.dtype for p in half.parameters()} == {dtype}
    assert tok("abc").input_ids == byte_tokenizer()("abc").input_ids


def test_missing_pieces_are_named_with_what_to_do(tmp_path, monkeypatch):
    folder = save_tiny_model_dir(tmp_path / "m", "llama", tokenizer=False)
    with pytest.raises(ModelLoadError, match=rf"{folder}.*missing tokenizer files.*tokenizer.save_pretrained"):
        load_causal_lm(folder)
    (folder / "tokenizer_config.json").write_text("{}")  # config alone: transformers would ask for sentencepiece
    with pytest.raises(ModelLoadError, match="missing tokenizer files"):
        inspect_model_folder(folder)
    (folder / "tokenizer.model").write_bytes(b"")  # SentencePiece only, and the package is not there
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "sentencepiece" else real_find_spec(name, *a)
    )
    with pytest.raises(ModelLoadError, match=r"tokenizer\.model and sentencepiece is not installed.*pip install"):
        check_model_folder(folder)
    monkeypatch.undo()
    byte_tokenizer().save_pretrained(folder)
    (folder / "config.json").unlink()
    with pytest.raises(ModelLoadError, match=r"missing config.json; save the model with save_pretrained"):
        load_causal_lm(folder)

    sharded = save_tiny_model_dir(tmp_path / "s", "llama", max_shard_size="20KB")
    shard = sorted(sharded.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(ModelLoadError, match=rf"missing shard\(s\) {shard.name}.*copy the whole checkpoint"):
        load_causal_lm(sharded)
    for f in sharded.glob("*.safetensors*"):
        f.unlink()
    (sharded / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ModelLoadError, match=r"\.bin.*save_pretrained"):
        check_model_folder(sharded)
    with pytest.raises(ModelLoadError, match="does not exist"):
        check_model_folder(tmp_path / "nowhere")


def test_register_model_cli_accepts_a_sharded_bf16_folder(tmp_path, monkeypatch):
    folder = save_tiny_model_dir(tmp_path / "m", "gemma2", dtype=torch.bfloat16, max_shard_size="20KB")
    monkeypatch.setenv("SCALEOT_DATA_DIR", str(tmp_path / "data"))
    res = CliRunner().invoke(app, ["register-model", "tiny-gemma", "--path", str(folder)])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert (out["family"], out["n_layers"]) == ("gemma", 4)
    res = CliRunner().invoke(app, ["register-model", "no-tok", "--path", str(tmp_path / "nowhere")])
    assert res.exit_code != 0 and "does not exist" in res.output


# ---------------------------------------------------------------- GGUF


def write_tiny_gguf(path, family: str, arch: str, qtype=gguf.GGMLQuantizationType.Q8_0):
    """A llama.cpp-style GGUF of a tiny model (matrices quantised to `qtype`) with the byte tokenizer."""
    model = tiny_model(family, n_layers=2)
    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_embedding_length(cfg.hidden_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    vocab = byte_tokenizer().get_vocab()
    w.add_tokenizer_model("gpt2")
    w.add_token_list(sorted(vocab, key=vocab.get))
    w.add_token_types([1] * (len(vocab) - 1) + [3])  # bytes are normal tokens, EOS is a control token
    w.add_token_scores([0.0] * len(vocab))
    for add in (w.add_bos_token_id, w.add_eos_token_id, w.add_pad_token_id):
        add(len(vocab) - 1)
    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(arch_id, cfg.num_hidden_layers)
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # llama.cpp leaves out a tied output matrix
        a = tensor.numpy().astype(np.float32)
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if a.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            q = gguf.quants.quantize(a, qtype)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=qtype)
        else:
            w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model


@pytest.mark.parametrize("family,arch", [("qwen2", "qwen2"), ("phi3", "phi3")])
def test_import_gguf_dequantises_into_a_loadable_folder(tmp_path, family, arch):
    original = write_tiny_gguf(tmp_path / "tiny.gguf", family, arch)
    res = CliRunner().invoke(app, ["import-gguf", str(tmp_path / "tiny.gguf"), "--output", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    out = tmp_path / "out"
    source = json.loads((out / "scaleot_source.json").read_text())
    assert source["architecture"] == arch and "Q8_0" in source["tensor_types"]
    assert "quantization_config" not in json.loads((out / "config.json").read_text())

    model, tok = load_causal_lm(out)
    assert model.config.model_type == family
    want = original.state_dict()
    for key, value in model.state_dict().items():  # Q8_0: one int8 step of each 32-value block's scale
        assert torch.allclose(value, want[key], atol=0.02 * want[key].abs().max().item() + 1e-6), key
    assert torch.allclose(logits(model), logits(original), atol=0.05)
    assert tok("hello there").input_ids == byte_tokenizer()("hello there").input_ids
    assert import_gguf(tmp_path / "tiny.gguf", out) == out  # converted already: the folder is reused as is
    with (tmp_path / "tiny.gguf").open("ab") as f:  # another file under the same name is not mistaken for it
        f.write(b"\0" * 32)
    with pytest.raises(ModelLoadError, match=r"already exists and is not a conversion of tiny\.gguf"):
        import_gguf(tmp_path / "tiny.gguf", out)


def test_import_gguf_refuses_what_it_cannot_convert(tmp_path):
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        import_gguf(not_gguf, tmp_path / "a")
    with pytest.raises(ModelLoadError, match="does not exist"):
        import_gguf(tmp_path / "missing.gguf", tmp_path / "a")
    write_tiny_gguf(tmp_path / "tiny.gguf", "qwen2", "qwen2")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ModelLoadError, match=r"already exists.*choose another --output"):
        import_gguf(tmp_path / "tiny.gguf", tmp_path / "busy")
    bloom = gguf.GGUFWriter(str(tmp_path / "bloom.gguf"), "bloom")  # transformers reads it; no family of ours
    for add, value in (
        (bloom.add_context_length, 64),
        (bloom.add_block_count, 2),
        (bloom.add_embedding_length, 32),
        (bloom.add_head_count, 4),
        (bloom.add_feed_forward_length, 64),
    ):
        add(value)
    bloom.add_layer_norm_eps(1e-5)
    bloom.write_header_to_file()
    bloom.write_kv_data_to_file()
    bloom.write_tensors_to_file()
    bloom.close()
    with pytest.raises(ModelLoadError, match=r"bloom.*shared/architectures.py"):
        import_gguf(tmp_path / "bloom.gguf", tmp_path / "b")
    assert not (tmp_path / "b").exists()
