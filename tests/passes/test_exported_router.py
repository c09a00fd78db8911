"""``fuse-softmax-topk`` on graphs exported by ``torch.onnx.export(..., dynamo=True)``.

Forms the dynamo exporter (torch 2.13) emits, and the rule that matches each:

* ``topk(logits) -> softmax(values)`` (Mistral-style router)
  -> ``TopK -> Softmax`` : TopKSoftmaxRouter (normalize=1)
* ``softmax(logits / t) -> topk`` (sampling head)
  -> ``Div -> Softmax(axis=-1) -> TopK`` : SoftmaxTopK[Div] (temperature=t)
* ``softmax(logits, dim=1) -> topk -> w / w.sum(-1, keepdim=True)`` (HF Mixtral)
  -> ``Softmax(axis=1) on rank 2 -> TopK -> ReduceSum -> Div``: SoftmaxTopK then
  RenormalizedSoftmaxTopK (normalize=1)
* fp16 model, ``softmax(w, dim=-1, dtype=torch.float)``
  -> ``Softmax`` in fp16 *then* ``Cast(float)`` (not Cast then Softmax):
  SoftmaxTopK[Cast] / TopKSoftmaxRouter, and RenormalizedSoftmaxTopK[Cast].
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from passes import run_pipeline
from test_softmax_topk_pass import fused_nodes, run_original, run_rewritten

torch = pytest.importorskip("torch")


class RouterAndSamplingHead(torch.nn.Module):
    def __init__(self, hidden=16, experts=8, vocab=32, top_k=2, temperature=0.7):
        super().__init__()
        self.gate = torch.nn.Linear(hidden, experts, bias=False)
        self.head = torch.nn.Linear(hidden, vocab)
        self.top_k = top_k
        self.temperature = temperature

    def forward(self, h):
        router_logits = self.gate(h)
        # Mistral-style router: top-k on logits, softmax over the k values.
        weights, experts = torch.topk(router_logits, self.top_k, dim=-1)
        weights = torch.softmax(weights, dim=-1, dtype=torch.float)
        # HF Mixtral / Qwen2-MoE: softmax, top-k, renormalise.
        probs = torch.softmax(router_logits, dim=1, dtype=torch.float)
        renorm, renorm_experts = torch.topk(probs, self.top_k, dim=-1)
        renorm = renorm / renorm.sum(dim=-1, keepdim=True)
        # Sampling head with temperature.
        token_probs = torch.softmax(self.head(h) / self.temperature, dim=-1)
        token_p, token_ids = torch.topk(token_probs, 5, dim=-1)
        return weights, experts, renorm, renorm_experts, token_p, token_ids


def _export(module: torch.nn.Module, example: torch.Tensor) -> onnx.ModelProto:
    torch.manual_seed(0)
    program = torch.onnx.export(module.eval(), (example,), dynamo=True, verbose=False)
    return program.model_proto


@pytest.fixture(scope="module")
def fp32_model() -> onnx.ModelProto:
    torch.manual_seed(0)
    return _export(RouterAndSamplingHead(), torch.randn(6, 16))


def test_exported_fp32_router_and_head_fuse(fp32_model):
    out, report = run_pipeline(fp32_model, explain=True)
    result = report["fuse-softmax-topk"]
    assert result.count == 3, result.explanations
    assert result.details["rules"] == {
        "TopKSoftmaxRouter": 1,
        "SoftmaxTopK[Div]": 1,
        "SoftmaxTopK": 1,
        "RenormalizedSoftmaxTopK": 1,
    }
    ops = {n.op_type for n in out.graph.node}
    assert not ops & {"Softmax", "TopK", "ReduceSum", "Div"}
    normalize = sorted(
        onnx.helper.get_attribute_value(a)
        for n in fused_nodes(out)
        for a in n.attribute
        if a.name == "normalize"
    )
    assert normalize == [0, 1, 1]
    onnx.checker.check_model(out, full_check=True)

    feeds = {"h": np.random.default_rng(1).standard_normal((6, 16)).astype(np.float32)}
    expected = run_original(fp32_model, feeds)
    actual = run_rewritten(out, feeds)
    for name, want in expected.items():
        if np.issubdtype(want.dtype, np.integer):
            np.testing.assert_array_equal(actual[name], want, err_msg=name)
        else:
            np.testing.assert_allclose(actual[name], want, rtol=1e-5, atol=1e-6, err_msg=name)


def test_exported_fp16_router_fuses():
    torch.manual_seed(0)
    module = RouterAndSamplingHead().half()
    model = _export(module, torch.randn(6, 16, dtype=torch.float16))
    out, report = run_pipeline(model, explain=True)
    result = report["fuse-softmax-topk"]
    assert result.count == 3, (result.details, result.explanations)
    assert "RenormalizedSoftmaxTopK[Cast]" in result.details["rules"]
    assert not {n.op_type for n in out.graph.node} & {"Softmax", "TopK"}
    onnx.checker.check_model(out, full_check=True)
