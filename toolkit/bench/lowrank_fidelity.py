"""``toolkit bench lowrank-fidelity``: perplexity vs parameter reduction of the ``low-rank`` pass.

On the trained reference model (``llama-stdlib``) the exported graph is factored by
the ``low-rank`` pass at several global parameter budgets, once with plain SVD and
once activation-aware (ASVD), and the held-out perplexity of each result is
measured with ONNX Runtime (the op library registered; prefill over
non-overlapping windows, the same scoring as ``toolkit.parity.perplexity``).

Data split of the held-out text (never seen in training): the first
``calib_tokens`` tokens calibrate the activation statistics; perplexity is scored
on ``eval_tokens`` tokens that start after them, so calibration and evaluation never
overlap.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.errors import ToolkitError

DEFAULT_BUDGETS = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4)


def _perplexity(model_proto: Any, ids: np.ndarray, window: int, past_shapes: dict[str, list[int]]) -> float:
    import onnxruntime as ort

    from toolkit import ops

    so = ops.session_options()
    sess = ort.InferenceSession(model_proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start: start + window + 1]
        if len(chunk) < 2:
            break
        x, y = chunk[None, :-1], chunk[1:]
        S = x.shape[1]
        feeds = {"input_ids": x, "attention_mask": np.ones_like(x),
                 "position_ids": np.arange(S, dtype=np.int64)[None]}
        for name, d in past_shapes.items():
            feeds[name] = np.zeros((1, d[1], 0, d[3]), np.float32)
        logits = sess.run(["logits"], feeds)[0][0].astype(np.float64)
        m = logits.max(-1, keepdims=True)
        logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
        nll -= float(logp[np.arange(len(y)), y].sum())
        count += len(y)
    return math.exp(nll / count)


def _params(model_proto: Any) -> int:
    return int(sum(int(np.prod(i.dims)) for i in model_proto.graph.initializer))


def factored_row(details: dict[str, Any], out: Any, base_params: int) -> dict[str, Any]:
    """The low-rank pass's summary of one factored model (layers, reductions, mean error)."""
    summary = details["summary"]
    errors = [e["reconstruction_error"] for e in details["layers"] if not e["skipped"]]
    return {"factored_layers": summary["factored"], "skipped_layers": summary["skipped"],
            "eligible_param_reduction": summary["param_reduction"],
            "model_param_reduction": 1 - _params(out) / base_params,
            "mean_reconstruction_error": float(np.mean(errors)) if errors else 0.0}


METHODS = {"svd": {}, "asvd": {"activation_aware": True}, "whiten": {"whiten": True}}


def budget_sweep(original: Any, calib_path: Path, budgets: Sequence[float], score: Callable[[Any], dict[str, float]],
                 base_params: int, metric: str, *, higher_is_better: bool, describe: Callable[[dict], str],
                 progress: Callable[[str], None] | None = None, methods: Sequence[str] = tuple(METHODS),
                 extra_options: dict[str, Any] | None = None) -> tuple[list[dict[str, Any]], dict[str, list[bool]]]:
    """Factor ``original`` at each global budget with each method (plain SVD, ASVD,
    whitened SVD) and score each.

    Returns:
        One row per (budget, method) (``score``'s values plus :func:`factored_row`) and,
        per activation-aware method, whether it beat plain SVD on ``metric`` at each budget.
    """
    from passes import run_pipeline

    results = []
    for budget in budgets:
        for method in methods:
            opts = {"param_budget": budget, "calibration_data": str(calib_path), **METHODS[method],
                    **(extra_options or {})}
            out, report = run_pipeline(original, ["low-rank", "cleanup"], {"low-rank": opts})
            row = {"param_budget": budget, "method": method, **score(out),
                   **factored_row(report["low-rank"].details, out, base_params)}
            results.append(row)
            if progress:
                progress(f"budget {budget} {method}: {describe(row)}, eligible weights "
                         f"-{100 * row['eligible_param_reduction']:.1f}%, model "
                         f"-{100 * row['model_param_reduction']:.1f}%")
    wins: dict[str, list[bool]] = {m: [] for m in methods if m != "svd"}
    for budget in budgets:
        pair = {r["method"]: r[metric] for r in results if r["param_budget"] == budget}
        for m in wins:
            wins[m].append(bool(pair[m] > pair["svd"]) if higher_is_better else bool(pair[m] < pair["svd"]))
    return results, wins


