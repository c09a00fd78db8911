"""The CLI end to end, as a user runs it (subprocesses, exit codes, files on disk)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest


def toolkit(*args, cwd=None, timeout=600):
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, "-m", "toolkit", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout, env=env)


def test_help_is_fast_and_lists_commands():
    start = time.perf_counter()
    r = toolkit("--help")
    elapsed = time.perf_counter() - start
    assert r.returncode == 0
    for cmd in ("export", "convert", "parity", "inspect", "list-passes"):
        assert cmd in r.stdout
    # heavy imports (torch, onnxruntime) must not happen for --help
    assert elapsed < 5, elapsed


def test_unknown_model_is_one_paragraph_error(tmp_path):
    r = toolkit("export", "nosuchmodel", "-o", str(tmp_path / "m.onnx"))
    assert r.returncode == 2
    assert "unknown model 'nosuchmodel'" in r.stderr and "llama" in r.stderr
    assert "Traceback" not in r.stderr
    assert not list(tmp_path.iterdir())


def test_missing_path_and_not_a_model_dir(tmp_path):
    r = toolkit("export", "./does/not/exist", "-o", str(tmp_path / "m.onnx"))
    assert r.returncode == 2 and "does not exist" in r.stderr
    (tmp_path / "empty").mkdir()
    r = toolkit("export", str(tmp_path / "empty"), "-o", str(tmp_path / "m.onnx"))
    assert r.returncode == 2 and "no config.json" in r.stderr


@pytest.mark.parametrize(("args", "message"), [
    (("--schemes", "int9"), "argument --schemes: unknown 'int9': use a comma-separated list of int8,"),
    (("--schemes", ""), "argument --schemes: empty list"),
    (("--gqa-quant", "int8_per_tensor"),
     "argument --gqa-quant: unknown 'int8_per_tensor': use a comma-separated list of per_channel, per_tensor"),
    (("--context", "1k"), "argument --context: expected comma-separated integers, got '1k'"),
])
def test_bench_attention_names_a_bad_list_value(args, message):
    r = toolkit("bench", "attention", *args, timeout=60)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_corrupt_onnx_for_inspect_and_parity(tmp_path):
    (tmp_path / "empty.onnx").write_bytes(b"")
    r = toolkit("inspect", str(tmp_path / "empty.onnx"))
    assert r.returncode == 2 and "is empty (0 bytes)" in r.stderr, r.stderr
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage" * 10)
    for args in (("inspect", str(bad)), ("parity", "llama", str(bad))):
        r = toolkit(*args)
        assert r.returncode == 2, r.stderr
        assert "not a valid ONNX model" in r.stderr and "Traceback" not in r.stderr
    # Not ONNX files at all: a model directory, a directory, a JSON file (said as such,
    # not as a truncated model or with a model.onnx that does not exist).
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    for target, message in ((tmp_path / "hf", "is a model directory (config.json), not an ONNX model"),
                            (tmp_path, "is a directory without model.onnx"),
                            (tmp_path / "hf" / "config.json", "config.json' is not an ONNX model (.json file)")):
        r = toolkit("inspect", str(target))
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_convert_end_to_end_and_inspect(tmp_path):
    out = tmp_path / "llama-out"
    r = toolkit("convert", "llama", "-o", str(out), "--decode-steps", "2", "--batch-sizes", "1,2")
    assert r.returncode == 0, r.stderr
    # no custom op in the default pipeline's output for this model: no library in the bundle
    assert sorted(p.name for p in out.iterdir()) == ["genai_config.json", "manifest.json", "model.onnx", "parity.html", "parity.json", "passes.json"]
    report = json.loads((out / "parity.json").read_text())
    assert report["passed"] is True
    # no staging directories left behind
    assert [p.name for p in tmp_path.iterdir()] == ["llama-out"]

    r = toolkit("inspect", str(out / "model.onnx"), "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    from models import build

    cfg = build("llama").config
    assert info["kv_cache"]["layers"] == cfg.num_layers
    assert info["kv_cache"]["bytes_per_token"] == cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * 4

    # an existing output directory is refused, and left untouched
    before = (out / "model.onnx").stat().st_mtime_ns
    r = toolkit("convert", "llama", "-o", str(out))
    assert r.returncode == 2 and "already exists" in r.stderr
    assert (out / "model.onnx").stat().st_mtime_ns == before

    # parity as its own command, with JSON and JUnit outputs; ORIGINAL settings come from metadata
    r = toolkit("parity", "llama", str(out / "model.onnx"), "--decode-steps", "2",
                "--json", str(tmp_path / "p.json"), "--junit", str(tmp_path / "p.xml"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads((tmp_path / "p.json").read_text())["passed"] is True
    assert (tmp_path / "p.xml").read_text().startswith("<testsuite")


def test_parity_exit_code_is_1_on_failure(exported, tmp_path):
    _, path = exported("gpt2")
    r = toolkit("parity", "gpt2", str(path), "--decode-steps", "1", "--threshold", "logits_max_abs=0")
    # bit-exactness is not expected between ORT and PyTorch: a zero threshold must fail
    assert r.returncode == 1, r.stdout + r.stderr
    assert "FAIL" in r.stdout


def test_unknown_pass_name_lists_known_ones(tmp_path):
    r = toolkit("convert", "llama", "-o", str(tmp_path / "o"), "--passes", "no-such-pass")
    assert r.returncode == 2
    assert "no-such-pass" in r.stderr and "fuse-softmax-topk" in r.stderr
    assert not list(tmp_path.iterdir()), "a failed convert must leave nothing behind"


def test_list_passes():
    r = toolkit("list-passes")
    assert r.returncode == 0 and "fuse-softmax-topk" in r.stdout


def test_model_with_custom_ops_needs_the_library(exported, tmp_path):
    from passes import run_pipeline

    _, path = exported("llama")
    head, _ = run_pipeline(onnx.load(str(path)), ["sampling-head"])
    fused = tmp_path / "head.onnx"
    onnx.save(head, str(fused))
    env = dict(os.environ, TOOLKIT_OPS_LIBRARY=str(tmp_path / "missing.so"))
    r = subprocess.run([sys.executable, "-m", "toolkit", "parity", "llama", str(fused), "--decode-steps", "1"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2
    assert "missing.so" in r.stderr and "Traceback" not in r.stderr


def test_convert_with_quantized_kv_cache(tmp_path):
    """--kv-cache end to end: the bundle's cache I/O, parity (greedy record), inspect, generate."""
    out = tmp_path / "kv"
    r = toolkit("convert", "llama", "-o", str(out), "--kv-cache", "kivi4", "--kv-group", "8", "--kv-residual", "16",
                "--batch-sizes", "1,2", "--decode-steps", "20", "--greedy", "4", "--greedy-tokens", "24")
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads((out / "parity.json").read_text())
    assert report["passed"] is True and report["profile"] == "kv-int4"
    # random weights: logits about 0.17 apart, so the report says its verdict is weak
    assert len(report["notes"]) == 1 and "the reference logits are nearly flat" in report["notes"][0]
    assert "nearly flat" in (out / "parity.html").read_text()
    phases = [rec["phase"] for rec in report["records"]]
    assert "greedy[4x24]" in phases
    assert (out / "libtoolkit_ops.so").exists()

    r = toolkit("inspect", str(out / "model.onnx"), "--json")
    assert r.returncode == 0, r.stderr
    kv = json.loads(r.stdout)["kv_cache"]
    r = toolkit("inspect", str(out), "--json")  # the bundle directory names its model.onnx
    assert r.returncode == 0 and json.loads(r.stdout)["kv_cache"] == kv, r.stderr
    r = toolkit("parity", "llama", str(out), "--batch-sizes", "1", "--decode-steps", "2", "--greedy", "0")  # so does parity
    assert r.returncode == 0 and "PASS" in r.stdout, r.stdout + r.stderr
    from models import build
    from toolkit.ops.kv_quant import scheme_for

    cfg = build("llama").config
    scheme = scheme_for("kivi4", cfg.head_dim, 8, 16)
    assert kv["scheme"] == "kivi4"
    assert kv["bytes_per_token"] == cfg.num_layers * scheme.bytes_per_token(cfg.num_kv_heads, cfg.head_dim)
    # G=8: per value 0.5 byte of code + (2+2 bytes of scale/zero) / 8 = 1 byte: 4x smaller
    # than float32 (at G=32 it is 0.625 byte: 6.4x).
    assert kv["reduction_vs_fp32"] == pytest.approx(4.0)
    assert "key_q" in kv["tensors_per_layer"] and "key" not in kv["tensors_per_layer"]

    r = toolkit("generate", str(out), "--max-new-tokens", "40", "--prompt-ids", "5,6,7")
    assert r.returncode == 0, r.stdout + r.stderr

    # Bad prompts and lengths are named errors before any model call; one new token
    # is the prefill alone, with no decode rate to report (JSON null, not NaN).
    vocab = cfg.vocab_size
    for args, message in ((("--prompt-ids", ""), "the prompt is empty"),
                          (("--prompt-ids", "5,x"), "'5,x' is not a comma-separated list of integers"),
                          (("--prompt-ids", "5,,6"), "'5,,6' is not a comma-separated list"),  # was [5, 6]
                          (("--prompt-ids", f"5,{vocab}"),
                           f"prompt token ids [{vocab}] are outside the model's vocabulary [0, {vocab})"),
                          (("--prompt-ids", "-1"), "prompt token ids [-1] are outside"),
                          (("--prompt-ids", "5", "--max-new-tokens", "0"), "max_new_tokens must be at least 1"),
                          (("--prompt", "hi", "--prompt-ids", "5"), "--prompt and --prompt-ids both given"),
                          (("--prompt-ids", "5", "--threads", "-2"), "--threads must be >= 1, got -2"),
                          (("--prompt-ids", "5", "--eos-id", str(vocab)), f"eos id {vocab} is outside"),
                          (("--prompt-ids", "5", "--prompt-ids", ""), "prompt 2 of 2 is empty"),
                          (("--prompt", "-", "--prompt", "-"), "--prompt - given more than once")):
        r = toolkit("generate", str(out), *args)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
    # A bundle whose model.onnx was truncated: the bare-file diagnosis, not an ORT traceback.
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    (broken / "model.onnx").write_bytes((out / "model.onnx").read_bytes()[:1000])
    r = toolkit("generate", str(broken), "--prompt-ids", "5")
    assert r.returncode == 2 and "is not a valid ONNX model" in r.stderr and "Traceback" not in r.stderr, r.stderr
    # A bundle path that does not exist: named as such (it was "no tokenizer.json beside" it).
    r = toolkit("generate", str(tmp_path / "nowhere"), "--prompt", "hi")
    assert r.returncode == 2 and "nowhere' does not exist" in r.stderr, r.stderr
    r = toolkit("generate", str(out), "--prompt-ids", "5,6", "--max-new-tokens", "1", "--json")
    assert r.returncode == 0, r.stderr
    one = json.loads(r.stdout)  # null, not NaN (which is not JSON, though Python reads it)
    assert len(one["token_ids"]) == 1 and one["median_step_ms"] is None and one["tokens_per_second"] is None


