"""The C++ host example (custom_ops/examples/host): built with CMake, run on a real bundle.

This is how CI compiles the example. The bundle is the trained llama-stdlib with a
FusedSoftmaxTopK sampling head, so the host must register the bundle's
libtoolkit_ops.so for the session to load; its greedy tokens must equal Python's
``toolkit.generate.greedy`` on the same bundle.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "custom_ops" / "examples" / "host"
PROMPT = [5, 17, 300, 42, 7, 1024]
NEW_TOKENS = 12


def _tool(name: str) -> str | None:
    """A build tool from the venv (pip's cmake/ninja) or PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.is_file() else shutil.which(name)


def _ort_library() -> Path:
    import onnxruntime

    libs = sorted((Path(onnxruntime.__file__).parent / "capi").glob("libonnxruntime.so*"))
    if not libs:
        pytest.fail("the onnxruntime package ships no libonnxruntime.so* in capi/")
    return libs[-1]


@pytest.fixture(scope="module")
def host(tmp_path_factory) -> Path:
    cmake, ninja = _tool("cmake"), _tool("ninja")
    if cmake is None or (shutil.which("c++") or shutil.which("g++")) is None:
        pytest.skip("needs cmake and a C++17 compiler")
    build = tmp_path_factory.mktemp("host-build")
    configure = [cmake, "-S", str(SOURCE), "-B", str(build), f"-DORT_LIBRARY={_ort_library()}"]
    if ninja:
        configure += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
    for cmd in (configure, [cmake, "--build", str(build), "-j2"]):
        r = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stdout}\n{r.stderr}"
    binary = build / "toolkit_host"
    assert binary.is_file()
    return binary


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("host-bundle") / "llama"
    r = subprocess.run([sys.executable, "-m", "toolkit", "convert", "llama-stdlib", "-o", str(out),
                        "--sampling-head", "50", "--no-parity"], check=False, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert (out / "libtoolkit_ops.so").is_file()
    return out


def run_host(binary: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(binary), *args], check=False, capture_output=True, text=True, timeout=120)


def test_greedy_tokens_match_python(host, bundle_dir):
    from toolkit import bundle, generate

    r = run_host(host, str(bundle_dir), "--prompt-ids", ",".join(map(str, PROMPT)),
                 "--max-new-tokens", str(NEW_TOKENS), "--threads", "1")
    assert r.returncode == 0, r.stderr
    tokens = [int(t) for t in r.stdout.strip().split(",")]
    expected = generate.greedy(bundle.load(bundle_dir, threads=1), PROMPT, NEW_TOKENS).token_ids
    assert tokens == expected
    assert len(tokens) == NEW_TOKENS


def test_missing_bundle_is_a_clear_error(host, tmp_path):
    r = run_host(host, str(tmp_path / "nope"), "--prompt-ids", "1,2")
    assert r.returncode == 2
    assert "no readable manifest.json" in r.stderr and "fix:" in r.stderr


def test_missing_library_is_a_clear_error(host, bundle_dir, tmp_path):
    broken = tmp_path / "no-lib"
    shutil.copytree(bundle_dir, broken)
    (broken / "libtoolkit_ops.so").unlink()
    r = run_host(host, str(broken), "--prompt-ids", "1,2")
    assert r.returncode == 2
    assert "op library" in r.stderr and "libtoolkit_ops.so is missing" in r.stderr and "fix:" in r.stderr


def test_unregistered_custom_op_is_reported_not_crashed(host, bundle_dir, tmp_path):
    """A manifest that hides the library: ORT's own error comes back as a message, exit 2."""
    import json

    broken = tmp_path / "hidden-lib"
    shutil.copytree(bundle_dir, broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["op_library"] = None
    (broken / "manifest.json").write_text(json.dumps(manifest))
    r = run_host(host, str(broken), "--prompt-ids", "1,2")
    assert r.returncode == 2 and "error: ONNX Runtime" in r.stderr and "FusedSoftmaxTopK" in r.stderr


def test_bad_arguments(host, bundle_dir):
    r = run_host(host, str(bundle_dir))
    assert r.returncode == 2 and "--prompt-ids" in r.stderr
    r = run_host(host, str(bundle_dir), "--prompt-ids", "1,x")
    assert r.returncode == 2 and "expects an integer" in r.stderr


def test_fixed_capacity_cache_bundle_matches_python(host, tmp_path):
    """A --kv-capacity bundle: its cache tensors have static sizes and a lengths [2]
    input with no batch axis; the host zero-fills them for the prefill (it gave the
    lengths a batch axis of 1 and ORT refused: "Got: 1 Expected: 2")."""
    from toolkit import bundle, generate

    out = tmp_path / "cap"
    r = subprocess.run([sys.executable, "-m", "toolkit", "convert", "llama-stdlib", "-o", str(out),
                        "--kv-cache", "int8", "--kv-capacity", "32", "--no-parity"],
                       check=False, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    r = run_host(host, str(out), "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", str(NEW_TOKENS),
                 "--threads", "1")
    assert r.returncode == 0, r.stderr
    tokens = [int(t) for t in r.stdout.strip().split(",")]
    expected = generate.greedy(bundle.load(out, threads=1), PROMPT, NEW_TOKENS).token_ids
    assert tokens == expected and len(tokens) == NEW_TOKENS
    # past the capacity: ORT's error, with the fix for this case
    r = run_host(host, str(out), "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", "40")
    assert r.returncode == 2 and "the cache is full" in r.stderr and "larger --kv-capacity" in r.stderr, r.stderr


def test_context_and_vocabulary_are_checked_up_front(host, bundle_dir):
    """The recorded context length and vocabulary, as `toolkit generate` checks them."""
    from toolkit import bundle

    meta = bundle.load(bundle_dir).get_modelmeta().custom_metadata_map
    context, vocab = int(meta["toolkit.context_length"]), int(meta["toolkit.vocab_size"])
    r = run_host(host, str(bundle_dir), "--prompt-ids", "5,6", "--max-new-tokens", str(context))
    assert r.returncode == 2 and f"need {context + 1} positions; the model was built for {context}" in r.stderr
    r = run_host(host, str(bundle_dir), "--prompt-ids", f"5,{vocab}")
    assert r.returncode == 2 and f"prompt id {vocab} is outside the model's vocabulary [0, {vocab})" in r.stderr


def test_sampled_head_draws_what_python_draws(host, tmp_path):
    """A --sample bundle: the host feeds each call the seed toolkit.generate feeds
    (``call_seed``), so the in-graph draws give the same tokens for the same --seed."""
    from toolkit import bundle, generate

    out = tmp_path / "sampled"
    r = subprocess.run([sys.executable, "-m", "toolkit", "convert", "llama-stdlib", "-o", str(out),
                        "--sampling-head", "40", "--sample", "--pass-option", "sampling-head.temperature=1.5",
                        "--no-parity"],
                       check=False, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    session = bundle.load(out, threads=1)
    runs = {}
    for seed in (7, 8):
        r = run_host(host, str(out), "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", str(NEW_TOKENS),
                     "--threads", "1", "--seed", str(seed))
        assert r.returncode == 0, r.stderr
        runs[seed] = [int(t) for t in r.stdout.strip().split(",")]
        assert runs[seed] == generate.greedy(session, PROMPT, NEW_TOKENS, seed=seed).token_ids
    assert runs[7] != runs[8]
