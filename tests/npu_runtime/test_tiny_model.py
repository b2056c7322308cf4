import hashlib
import json

from npu_runtime.tiny_model import MARKER, TinyMoESpec, build_tiny_moe


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path):
    a = build_tiny_moe(tmp_path / "a", TinyMoESpec(seed=7))
    b = build_tiny_moe(tmp_path / "b", TinyMoESpec(seed=7))
    c = build_tiny_moe(tmp_path / "c", TinyMoESpec(seed=8))
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert _digest(a / name) == _digest(b / name), name
    assert _digest(a / "model.safetensors") != _digest(c / "model.safetensors")

    config = json.loads((a / "config.json").read_text())
    assert config["model_type"] == "qwen3_moe"
    assert config.get("num_experts", config.get("num_local_experts")) == 16
    assert config["num_experts_per_tok"] == 2
    assert config["head_dim"] in (32, 64, 80, 96, 112, 128)  # sizes the CPU attention supports


def test_reused_when_present_and_rebuilt_when_spec_changes(tmp_path):
    out = build_tiny_moe(tmp_path / "m", TinyMoESpec(seed=1))
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    assert build_tiny_moe(out, TinyMoESpec(seed=1)) == out
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime
    build_tiny_moe(out, TinyMoESpec(seed=2))
    assert json.loads((out / MARKER).read_text())["spec"]["seed"] == 2


def test_tokenizer_and_chat_template(tmp_path):
    from transformers import AutoTokenizer

    out = build_tiny_moe(tmp_path / "m", TinyMoESpec(seed=3))
    tok = AutoTokenizer.from_pretrained(out)
    text = "Hello world, the expert router 42!"
    assert tok.decode(tok.encode(text)) == text  # byte-level BPE round-trips any text
    assert tok.decode(tok.encode("ünïcödé ✓")) == "ünïcödé ✓"
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert rendered.endswith("<|im_start|>assistant\n")
    assert tok.eos_token == "<|im_end|>"