def test_portable_bundle_generates_the_same_tokens_without_the_library(tmp_path):
    """--portable with a quantized cache and a sampled head: the manifest says portable, and
    ONNX Runtime without the op library (the function bodies) draws the same tokens as the
    bundle's kernels for the same seed."""
    import onnxruntime as ort

    from toolkit import bundle
    from toolkit.generate import greedy

    out = tmp_path / "portable"
    r = toolkit("convert", "llama", "-o", str(out), "--kv-cache", "int8", "--sampling-head", "16", "--sample",
                "--portable", "--batch-sizes", "1", "--decode-steps", "4", "--greedy", "2", "--greedy-tokens", "8")
    assert r.returncode == 0, r.stdout + r.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["portable"] is True
    assert set(manifest["custom_ops"]) == {"com.toolkit::QuantKVAttention", "com.toolkit::SampleTopKTopP"}
    # IR 10 / opset 21 with the library: ORT 1.18; without it, the sampler's uint64 body: ORT 1.21
    assert manifest["runtime"] == {"ir_version": 10, "opset": 21, "min_onnxruntime": "1.18",
                                   "min_onnxruntime_without_op_library": "1.21"}
    plain = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    with_kernels = greedy(bundle.load(out, threads=1), [5, 6, 7], 24, seed=11).token_ids
    assert greedy(plain, [5, 6, 7], 24, seed=11).token_ids == with_kernels