def run(model: str = "llama-stdlib", budgets=DEFAULT_BUDGETS, calib_tokens: int = 1024, calib_seq: int = 128,
        eval_tokens: int = 8192, window: int = 256, progress=None) -> dict[str, Any]:
    """Perplexity at each budget for plain and activation-aware SVD; JSON-able result."""
    import onnx

    from toolkit import export, sources

    src = sources.resolve(model)
    if src.tokenizer is None or not src.heldout_text:
        raise ToolkitError(f"{model} ships no tokenizer / held-out text: perplexity is undefined",
                           hint="use a model with held-out text, e.g. --model llama-stdlib")
    ids = np.array(src.tokenizer.encode(src.heldout_text).ids, dtype=np.int64)
    if len(ids) < calib_tokens + 2:
        raise ToolkitError(f"held-out text has {len(ids)} tokens, fewer than calib_tokens={calib_tokens}",
                           hint="use a model with more held-out text")
    calib = ids[:calib_tokens].reshape(-1, calib_seq)
    eval_ids = ids[calib_tokens: calib_tokens + eval_tokens + 1]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        export.export(src, path)
        original = onnx.load(str(path))
        past = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim]
                for i in original.graph.input if i.name.startswith("past")}
        calib_path = Path(tmp) / "calib.npy"
        np.save(calib_path, calib)
        base_ppl = _perplexity(original, eval_ids, window, past)
        base_params = _params(original)
        if progress:
            progress(f"original: perplexity {base_ppl:.3f}, {base_params} parameters")
        results, aware_wins = budget_sweep(
            original, calib_path, budgets, lambda out: {"perplexity": (ppl := _perplexity(out, eval_ids, window, past)),
                                                        "perplexity_rel_increase": (ppl - base_ppl) / base_ppl},
            base_params, "perplexity", higher_is_better=False,
            describe=lambda row: f"perplexity {row['perplexity']:.3f} "
                                 f"({100 * row['perplexity_rel_increase']:+.1f}%)",
            progress=progress)
    return {
        "benchmark": "lowrank-fidelity",
        "model": model,
        "original": {"perplexity": base_ppl, "parameters": base_params},
        "protocol": {
            "calibration": f"first {calib_tokens} held-out tokens as [{calib_tokens // calib_seq}, {calib_seq}]",
            "evaluation": f"{len(eval_ids) - 1} held-out tokens after the calibration ones, windows of {window}, "
                          "prefill, ONNX Runtime CPU with the op library",
            "ranks": "global param_budget over the eligible MatMuls, charged as written (r(K+N) factored, K*N "
                     "dense); greedy by spectrum share times K*N per parameter, a move being one more rank or the "
                     "layer kept dense; the tied LM head is skipped (the embedding keeps the dense matrix)",
            "asvd": "W' = diag(mean|x|**0.5) W (geometric-mean normalised), U = diag(1/s) U'",
            "whiten": "W' = L^T W with L L^T = X^T X / n over the calibration activations (+1e-6 ridge), U = L^-T U'",
        },
        "asvd_beats_svd_at_every_budget": all(aware_wins["asvd"]),
        "whiten_beats_svd_at_every_budget": all(aware_wins["whiten"]),
        "beats_svd_at": {m: [b for b, w in zip(budgets, wins) if w] for m, wins in aware_wins.items()},
        "results": results,
    }
