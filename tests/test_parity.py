"""The parity harness must pass a faithful export and FAIL a perturbed one."""

from __future__ import annotations

import json
import math
from xml.etree import ElementTree as ET

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from toolkit import parity
from toolkit.errors import InvalidModelError, ToolkitError

SETTINGS = parity.ParitySettings(batch_sizes=(1, 3), prompt_len=8, decode_steps=3, perplexity_tokens=0)


def _perturbed_copy(path, out, scale: float, seed: int = 0):
    """Copy of the model with noise added to its largest weight."""
    model = onnx.load(str(path))
    init = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    w = numpy_helper.to_array(init).copy()
    w += scale * np.random.default_rng(seed).standard_normal(w.shape).astype(w.dtype)
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    onnx.save(model, str(out))
    return init.name


@pytest.mark.parametrize("spec", ["llama", "gpt2", "hf:qwen2"])
def test_faithful_export_passes(spec, exported):
    src, path = exported(spec)
    report = parity.check(src, path, SETTINGS)
    assert report.passed, report.to_json()
    logits = [r for r in report.records if r.name == "logits"]
    # one prefill and one decode record per batch size
    assert len(logits) == 4
    assert all(r.top1_agreement == 1.0 and r.max_abs < 1e-4 for r in logits)
    assert any(r.name.startswith("present.") for r in report.records)


def test_perturbed_model_fails(exported, tmp_path):
    src, path = exported("llama")
    bad = tmp_path / "perturbed.onnx"
    _perturbed_copy(path, bad, scale=1e-2)
    report = parity.check(src, bad, SETTINGS)
    assert not report.passed
    failing = [r for r in report.records if not r.passed]
    assert any(r.name == "logits" and any("max abs" in f for f in r.failures) for r in failing)


def test_tiny_perturbation_is_caught_by_tight_threshold_only(exported, tmp_path):
    src, path = exported("llama")
    bad = tmp_path / "slightly.onnx"
    _perturbed_copy(path, bad, scale=1e-6)
    assert parity.check(src, bad, SETTINGS).passed
    strict = parity.check(src, bad, SETTINGS, overrides={"logits_max_abs": 1e-9})
    assert not strict.passed


def test_report_formats(exported, tmp_path):
    src, path = exported("llama")
    report = parity.check(src, path, SETTINGS)
    data = json.loads(report.to_json())
    assert data["passed"] is True and data["profile"] == "fp32"
    rec = data["records"][0]
    for key in ("max_abs", "max_rel", "cosine", "histogram", "top1_agreement", "kl_mean"):
        assert key in rec
    assert sum(rec["histogram"]) > 0
    suite = ET.fromstring(report.to_junit())
    assert suite.tag == "testsuite" and int(suite.get("failures")) == 0
    assert len(suite.findall("testcase")) == len(report.records) + 1