def test_float16_conversion_passes_parity_with_the_fp16_profile_and_loads(tmp_path):
    """--float16: the weights are float16 (half the float32 bytes), parity
    against PyTorch judges it by the fp16 profile (or a quantized cache's, when there is
    one), and the bundle loads and generates."""
    from toolkit import bundle
    from toolkit.generate import greedy

    def weight_bytes(out):
        return sum(onnx.numpy_helper.to_array(t).nbytes for t in onnx.load(str(out / "model.onnx")).graph.initializer)

    runs = {}
    for name, extra in (("fp32", ()), ("fp16", ("--float16",)), ("fp16_int8", ("--float16", "--kv-cache", "int8"))):
        out = tmp_path / name
        r = toolkit("convert", "llama", "-o", str(out), *extra, "--batch-sizes", "1,3", "--decode-steps", "4")
        assert r.returncode == 0, r.stdout + r.stderr
        runs[name] = out
    assert json.loads((runs["fp16"] / "parity.json").read_text())["profile"] == "fp16"
    assert json.loads((runs["fp16_int8"] / "parity.json").read_text())["profile"] == "kv-int8"
    for name in ("fp16", "fp16_int8"):
        model = onnx.load(str(runs[name] / "model.onnx"))
        assert {t.data_type for t in model.graph.initializer if t.dims and math.prod(t.dims) > 1000} == \
            {onnx.TensorProto.FLOAT16}
        assert weight_bytes(runs[name]) < 0.55 * weight_bytes(runs["fp32"])
        assert len(greedy(bundle.load(runs[name], threads=1), [5, 6, 7], 8).token_ids) == 8


