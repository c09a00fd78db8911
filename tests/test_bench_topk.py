"""``toolkit bench topk`` on a tiny grid: JSON structure, ratios and the correctness guard.

Not a timing test (3 runs): it checks that every contender ran, that the reported
ratios and floor are the ones the per-contender medians give, and that a wrong fused
kernel is refused before anything is timed.
"""

from __future__ import annotations

import json

import pytest

from toolkit.bench import topk


@pytest.fixture(scope="module")
def result():
    return topk.run(vocabs=(1000, 128256), batches=(2,), ks=(5,), threads=(1,), warmup=1, runs=3)


def test_json_structure_and_ratios(result):
    json.dumps(result)
    assert result["benchmark"] == "topk"
    assert set(result["protocol"]) >= {"floor_us", "runs", "warmup"}
    small, large = result["results"]
    for row in (small, large):
        for name in ("fused", "ort_softmax_topk", "ort_topk", "ort_reducemax", "numpy_max"):
            assert row[name]["runs"] == 3 and row[name]["median_us"] > 0, name
        med = {name: row[name]["median_us"] for name in ("fused", "ort_softmax_topk", "ort_topk")}
        # floor_us is the faster single read of the two measured in this run
        assert row["floor_us"] == min(row["ort_reducemax"]["median_us"], row["numpy_max"]["median_us"])
        assert row["speedup_vs_ort_softmax_topk"] == pytest.approx(med["ort_softmax_topk"] / med["fused"])
        assert row["speedup_vs_ort_topk"] == pytest.approx(med["ort_topk"] / med["fused"])
        assert row["fused_over_floor"] == pytest.approx(med["fused"] / row["floor_us"])
        assert row["bytes_read"] == 4 * row["vocab"] * row["batch"]
    # the target applies from V = 128k only
    assert "meets_target" not in small and isinstance(large["meets_target"], bool)
    assert large["meets_target"] == (large["speedup_vs_ort_softmax_topk"] >= topk.TARGET_RATIO
                                     and large["fused_over_floor"] <= topk.TARGET_FLOOR_FACTOR)


def test_a_wrong_fused_kernel_is_refused(monkeypatch):
    """The guard compares the fused op with ORT's Softmax->TopK before timing: a 'fused'
    model that returns the k smallest instead is an error naming the point."""
    from onnx import helper

    real = topk._models

    def wrong(vocab, batch, k):
        models = real(vocab, batch, k)
        from onnx import load_from_string

        m = load_from_string(models["ort_softmax_topk"])
        m.graph.node[1].attribute.append(helper.make_attribute("largest", 0))
        models["fused"] = m.SerializeToString()
        return models

    monkeypatch.setattr(topk, "_models", wrong)
    with pytest.raises(AssertionError, match="V=1000 B=2 k=5"):
        topk.run(vocabs=(1000,), batches=(2,), ks=(5,), threads=(1,), warmup=1, runs=2)


@pytest.mark.parametrize("data", list(topk.DATA))
def test_every_logit_distribution_runs_and_is_recorded(data):
    """The fused op's speed depends on the logits (a sorted row raises the running max in
    every block), so the distribution is an option and written into the JSON; every kind
    passes the float64 correctness guard (benchmark audit)."""
    import numpy as np

    x = topk.make_logits(np.random.default_rng(0), 2, 3000, data)
    assert x.dtype == np.float32 and x.shape == (2, 3000) and np.isfinite(x).all()
    if data == "ascending":
        assert (np.diff(x, axis=1) >= 0).all()
    out = topk.run(vocabs=(3000,), batches=(2,), ks=(1, 7), threads=(1,), warmup=1, runs=2, data=data)
    assert out["data"] == {"name": data, "logits": topk.DATA[data]}
    assert len(out["results"]) == 2
