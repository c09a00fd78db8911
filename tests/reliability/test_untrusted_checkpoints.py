"""Untrusted checkpoints never execute code: our checkpoints are safetensors, and
Hugging Face directories are loaded by transformers with ``weights_only=True``."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys


class _Payload:
    """A pickle that would create a file when unpickled with full pickle."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_payload_in_hf_directory_is_not_executed(tmp_path):
    model_dir = tmp_path / "evil"
    model_dir.mkdir()
    marker = tmp_path / "pwned"
    (model_dir / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 16, "intermediate_size": 32,
        "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 64}))
    with open(model_dir / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model.embed_tokens.weight": _Payload(str(marker))}, f)
    r = subprocess.run([sys.executable, "-m", "toolkit", "export", str(model_dir), "-o", str(tmp_path / "m.onnx")],
                       capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert r.returncode == 2, r.stdout + r.stderr
    assert not marker.exists(), "unpickling ran attacker code"
    assert "could not load" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "m.onnx").exists()


def test_toolkit_checkpoints_are_safetensors_only():
    from models import CHECKPOINT_ROOT

    files = {p.suffix for p in CHECKPOINT_ROOT.rglob("*") if p.is_file()}
    assert ".safetensors" in files
    assert not files & {".bin", ".pt", ".pth", ".pkl", ".ckpt"}