def test_unusable_output_paths_are_refused_before_any_work(tmp_path):
    """Output paths publish() cannot use are named errors up front (they used to end in
    FileExistsError / IsADirectoryError / ValueError tracebacks, some after the whole
    export and parity had run)."""
    (tmp_path / "afile").write_text("y")
    (tmp_path / "adir").mkdir()
    (tmp_path / "adir" / "keep.txt").write_text("hi")
    (tmp_path / "sub").mkdir()
    (tmp_path / "adir" / "src").mkdir()
    cases = [
        (("convert", "llama", "-o", "afile/sub"), "'afile' is a file, not a directory"),
        # --overwrite replaces only a previous output: it deleted any directory, even
        # the source model's parent with everything in it
        (("convert", "adir/src", "-o", "adir", "--overwrite"), "--overwrite would delete"),
        (("export", "adir", "-o", "adir/keep.txt", "--overwrite"), "--overwrite would replace 'adir/keep.txt', a file"),
        (("convert", "llama", "-o", "adir", "--overwrite"), "holds files this toolkit did not write"),
        (("convert", "llama", "-o", "afile", "--overwrite"), "output 'afile' is a file; this command writes a dir"),
        (("convert", "llama", "-o", "afile"), "output 'afile' already exists"),
        (("export", "llama", "-o", "afile/m.onnx"), "'afile' is a file, not a directory"),
        (("export", "llama", "-o", "adir", "--overwrite"), "output 'adir' is a directory; this command writes one"),
        (("convert", "llama", "-o", ".", "--overwrite"), "is the current directory or one of its parents"),
        (("convert", "llama", "-o", "sub/..", "--overwrite"), "is the current directory or one of its parents"),
        (("convert", "llama", "-o", "sub/x/.."), "output 'sub/x/..' ends in '..': name the output itself"),
    ]
    for args, message in cases:
        r = toolkit(*args, cwd=tmp_path, timeout=120)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "afile", "sub"]
    assert (tmp_path / "adir" / "keep.txt").read_text() == "hi" and (tmp_path / "adir" / "src").is_dir()
    assert (tmp_path / "afile").read_text() == "y"