def test_compare_metrics_against_numpy():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((4, 50)).astype(np.float32)
    b = a + 1e-3 * rng.standard_normal(a.shape).astype(np.float32)
    rec = parity.compare_logits("p", a[None], b[None], np.ones((1, 4), bool))
    assert rec.max_abs == pytest.approx(np.abs(a.astype(np.float64) - b).max())
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    cos = float((a64 * b64).sum() / np.linalg.norm(a64) / np.linalg.norm(b64))
    assert rec.cosine == pytest.approx(cos, rel=1e-12)
    p = np.exp(a64 - a64.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    q = np.exp(b64 - b64.max(-1, keepdims=True))
    q /= q.sum(-1, keepdims=True)
    kl = (p * (np.log(p) - np.log(q))).sum(-1)
    assert rec.kl_mean == pytest.approx(kl.mean(), rel=1e-9)
    assert rec.top1_agreement == np.mean(a.argmax(-1) == b.argmax(-1))
    nan = parity.compare("x", "p", a, np.where(a > 0, np.nan, a))
    assert math.isinf(nan.max_abs)  # a NaN where the reference has none is a failure, never ignored


def test_truncated_onnx_is_a_clear_error(exported, tmp_path):
    _, path = exported("llama")
    bad = tmp_path / "truncated.onnx"
    bad.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    with pytest.raises(InvalidModelError, match="truncated"):
        parity.load_onnx(bad)


def test_unknown_threshold_and_profile(exported):
    src, path = exported("llama")
    with pytest.raises(ToolkitError, match="known thresholds"):
        parity.check(src, path, SETTINGS, overrides={"nope": 1.0})
    with pytest.raises(ToolkitError, match="profile"):
        parity.check(src, path, SETTINGS, profile="int3")


def test_original_of_another_shape_is_a_named_error(exported):
    """An ORIGINAL whose vocabulary or layer count differs from what the ONNX model
    recorded at export is refused before anything runs (it used to end in an ORT
    Gather error, or compare only the first layers' caches)."""
    from toolkit import sources

    _, path = exported("llama")
    src = exported("llama")[0]
    for overrides, field in (({"vocab_size": src.vocab_size * 2}, "vocab_size"),
                             ({"num_layers": src.num_layers + 2}, "num_layers")):
        other = sources.resolve("llama", overrides=overrides)
        with pytest.raises(ToolkitError, match=f"exported from llama with {field} .*the original 'llama' has"):
            parity.check(other, path, SETTINGS)
    gpt2 = sources.resolve("gpt2", overrides={"vocab_size": src.vocab_size, "num_layers": src.num_layers})
    with pytest.raises(ToolkitError, match="exported from llama \\(family llama\\); the original 'gpt2' is family gpt2"):
        parity.check(gpt2, path, SETTINGS)
    # random weights of another seed are another model (a numeric FAIL before)
    with pytest.raises(ToolkitError, match="drawn with seed 0; the original 'llama' uses seed 1") as err:
        parity.check(sources.resolve("llama", seed=1), path, SETTINGS)
    assert err.value.hint == "pass --seed 0"


def test_fixed_capacity_model_runs_fit_its_cache(exported):
    """A --kv-capacity model smaller than the default runs: decode steps, the greedy
    record and the perplexity window are cut to the cache (it used to overflow with a
    'cache is full' error), and a cache smaller than the prompt is a named error."""
    from passes import run_pipeline

    src, path = exported("llama")
    settings = parity.ParitySettings(batch_sizes=(1,), prompt_len=8, decode_steps=40, perplexity_tokens=0,
                                     greedy_prompts=2, greedy_tokens=64, greedy_prompt_len=32)
    for capacity, want in ((32, {"decode_steps": 24, "greedy_prompt_len": 16, "greedy_tokens": 16}),
                           (8, None)):
        model, _ = run_pipeline(onnx.load(str(path)), ["kv-cache"],
                                {"kv-cache": {"scheme": "int8", "capacity": str(capacity)}})
        fixed = path.parent / f"cap{capacity}.onnx"
        onnx.save(model, str(fixed))
        if want is None:
            with pytest.raises(ToolkitError, match="holds 8 tokens; parity needs at least 9"):
                parity.check(src, fixed, settings)
            continue
        report = parity.check(src, fixed, settings)
        assert report.settings["capacity"] == capacity
        assert {k: report.settings[k] for k in want} == want
        assert any(r.phase == "greedy[2x16]" for r in report.records)
        assert report.passed, [r.failures for r in report.records if r.failures]


def test_top1_gate_forgives_near_ties_only():
    """A flipped argmax counts against the top-1 gate only when the reference held the
    two tokens at least top1_tie_margin apart; the raw agreement is still reported."""
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((1, 20, 50)).astype(np.float32)
    ref[0, :, 7] = 5.0  # token 7 wins every position...
    ref[0, 3, 9] = 5.0 - 2e-4  # ...position 3 by a hair
    ref[0, 11, 9] = 4.0  # ...position 11 by a whole logit
    got = ref.copy()
    got[0, 3, 9] += 1e-3  # a small error flips the near tie
    keep = np.ones((1, 20), bool)
    th = parity.THRESHOLDS["kv-int8"]
    near = parity.compare_logits("decode", ref, got, keep)
    assert near.top1_agreement == pytest.approx(19 / 20) and near.top1_positions == 20
    assert near.top1_flip_margins == [pytest.approx(2e-4, rel=1e-2)]
    parity.apply_thresholds(near, th)
    assert near.passed, near.failures
    got[0, 11, 9] += 2.0  # a decisive flip: a wrong kernel
    far = parity.compare_logits("decode", ref, got, keep)
    parity.apply_thresholds(far, th)
    assert any("top-1 agreement 0.9500 < 0.99" in f for f in far.failures), far.failures


def test_low_rank_with_a_quantized_cache_is_judged_by_fp32(exported, tmp_path):
    """A quantized cache records its own (looser) profile; combined with lossy low-rank
    weights those bounds hid the low-rank loss (kivi2 + --param-budget 0.5 passed at
    +3.8% perplexity). The combination gets fp32, as low-rank alone does, with a note."""
    import onnx

    from passes.pipeline import run_pipeline
    from toolkit.report import render_html

    assert parity.default_profile({"toolkit.parity_profile": "kv-2bit"}) == ("kv-2bit", None)
    assert parity.default_profile({"toolkit.low_rank": "{}"}) == ("fp32", None)
    # --float16 records fp16; with low-rank weights too the note names it, not a cache
    profile, note = parity.default_profile({"toolkit.parity_profile": "fp16", "toolkit.low_rank": "{}",
                                            "toolkit.float16": "1"})
    assert profile == "fp32" and "not --float16's fp16" in note and "cache" not in note
    src, path = exported("llama")
    kv = {"kv-cache": {"scheme": "kivi2", "group": "8", "residual": "8"}}
    both, _ = run_pipeline(onnx.load(str(path)), ["kv-cache", "low-rank", "cleanup"],
                           {**kv, "low-rank": {"rank_ratio": "0.5"}})
    onnx.save(both, str(tmp_path / "both.onnx"))
    report = parity.check(src, tmp_path / "both.onnx", SETTINGS)
    assert report.profile == "fp32" and report.thresholds == parity.THRESHOLDS["fp32"]
    assert "not the KV cache's kv-2bit" in report.profile_note and not report.passed
    assert report.to_dict()["profile_note"] == report.profile_note
    assert "low-rank weights are lossy" in render_html(report)
    explicit = parity.check(src, tmp_path / "both.onnx", SETTINGS, profile="kv-2bit")  # the user's choice stands
    assert explicit.profile == "kv-2bit" and explicit.profile_note is None
    cache_only, _ = run_pipeline(onnx.load(str(path)), ["kv-cache", "cleanup"], kv)
    onnx.save(cache_only, str(tmp_path / "kv.onnx"))
    report = parity.check(src, tmp_path / "kv.onnx", SETTINGS)
    assert report.profile == "kv-2bit" and report.profile_note is None
    # the random model's logits are nearly flat: the quantized-cache verdict says it is weak
    assert report.notes and "nearly flat (median std 0.1" in report.notes[0]
    assert "note0" in report.to_junit() and report.to_dict()["notes"] == report.notes
    assert not parity.check(src, tmp_path / "both.onnx", SETTINGS).notes  # fp32: no tie margin to speak of
    # the settings recorded are those that ran: the quantized cache's default greedy record
    # (32 prompts), and no perplexity tokens for a source without held-out text
    assert report.settings["greedy_prompts"] == (32 if SETTINGS.greedy_prompts is None else SETTINGS.greedy_prompts)
    assert report.settings["perplexity_tokens"] == 0 and report.perplexity is None


def test_parity_lengths_that_cannot_run_are_named(exported, tmp_path):
    """--prompt-len 0, --batch-sizes 0, --threads 0 and a prompt past the positions the
    model was built for ended in ORT / NumPy tracebacks."""
    import argparse

    from toolkit.commands._common import add_parity_args, parity_settings
    from toolkit.errors import ToolkitError

    parser = argparse.ArgumentParser()
    add_parity_args(parser)
    for argv, message in ((["--prompt-len", "0"], "--prompt-len must be >= 1, got 0"),
                          (["--batch-sizes", "1,0"], "must list batch sizes >= 1"),
                          (["--decode-steps", "-1"], "--decode-steps must be >= 0"),
                          (["--threads", "0"], "--threads must be >= 1, got 0"),
                          (["--greedy", "2", "--greedy-tokens", "0"], "--greedy-tokens must be >= 1, got 0")):
        with pytest.raises(ToolkitError, match=message):
            parity_settings(parser.parse_args(argv))
    src, path = exported("gpt2")  # 128 positions
    long = parity.ParitySettings(batch_sizes=(1,), prompt_len=126, decode_steps=3, perplexity_tokens=0)
    with pytest.raises(ToolkitError, match="need 129 positions; the model was built for 128"):
        parity.check(src, path, long)
    # A quantized cache checked by prefill alone (full precision) would pass a broken cache.
    import onnx

    from passes import run_pipeline

    src, path = exported("llama")
    kv, _ = run_pipeline(onnx.load(str(path)), ["kv-cache"], {"kv-cache": {"scheme": "int8"}})
    kv_path = tmp_path / "kv_int8.onnx"
    onnx.save(kv, str(kv_path))
    blind = parity.ParitySettings(batch_sizes=(1,), prompt_len=6, decode_steps=0, greedy_prompts=0)
    with pytest.raises(ToolkitError, match="nothing in this run reads the quantized KV cache"):
        parity.check(src, kv_path, blind)


def test_logit_statistics_in_chunks_equal_those_of_the_whole(monkeypatch):
    """compare_logits accumulates over chunks of rows (greedy[32x128] held every step's
    logits of both models and compared them whole: about 7 GB at V = 32000). The record
    equals the whole-array formulas, computed here directly, with NaN rows and flips."""
    rng = np.random.default_rng(3)
    ref = rng.normal(0, 3, (5, 7, 50)).astype(np.float32)
    got = (ref + rng.normal(0, 0.4, ref.shape)).astype(np.float32)
    got[1, 2, 4] = np.nan
    keep = rng.random((5, 7)) < 0.8
    monkeypatch.setattr(parity.LogitStats, "ROW_ELEMENTS", 3 * 50)  # chunks of 3 rows
    rec = parity.compare_logits("p", ref, got, keep)
    r, g = ref[keep].astype(np.float64), got[keep].astype(np.float64)
    diff = np.abs(r - g)
    finite = np.isfinite(diff)
    assert rec.shape == [5, 7, 50] and rec.top1_positions == len(r)
    assert rec.max_abs == math.inf and rec.max_rel == math.inf  # a NaN in one model only
    np.testing.assert_allclose(rec.cosine, np.dot(r[finite], g[finite]) /
                               (np.linalg.norm(r[finite]) * np.linalg.norm(g[finite])), rtol=1e-12)
    assert rec.histogram == np.histogram(diff[finite], bins=parity.HIST_EDGES)[0].tolist()
    lp = r - r.max(-1, keepdims=True) - np.log(np.exp(r - r.max(-1, keepdims=True)).sum(-1, keepdims=True))
    lq = g - g.max(-1, keepdims=True) - np.log(np.exp(g - g.max(-1, keepdims=True)).sum(-1, keepdims=True))
    assert np.isnan((np.exp(lp) * (lp - lq)).sum(-1)).any()
    assert np.isnan(rec.kl_mean) and np.isnan(rec.kl_max)  # the NaN row, as before
    rt, gt = ref[keep].argmax(-1), got[keep].argmax(-1)
    assert rec.top1_agreement == np.mean(rt == gt) < 1
    assert sorted(rec.top1_flip_margins) == sorted(float(ref[keep][i, rt[i]] - ref[keep][i, gt[i]])
                                                   for i in np.nonzero(rt != gt)[0])
    np.testing.assert_allclose(rec.ref_logit_std, np.median(r.std(-1)), rtol=1e-12)
    got[1, 2, 4] = ref[1, 2, 4]  # finite everywhere: the maxima and KL too
    rec = parity.compare_logits("p", ref, got, keep)
    g = got[keep].astype(np.float64)
    lq = g - g.max(-1, keepdims=True) - np.log(np.exp(g - g.max(-1, keepdims=True)).sum(-1, keepdims=True))
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    np.testing.assert_allclose([rec.kl_mean, rec.kl_max], [kl.mean(), kl.max()], rtol=1e-10)
    assert rec.max_abs == np.abs(r - g).max() and rec.max_rel == (np.abs(r - g) / np.maximum(np.abs(r), 1e-6)).max()
    with pytest.raises(ToolkitError, match="no logit positions to compare"):  # it would pass every bound
        parity.compare_logits("p", ref, ref + 1, np.zeros((5, 7), bool))


def test_cache_outputs_are_compared_where_the_attention_mask_keeps_them():
    """A padding position's key and value get weight zero in every attention: a finite
    value stored there is not compared (an SDPA export differs from the eager reference
    only there, tests/passes/test_kv_cache_sdpa.py), a NaN there is (0 x NaN is NaN), and
    a kept position is."""
    import torch

    rng = np.random.default_rng(0)
    k, v = (rng.standard_normal((2, 3, 5, 4)).astype(np.float32) for _ in range(2))
    mask = np.ones((2, 5), np.int64)
    mask[1, :2] = 0  # row 1: two left-padding positions
    got_k, got_v = k.copy(), v.copy()
    got_k[1, :, :2] += 7.0  # differs at padding only
    recs = parity._compare_presents("p", [(torch.from_numpy(k), torch.from_numpy(v))],
                                    {"present.0.key": got_k, "present.0.value": got_v}, mask)
    assert [r.name for r in recs] == ["present.0.key", "present.0.value"]
    assert recs[0].max_abs == 0.0 and recs[0].shape == [2, 3, 5, 4]
    got_v[1, 2, 0, 1] = np.nan  # at padding, but read with weight zero: 0 x NaN is NaN
    recs = parity._compare_presents("p", [(torch.from_numpy(k), torch.from_numpy(v))],
                                    {"present.0.key": got_k, "present.0.value": got_v}, mask)
    assert recs[0].max_abs == 0.0 and math.isinf(recs[1].max_abs)
    got_k[0, 1, 3, 2] += 0.5  # a kept position
    recs = parity._compare_presents("p", [(torch.from_numpy(k), torch.from_numpy(v))],
                                    {"present.0.key": got_k, "present.0.value": got_v}, mask)
    assert recs[0].max_abs == pytest.approx(0.5)