def test_report_paths_that_would_destroy_or_fail_are_refused_before_any_work(tmp_path, monkeypatch, capsys):
    """`parity --json MODEL.onnx` replaced the model it had just passed with its JSON; a
    report path that is a directory ended in an IsADirectoryError traceback after the
    whole run. Both, and two flags naming one file, are refused before the run."""
    from toolkit.cli import main

    monkeypatch.chdir(tmp_path)
    onnx.save(onnx.helper.make_model(onnx.helper.make_graph([], "g", [], [])), "model.onnx")
    (tmp_path / "other.onnx").write_bytes(b"x")
    (tmp_path / "adir").mkdir()
    before = (tmp_path / "model.onnx").read_bytes()
    cases = [
        (["parity", "llama", "model.onnx", "--json", "model.onnx"], "would overwrite a model file"),
        (["parity", "llama", "model.onnx", "--junit", "./model.onnx"], "would overwrite a model file"),
        (["parity", "llama", "model.onnx", "--html", "other.onnx"], "would overwrite a model file"),
        (["parity", "llama", "model.onnx", "--json", "adir"], "--json 'adir' is a directory"),
        (["parity", "llama", "model.onnx", "--json", "r.json", "--html", "r.json"], "--json and --html both name"),
        (["parity", "--compare", "a.json", "--html", "a.json"], "would overwrite"),
        (["convert", "llama", "-o", "out", "--junit", "adir"], "--junit 'adir' is a directory"),
        (["bench", "topk", "--json", "adir"], "--json 'adir' is a directory"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)
    assert (tmp_path / "model.onnx").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "model.onnx", "other.onnx"]


def test_bundle_directory_is_readable_and_replaces_a_bundle(tmp_path):
    """A bundle gets a new directory's permissions (mkdtemp's 0700 kept other users,
    e.g. a model server's account, out), and --overwrite of a previous bundle leaves no
    '.NAME.old-PID' behind."""
    old_mask = os.umask(0o022)
    try:
        for extra in ((), ("--overwrite",)):
            r = toolkit("convert", "llama", "-o", "out", *extra, "--passes", "none", "--no-parity",
                        cwd=tmp_path, timeout=300)
            assert r.returncode == 0, r.stderr
    finally:
        os.umask(old_mask)
    assert (tmp_path / "out").is_dir() and (tmp_path / "out" / "model.onnx").is_file()
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_unwritable_outputs_are_named_errors(tmp_path, monkeypatch, capsys):
    """A read-only or permission-less output location ended in an OSError traceback
    (exit 1), for parity --json only after the whole run. As root, permission bits do not
    bind, so the checks are driven through os.access and a command that raises."""
    import errno

    from toolkit import cli, workspace
    from toolkit.errors import OutputExistsError

    real_access = os.access
    monkeypatch.setattr(workspace.os, "access", lambda p, mode: False if str(p) == str(tmp_path) else
                        real_access(p, mode))
    for dest in (tmp_path / "bundle", tmp_path / "new" / "deeper" / "report.json"):
        with pytest.raises(OutputExistsError, match="is not writable") as err:
            workspace.check_writable(dest)
        assert str(tmp_path) in str(err.value)
    assert cli.main(["parity", "llama", str(tmp_path / "m.onnx"), "--json", str(tmp_path / "r.json")]) == 2
    assert "is not writable" in capsys.readouterr().err  # refused before loading anything
    monkeypatch.setattr(workspace.os, "access", real_access)

    def fails(code):
        def run(args):
            raise OSError(code, os.strerror(code), str(tmp_path / "out" / "model.onnx"))
        return run

    from toolkit.commands import inspect as inspect_cmd

    monkeypatch.setattr(inspect_cmd, "run", fails(errno.EROFS))
    assert cli.main(["inspect", "x.onnx"]) == 2
    err = capsys.readouterr().err
    assert f"cannot access {tmp_path / 'out' / 'model.onnx'}: Read-only file system" in err and "Traceback" not in err
    monkeypatch.setattr(inspect_cmd, "run", fails(errno.ENOENT))  # not a file-system refusal: a bug, shown
    with pytest.raises(FileNotFoundError):
        cli.main(["inspect", "x.onnx"])


def test_parity_takes_its_model_path_after_options(tmp_path, capsys):
    """`toolkit parity hf:llama --config k=v out/model.onnx` said 'unrecognized arguments':
    argparse fills optional positionals from their first run only."""
    from toolkit.cli import main

    missing = str(tmp_path / "nowhere" / "model.onnx")
    assert main(["parity", "hf:llama", "--config", "num_hidden_layers=1", missing]) == 2
    assert f"ONNX file {missing!r} does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a third positional is still an error
        main(["parity", "hf:llama", "--config", "num_hidden_layers=1", missing, "extra.onnx"])
    assert "unrecognized arguments: extra.onnx" in capsys.readouterr().err


def test_portable_with_an_opset_older_than_its_bodies_is_refused_before_export(tmp_path):
    """--portable --opset 18 exported the model and then failed onnx.checker inside the
    pass, blaming a bug in it: the function bodies are opset 21."""
    t0 = time.monotonic()
    r = toolkit("convert", "llama", "-o", str(tmp_path / "o"), "--sampling-head", "8", "--portable", "--opset", "18")
    assert r.returncode == 2 and "--portable writes its function bodies in ONNX opset 21" in r.stderr, r.stderr
    assert "use --opset 21 or newer" in r.stderr and "Traceback" not in r.stderr
    assert not list(tmp_path.iterdir()) and time.monotonic() - t0 < 30  # refused before the export


def test_bundle_runtime_requirements():
    """The oldest ONNX Runtime a bundle needs, from its IR / opset (ORT 1.17 reads IR 9 /
    opset 20, 1.18 IR 10 / opset 21), the op library's C API 17, and for a portable
    bundle run without the library the sampler body's uint64 arithmetic (ORT 1.21)."""
    from toolkit.bundle import _check_runtime_reads, runtime_requirements
    from toolkit.errors import InvalidModelError

    assert runtime_requirements(9, 20, op_library=True, portable_ops=[]) == {
        "ir_version": 9, "opset": 20, "min_onnxruntime": "1.17", "min_onnxruntime_without_op_library": None}
    assert runtime_requirements(8, 18, op_library=False, portable_ops=[])["min_onnxruntime"] == "1.17"
    r = runtime_requirements(10, 21, op_library=True, portable_ops=["FusedSoftmaxTopK", "QuantKVAttention"])
    assert r["min_onnxruntime"] == r["min_onnxruntime_without_op_library"] == "1.18"
    r = runtime_requirements(10, 21, op_library=True, portable_ops=["SampleTopKTopP"])
    assert r["min_onnxruntime_without_op_library"] == "1.21"
    assert runtime_requirements(10, 22, op_library=False, portable_ops=[])["min_onnxruntime"] == "1.20"
    newer = runtime_requirements(13, 25, op_library=False, portable_ops=[])
    assert newer["min_onnxruntime"] is None and "newer than this toolkit's table" in newer["note"]

    manifest = {"model": "model.onnx", "runtime": runtime_requirements(10, 21, op_library=True, portable_ops=[])}
    for have in ("1.18.0", "1.18.1", "1.32.0", "2.0.0"):
        _check_runtime_reads(manifest, Path("b"), have)
    with pytest.raises(InvalidModelError, match=r"IR 10 / opset 21, which ONNX Runtime reads from 1.18; this is "
                       r"onnxruntime 1.17.3") as err:
        _check_runtime_reads(manifest, Path("b"), "1.17.3")
    assert "onnxruntime>=1.18" in err.value.hint and "--opset 20" in err.value.hint
    _check_runtime_reads({"model": "model.onnx"}, Path("b"), "1.17.0")  # (a manifest without the record)


def test_op_library_runtime_requirements_match_objdump():
    """The glibc / libstdc++ versions the manifest records for the op library are the
    newest symbol versions it references, as binutils lists them."""
    import platform
    import re
    import shutil

    from toolkit import ops
    from toolkit.bundle import library_requirements

    req = library_requirements(ops.library_path())
    assert set(req) >= {"glibc", "glibcxx"}
    libc, version = platform.libc_ver()
    assert libc == "glibc"
    def as_tuple(v: str) -> tuple[int, ...]:
        return tuple(int(x) for x in v.split("."))

    assert (2, 2) <= as_tuple(req["glibc"]) <= as_tuple(version)  # it loads here
    objdump = shutil.which("objdump")
    if objdump:  # (binutils is on the CI machines; the bound above holds without it)
        out = subprocess.run([objdump, "-T", str(ops.library_path())], capture_output=True, text=True,
                             check=True).stdout
        for key, prefix in (("glibc", "GLIBC"), ("glibcxx", "GLIBCXX")):
            found = {as_tuple(v) for v in re.findall(rf"\b{prefix}_(\d+(?:\.\d+)+)", out)}
            assert as_tuple(req[key]) == max(found), key


def test_interrupted_generate_says_its_output_is_partial(exported, monkeypatch, capsys):
    """SIGINT during a streamed `toolkit generate` printed "no output was written" (the
    convert message) on the line of the partial text. The streamed line is ended and
    the message says the tokens are partial; commands that publish atomically keep theirs."""
    import toolkit.generate
    from toolkit import cli

    _, path = exported("gpt2")

    def interrupted_after_two_tokens(session, prompts, max_new_tokens, sampling, **kw):
        kw["on_token"](0, 5)
        kw["on_token"](0, 6)
        raise KeyboardInterrupt

    monkeypatch.setattr(toolkit.generate, "generate_batch", interrupted_after_two_tokens)
    assert cli.main(["generate", str(path), "--prompt-ids", "1,2", "--max-new-tokens", "50"]) == 130
    out, err = capsys.readouterr()
    assert out == "5 6\n"
    assert err == "interrupted: the tokens above are a partial completion\n"

    def interrupted_before_any(session, prompts, max_new_tokens, sampling, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(toolkit.generate, "generate_batch", interrupted_before_any)
    assert cli.main(["generate", str(path), "--prompt-ids", "1,2", "--json"]) == 130
    out, err = capsys.readouterr()
    assert out == "" and err == "interrupted\n"


def test_bench_head_stays_inside_the_context_length(tmp_path):
    """bench head decodes with generate, which refuses a run past the model's recorded
    context: the benchmark says so with its own flag."""
    r = toolkit("bench", "head", "--model", "gpt2", "--prompts", "1", "--new-tokens", "100", "--k", "4")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "32-token prompts and --new-tokens 100 need 131 positions; gpt2 was built for 128" in r.stderr
    assert "pass --new-tokens 97 or fewer" in r.stderr


def test_convert_an_onnx_file_that_onnx_runtime_optimized(tmp_path):
    """An ONNX file as MODEL: the passes run on it and parity compares the result with
    --reference. The file is our export after ORT's transformer optimizer, which writes
    RMSNorm as SimplifiedLayerNormalization in the standard domain (no onnx schema):
    every pass refused it as an invalid input, and convert took only PyTorch sources."""
    from onnxruntime.transformers.optimizer import optimize_model

    exported, optimized, out = tmp_path / "x.onnx", tmp_path / "opt.onnx", tmp_path / "out"
    r = toolkit("export", "llama", "-o", str(exported))
    assert r.returncode == 0, r.stderr
    optimize_model(str(exported), model_type="bert", opt_level=1, num_heads=0, hidden_size=0) \
        .save_model_to_file(str(optimized))
    assert ("", "SimplifiedLayerNormalization") in {(n.domain, n.op_type) for n in onnx.load(optimized).graph.node}
    r = toolkit("convert", str(optimized), "-o", str(out), "--kv-cache", "int8", "--sampling-head", "8",
                "--reference", "llama")
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "parity.json").read_text())["passed"]
    ops = {n.op_type for n in onnx.load(out / "model.onnx").graph.node}
    assert {"QuantKVAttention", "FusedSoftmaxTopK", "SimplifiedLayerNormalization"} <= ops
    # the flags that only make sense for one kind of MODEL, refused before any work
    for args, message in (((str(optimized),), "pass --reference MODEL"),
                          ((str(optimized), "--reference", "llama", "--opset", "20"), "keeps its opset"),
                          (("llama", "--reference", "llama"), "--reference is for an ONNX file")):
        r = toolkit("convert", *args, "-o", str(tmp_path / "refused"))
        assert r.returncode == 2 and message in r.stderr, r.stderr
        assert not (tmp_path / "refused").exists()


def test_a_bundle_kept_after_failing_parity_warns_when_loaded_and_can_be_refused(tmp_path):
    """--keep-failed writes a bundle whose manifest says parity failed; a server loading it
    was not told (found by an audit). load warns (ParityFailedWarning, which a server can
    turn into an error) and generate prints one line; a passing bundle loads silently."""
    import warnings

    from toolkit import bundle
    from toolkit.errors import ParityFailedWarning

    out = tmp_path / "failed"
    r = toolkit("convert", "llama", "-o", str(out), "--keep-failed", "--threshold", "logits_max_abs=1e-12")
    assert r.returncode == 0 and (out / "model.onnx").is_file(), r.stderr  # kept: exit 0, verdict FAIL
    assert json.loads((out / "manifest.json").read_text())["parity"]["passed"] is False
    with pytest.warns(ParityFailedWarning, match="failed its parity check at conversion"):
        bundle.load(out, threads=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ParityFailedWarning)
        with pytest.raises(ParityFailedWarning):
            bundle.load(out, threads=1)
    r = toolkit("generate", str(out), "--prompt-ids", "5,6,7", "--max-new-tokens", "2")
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("warning: ") == 1 and "failed its parity check" in r.stderr

    passed = tmp_path / "passed"
    assert toolkit("convert", "llama", "-o", str(passed)).returncode == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", ParityFailedWarning)
        bundle.load(passed, threads=1)

    # require_parity refuses both a failed and an unchecked (--no-parity: null) record; the
    # top-level toolkit.load takes it and session_options, as the README shows (it took
    # neither: TypeError)
    import onnxruntime as ort

    import toolkit as package
    from toolkit.errors import ParityFailure

    so = ort.SessionOptions()
    so.enable_cpu_mem_arena = False
    assert package.load(passed, threads=1, session_options=so, require_parity=True).get_inputs()
    with pytest.raises(ParityFailure, match="parity.passed is false; kept with --keep-failed"):
        package.load(out, require_parity=True)
    manifest = json.loads((passed / "manifest.json").read_text())
    manifest["parity"]["passed"] = None
    (passed / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ParityFailure, match="parity.passed is null; not checked"):
        package.load(passed, require_parity=True)
