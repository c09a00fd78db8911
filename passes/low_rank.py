"""``low-rank``: factor constant-weight MatMul(+Add) and Gemm layers by truncated SVD.

For ``y = x · W (+ b)`` with a constant ``W [K, N]`` (attention q/k/v/o, MLP
up/gate/down, LM head) the pass computes ``W ~ U · V`` with ``U [K, r]``,
``V [r, N]`` and writes ``com.toolkit::LowRankMatMul(x, U, V[, b])`` (or, with
``use_op=false``, plain ``MatMul(MatMul(x, U), V)`` that runs anywhere). A ``Gemm``
(Hugging Face GPT-2's Conv1D layers) with ``alpha = beta = 1``, no ``transA`` and a
constant ``[N]`` (or no) ``C`` is the same layer, ``W = B`` or ``B^T`` (``transB``).

Rank per layer, exactly one of:

* ``rank_ratio``: ``r = ceil(rank_ratio * min(K, N))``;
* ``energy``: the smallest r keeping that share of the weight's own spectral
  energy ``sum(s_i^2)`` (the singular values of ``W``, also with ``activation_aware``
  or ``whiten``: they choose the factors at that rank, not the rank);
* ``param_budget``: a global budget, the share of the eligible layers' weights
  kept, charged as they will be written: ``r (K + N)`` for a factored layer and
  ``K N`` for one left dense. Greedy over moves by value per parameter, a move being
  one more rank or, at any point, the whole layer kept dense; a layer's value is its
  share of its own spectrum (of the method's SVD) times its size ``K N``, so a share
  of a large layer outweighs the same share of a small one. Budget 1.0 keeps every
  layer dense.

A layer is left dense (and the report says why) when ``r >= K N / (K + N)``: the
factors would hold as many weights, and cost as many multiply-adds, as ``W``.

Activation-aware SVD (``activation_aware=true``; Yuan et al. 2023, "ASVD:
Activation-aware Singular Value Decomposition for Compressing Large Language
Models", arXiv:2312.05821): the input channels are scaled by calibration
statistics before the SVD, ``W' = diag(s) W`` with ``s_k = mean|x_k| ** alpha``,
and the scale is folded back, ``U = diag(1/s) U'``. Truncating ``W'`` minimises the
error where activations are large rather than uniformly over input channels.

Whitened SVD (``whiten=true``; the data whitening of SVD-LLM, Wang et al. 2024,
arXiv:2403.07378): with the calibration Gram matrix ``X^T X = L L^T`` (Cholesky,
a small ridge for rank-deficient data), ``||X W - X W'|| = ||L^T (W - W')||``, so
truncating the SVD of ``L^T W`` and folding back ``U = L^-T U'`` gives the factors
with the smallest output error on the calibration activations, and its singular
values rank every layer's directions by that error (``param_budget``).

Calibration: the original graph is run by ONNX Runtime on calibration inputs with
every candidate MatMul's activation input exposed as an extra output; per channel
``mean|x|`` is kept, plus up to ``calibration_rows`` rows that measure each layer's
relative reconstruction error ``||X W - X U V|| / ||X W||``. Inputs (decoders,
BERT-style encoders, float graphs) come from ``calibration_data`` (an ``.npy`` of int64
token ids ``[B, S]``) or random tokens, as :mod:`passes.calibration` describes.

Report (``PassResult.details["layers"]``): per layer, rank, kept energy,
reconstruction error on the calibration activations, weights and FLOPs saved, or
the reason it was skipped.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import numpy as np
import onnx_ir as ir

from passes import calibration
from passes.calibration import CalibrationOptions
from passes.registry import GraphPass, PassResult
from toolkit.errors import PassError

DOMAIN = "com.toolkit"


@dataclasses.dataclass(frozen=True)
class LowRankOptions(CalibrationOptions):
    """Options of ``low-rank`` (exactly one of rank_ratio / energy / param_budget)."""

    rank_ratio: float | None = dataclasses.field(
        default=None, metadata={"help": "rank per layer as a share of min(K, N), in (0, 1]"})
    energy: float | None = dataclasses.field(
        default=None, metadata={"help": "kept spectral energy per layer, in (0, 1]"})
    param_budget: float | None = dataclasses.field(
        default=None, metadata={"help": "global share of the eligible layers' weights kept, in (0, 1]"})
    activation_aware: bool = dataclasses.field(
        default=False, metadata={"help": "scale input channels by calibration mean|x|**alpha before the SVD (ASVD)"})
    alpha: float = dataclasses.field(default=0.5, metadata={"help": "ASVD exponent of the channel scale, in (0, 2]"})
    whiten: bool = dataclasses.field(
        default=False, metadata={"help": "SVD of L^T W, L L^T the calibration Gram X^T X (SVD-LLM whitening): "
                                          "the smallest output error on the calibration activations"})
    calibration_rows: int = dataclasses.field(
        default=512, metadata={"help": "activation rows kept per layer to measure the reconstruction error"})
    min_size: int = dataclasses.field(
        default=4096, metadata={"help": "only weights with at least this many elements (K*N)"})
    include: str = dataclasses.field(
        default="", metadata={"help": "comma-separated substrings: only weights whose name contains one"})
    use_op: bool = dataclasses.field(
        default=True, metadata={"help": "emit com.toolkit::LowRankMatMul (false: MatMul->MatMul, standard ONNX)"})
    int8_weights: bool = dataclasses.field(
        default=False, metadata={"help": "store U and V as int8 with a float32 scale per column (4x smaller "
                                          "factors; standard ONNX form: DequantizeLinear->MatMul)"})
    force: bool = dataclasses.field(
        default=False, metadata={"help": "factor even where it saves nothing (r >= KN/(K+N)); for testing"})

    def validate(self) -> None:
        chosen = [n for n in ("rank_ratio", "energy", "param_budget") if getattr(self, n) is not None]
        if len(chosen) != 1:
            raise PassError(
                "low-rank needs exactly one of rank_ratio, energy, param_budget"
                + (f" (got {', '.join(chosen)})" if chosen else " (got none)"),
                hint="e.g. toolkit convert MODEL -o DIR --rank-ratio 0.5, or --energy 0.9, or --param-budget 0.6")
        value = getattr(self, chosen[0])
        if not (isinstance(value, (int, float)) and 0 < value <= 1):
            raise PassError(f"low-rank option {chosen[0]} must be in (0, 1], got {value!r}",
                            hint="1.0 keeps everything; 0.5 keeps half")
        if self.whiten and self.activation_aware:
            raise PassError("low-rank options whiten and activation_aware are two ways to weight the SVD by the "
                            "activations; choose one",
                            hint="set one: whiten=true (whitening) or activation_aware=true (ASVD)")
        if not 0 < self.alpha <= 2:
            raise PassError(f"low-rank option alpha must be in (0, 2], got {self.alpha!r}",
                            hint="ASVD uses 0.5")
        self.validate_calibration("low-rank", extra=("calibration_rows",))
        if self.min_size < 1:
            raise PassError(f"low-rank option min_size must be >= 1, got {self.min_size!r}", hint="e.g. 4096")


@dataclasses.dataclass
class _Layer:
    matmul: ir.Node
    add: ir.Node | None
    bias: ir.Value | None
    weight: np.ndarray  # [K, N] float64
    name: str
    chan_abs_mean: np.ndarray | None = None  # [K]
    rows: np.ndarray | None = None            # [<= calibration_rows, K]
    # SVD of the (scaled) weight
    u: np.ndarray | None = None
    s: np.ndarray | None = None
    vt: np.ndarray | None = None
    scale: np.ndarray | None = None
    gram: np.ndarray | None = None            # X^T X / rows over all calibration rows (whiten)
    unwhiten: np.ndarray | None = None        # L^-T: U = L^-T U' (whiten)
    rank: int = 0
    weight_s: np.ndarray | None = None        # singular values of W itself (energy ranks, kept_energy)
    gram_rows: int = 0                        # activation rows behind the Gram matrix (whiten)


def _bias_vector(value: ir.Value | None, n: int) -> ir.Value | None:
    """``value`` when it is a constant of shape [n] (a layer's bias), else None."""
    if value is None or value.const_value is None:
        return None
    return value if tuple(value.const_value.shape) == (n,) else None


def _const_bias(add: ir.Node, produced: ir.Value, n: int) -> ir.Value | None:
    return _bias_vector(add.inputs[1] if add.inputs[0] is produced else add.inputs[0], n)


def _constant_weight(w: ir.Value | None) -> np.ndarray | None:
    """The weight's value: an initializer, or Transpose(perm=[1, 0]) of one (tied LM heads)."""
    if w is None:
        return None
    if w.const_value is not None:
        return w.const_value.numpy()
    node = w.producer()
    if node is None or node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
        return None
    src = node.inputs[0]
    if src is None or src.const_value is None or src.const_value.numpy().ndim != 2:
        return None
    perm = node.attributes.get("perm")
    if perm is not None and list(perm.as_ints()) != [1, 0]:
        return None
    return src.const_value.numpy().T


def _attr(node: ir.Node, name: str, default: float) -> float:
    a = node.attributes.get(name)
    return default if a is None else a.value


def _plain_gemm(node: ir.Node) -> str | None:
    """Why a Gemm's attributes make it other than ``A B (+ C)`` or ``A B^T (+ C)``
    (None when they do not): Hugging Face GPT-2's Conv1D layers export as Gemm(A, W, b)
    on 2-D activations. (Its C must also be a constant [N] bias; _candidates checks
    that once it has the weight.)"""
    if _attr(node, "transA", 0):
        return "transA=1 (the activation is transposed)"
    if _attr(node, "alpha", 1.0) != 1.0 or _attr(node, "beta", 1.0) != 1.0:
        return f"alpha={_attr(node, 'alpha', 1.0)}, beta={_attr(node, 'beta', 1.0)} (only 1 and 1 are factored)"
    return None


def _shared_weight(w: ir.Value) -> str | None:
    """Name of the initializer behind ``w`` when something else also uses it."""
    src = w
    if w.const_value is None:  # Transpose of an initializer
        src = w.producer().inputs[0]
        if len(list(w.uses())) > 1:
            return w.name
    return src.name if len(list(src.uses())) > 1 else None


def _candidates(graph: ir.Graph, options: LowRankOptions, explanations: list[str] | None) -> list[_Layer]:
    include = [s for s in options.include.split(",") if s]
    layers = []
    for node in graph:
        if node.op_type not in ("MatMul", "Gemm") or node.domain not in ("", "ai.onnx"):
            continue
        label = f"node {node.name or '<unnamed>'} ({node.op_type})"
        gemm = node.op_type == "Gemm"
        if gemm and (reason := _plain_gemm(node)):
            if explanations is not None:
                explanations.append(f"{label}: {reason}")
            continue
        w = node.inputs[1]
        array = _constant_weight(w)
        if gemm and array is not None and array.ndim == 2 and _attr(node, "transB", 0):
            array = array.T  # Gemm computes A B^T: the [K, N] weight is B^T
        if array is None:
            if explanations is not None:
                explanations.append(f"{label}: weight {w.name if w else None!r} is not a constant initializer "
                                    "(or the Transpose of one)")
            continue
        if array.ndim != 2:
            if explanations is not None:
                explanations.append(f"{label}: weight {w.name!r} has rank {array.ndim}, expected [K, N]")
            continue
        if array.dtype not in (np.float32, np.float16, np.float64):
            if explanations is not None:
                explanations.append(f"{label}: weight {w.name!r} has dtype {array.dtype}, expected float")
            continue
        if array.size < options.min_size:
            if explanations is not None:
                explanations.append(f"{label}: weight {w.name!r} {list(array.shape)} has {array.size} elements "
                                    f"< min_size={options.min_size}")
            continue
        shared = _shared_weight(w)
        if shared and not options.force:
            if explanations is not None:
                explanations.append(f"{label}: weight {shared!r} has other uses (e.g. tied embeddings): the dense "
                                    "matrix stays, so factors would add weights")
            continue
        if include and not any(s in (w.name or "") or s in (node.name or "") for s in include):
            if explanations is not None:
                explanations.append(f"{label}: weight {w.name!r} matches none of include={options.include!r}")
            continue
        out = node.outputs[0]
        add = bias = None
        uses = list(out.uses())
        if gemm:  # its own C input is the bias: absent, or a constant [N]
            c = node.inputs[2] if len(node.inputs) > 2 else None
            bias = _bias_vector(c, array.shape[1])
            if c is not None and bias is None:
                if explanations is not None:
                    explanations.append(f"{label}: bias C {c.name!r} is not a constant of shape [N]")
                continue
        elif len(uses) == 1 and not out.is_graph_output():
            consumer = uses[0][0] if isinstance(uses[0], tuple) else uses[0].node
            if consumer.op_type == "Add" and consumer.domain in ("", "ai.onnx"):
                bias = _const_bias(consumer, out, array.shape[1])
                add = consumer if bias is not None else None
        layers.append(_Layer(node, add, bias, array.astype(np.float64), node.name or w.name or "?"))
    return layers


# ------------------------------------------------------------------ calibration


def _calibrate(model: ir.Model, layers: list[_Layer], options: LowRankOptions) -> None:
    """Run the graph with each layer's activation input exposed; keep per-channel stats:
    the mean of ``|x|``, ``x^T x`` (whiten) and a sample of rows, reduced batch by batch
    (long calibration files run in batches of CHUNK_TOKENS tokens) so that only one
    batch's activations are held at a time."""
    names = [layer.matmul.inputs[0].name for layer in layers]
    rng = np.random.default_rng(options.seed + 1)
    streams = [_Stream(layer.weight.shape[0], options.whiten) for layer in layers]

    def take(values: dict[str, np.ndarray], batches: int) -> None:
        for name, stream in zip(names, streams):
            x = np.asarray(values[name], np.float64)
            stream.add(x.reshape(-1, x.shape[-1]), options.calibration_rows, rng, only_batch=batches == 1)

    calibration.run_exposed(model, names, options, "low-rank", per_batch=take)
    for layer, s in zip(layers, streams):
        layer.chan_abs_mean = s.abs_sum / s.n
        if options.whiten:
            layer.gram, layer.gram_rows = s.gram / s.n, s.n
        layer.rows = s.sample()


class _Stream:
    """Running calibration statistics of one layer's activation rows."""

    def __init__(self, k: int, gram: bool) -> None:
        self.n = 0
        self.abs_sum = np.zeros(k)
        self.gram = np.zeros((k, k)) if gram else None
        self.rows = np.zeros((0, k))  # the row sample
        self.index = np.zeros(0, np.int64)  # each sampled row's position in calibration order

    def add(self, x: np.ndarray, capacity: int, rng: np.random.Generator, only_batch: bool = False) -> None:
        self.abs_sum += np.abs(x).sum(axis=0)
        if self.gram is not None:
            self.gram += x.T @ x
        first = self.n
        self.n += x.shape[0]
        if only_batch:  # the whole calibration input at once: a sample without replacement
            pick = np.sort(rng.choice(x.shape[0], capacity, replace=False)) if x.shape[0] > capacity else None
            self.rows = x if pick is None else x[pick]
            self.index = np.arange(x.shape[0]) if pick is None else pick
            return
        # reservoir sampling (Algorithm R) over batches: every row seen so far is kept with
        # the same probability capacity / n; copies, so no batch is kept alive
        fill = max(0, min(capacity - first, x.shape[0]))
        if fill:
            self.rows = np.concatenate([self.rows, x[:fill]])
            self.index = np.concatenate([self.index, np.arange(first, first + fill)])
        seen = np.arange(first + fill, first + x.shape[0]) + 1  # 1-based count at each later row
        slot = (rng.random(len(seen)) * seen).astype(np.int64)
        for j in np.flatnonzero(slot < capacity):  # in order: a later row replaces an earlier one
            self.rows[slot[j]] = x[fill + j]
            self.index[slot[j]] = first + fill + j

    def sample(self) -> np.ndarray:
        return self.rows[np.argsort(self.index)]  # in calibration order, as one batch's sample is


# ------------------------------------------------------------------ factorisation


def _break_even(K: int, N: int) -> float:
    return K * N / (K + N)


def _choose_ranks(layers: list[_Layer], options: LowRankOptions) -> None:
    if options.rank_ratio is not None:
        for layer in layers:
            K, N = layer.weight.shape
            layer.rank = max(1, math.ceil(options.rank_ratio * min(K, N) - 1e-9))
    elif options.energy is not None:
        for layer in layers:
            e = np.cumsum(layer.weight_s ** 2)
            e = e / e[-1] if e[-1] > 0 else np.ones_like(e)
            layer.rank = int(min(len(e), np.searchsorted(e, options.energy - 1e-12) + 1))
    else:
        _allocate_budget(layers, options.param_budget)


def _allocate_budget(layers: list[_Layer], param_budget: float) -> None:
    """Ranks for a global budget of ``param_budget`` times the layers' weights, charged as
    written (factors ``r (K + N)``, a dense layer ``K N``). Every layer starts at rank 1;
    then, greedily by value per parameter, one more rank (below break-even) or the jump
    to dense (all of the layer's value for ``K N - r (K + N)`` more) while it fits."""
    import heapq

    budget = param_budget * sum(layer.weight.size for layer in layers) * (1 + 1e-12)
    state = []  # per layer: (cumulative value by rank, K + N, K N, largest factored rank)
    for layer in layers:
        K, N = layer.weight.shape
        e = layer.s ** 2
        total = float(e.sum())
        value = np.concatenate([[0.0], np.cumsum(e) / total if total > 0 else np.ones(len(e))]) * (K * N)
        state.append((value, K + N, K * N, max(1, math.ceil(_break_even(K, N)) - 1)))
    ranks = [1] * len(layers)
    dense = [False] * len(layers)
    spent = float(sum(per for _, per, _, _ in state))

    def moves(li: int) -> list[tuple[float, float, str]]:
        value, per, size, top = state[li]
        r, out = ranks[li], []
        if r < top:
            out.append((float(value[r + 1] - value[r]) / per, per, "rank"))
        out.append((float(value[-1] - value[r]) / max(size - r * per, 1), size - r * per, "dense"))
        return out

    # (-value per parameter, layer, cost, kind, the layer's rank when the move was made)
    heap = [(-ratio, li, cost, kind, 1) for li in range(len(layers)) for ratio, cost, kind in moves(li)]
    heapq.heapify(heap)
    while heap:
        _, li, cost, kind, at_rank = heapq.heappop(heap)
        if dense[li] or at_rank != ranks[li] or spent + cost > budget:
            continue  # stale (the layer moved on) or too dear for what is left
        spent += cost
        if kind == "dense":
            dense[li] = True
            continue
        ranks[li] += 1
        for ratio, c, k in moves(li):
            heapq.heappush(heap, (-ratio, li, c, k, ranks[li]))
    for layer, r, d in zip(layers, ranks, dense):
        K, N = layer.weight.shape
        layer.rank = min(K, N) if d else r


def thin_svd(a: np.ndarray, compute_uv: bool = True) -> Any:
    """``np.linalg.svd(a, full_matrices=False)`` of a float64 ``[K, N]`` matrix (or its
    singular values alone), through the symmetric eigenproblem of the smaller Gram matrix.

    At LLM layer sizes this is 2-4x faster than LAPACK's SVD: on a 2-core machine, the 15
    weights of a 2-layer TinyLlama-sized model (hidden 2048, MLP 5632) took 17 s instead of
    41 s, most of the pass (26 s instead of 49 s). Squaring the matrix costs the singular values
    below about 1e-8 of the largest, which come back as ~0: no truncation the pass makes
    keeps them. A kept direction is the projection ``u s v^T = u u^T a`` of the weight
    whatever ``u``'s accuracy, and its other side ``v = a^T u / s`` is computed from it
    (a zero row where ``s`` is below 1e-10 of the largest). Signs: the largest-magnitude
    entry of each smaller-side vector is positive, so slightly different weights (another
    calibration batching) give the same factors.
    """
    wide = a.shape[0] <= a.shape[1]
    lam, vecs = np.linalg.eigh(a @ a.T if wide else a.T @ a)
    lam, vecs = lam[::-1], vecs[:, ::-1]  # descending
    s = np.sqrt(np.maximum(lam, 0.0))
    if not compute_uv:
        return s
    columns = np.arange(vecs.shape[1])
    vecs = vecs * np.where(vecs[np.abs(vecs).argmax(axis=0), columns] < 0, -1.0, 1.0)
    inverse = np.divide(1.0, s, out=np.zeros_like(s), where=s > 1e-10 * (s[0] if s.size else 0.0))
    other = ((a.T if wide else a) @ vecs) * inverse  # [N, m] (wide) or [K, m]
    return (vecs, s, other.T) if wide else (other, s, vecs.T)


def _svd(layer: _Layer, options: LowRankOptions) -> None:
    W = layer.weight
    if options.whiten:
        g = layer.gram
        ridge = 1e-6 * max(float(np.trace(g)) / g.shape[0], 1e-30)  # rank-deficient calibration data
        L = np.linalg.cholesky(g + ridge * np.eye(g.shape[0]))
        layer.scale = np.ones(W.shape[0])
        layer.unwhiten = np.linalg.inv(L.T)
        layer.u, layer.s, layer.vt = thin_svd(L.T @ W)
        layer.weight_s = thin_svd(W, compute_uv=False)
        return
    if options.activation_aware:
        s = np.power(np.maximum(layer.chan_abs_mean, 1e-12), options.alpha)
        s = s / np.exp(np.mean(np.log(s)))  # geometric mean 1: only the shape matters
    else:
        s = np.ones(W.shape[0])
    layer.scale = s
    layer.u, layer.s, layer.vt = thin_svd(s[:, None] * W)
    layer.weight_s = thin_svd(W, compute_uv=False) if options.activation_aware else layer.s


def _factors(layer: _Layer) -> tuple[np.ndarray, np.ndarray]:
    r = layer.rank
    root = np.sqrt(layer.s[:r])  # balanced split: both factors have comparable norms
    U = (layer.u[:, :r] * root[None, :]) / layer.scale[:, None]
    if layer.unwhiten is not None:
        U = layer.unwhiten @ U
    V = root[:, None] * layer.vt[:r]
    return U, V


def _rewrite(graph: ir.Graph, layer: _Layer, U: np.ndarray, V: np.ndarray, use_op: bool, dtype: np.dtype,
             int8: tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None) -> None:
    """Replace the layer by its factors; ``int8``: the factors' ``quantize_columns`` (codes, scale) pairs."""
    mm = layer.matmul
    x = mm.inputs[0]
    base = (mm.name or layer.name).replace("/", "_")

    def initializer(name: str, array: np.ndarray) -> ir.Value:
        value = ir.val(f"{layer.name}.{name}", const_value=ir.tensor(array))
        graph.register_initializer(value)
        return value

    scales: list[ir.Value] = []
    if int8:
        (uq, us), (vq, vs) = int8
        u_val, v_val = initializer("lowrank_U", uq), initializer("lowrank_V", vq)
        scales = [initializer("lowrank_U_scale", us), initializer("lowrank_V_scale", vs)]
    else:
        u_val, v_val = initializer("lowrank_U", U.astype(dtype)), initializer("lowrank_V", V.astype(dtype))
    last = layer.add if layer.add is not None else mm
    old_out = last.outputs[0]
    new_nodes: list[ir.Node] = []
    if use_op:
        inputs = [x, u_val, v_val] + ([layer.bias] if layer.bias is not None else [None] if int8 else []) + scales
        new_nodes.append(ir.Node(DOMAIN, "LowRankMatMul", inputs, num_outputs=1, name=f"{base}/LowRankMatMul"))
    else:
        if int8:  # standard ONNX: per-column DequantizeLinear of the codes
            deq = [ir.Node("", "DequantizeLinear", [w, s], attributes=[ir.AttrInt64("axis", 1)], num_outputs=1,
                           name=f"{base}/Dequantize_{n}") for w, s, n in ((u_val, scales[0], "U"),
                                                                           (v_val, scales[1], "V"))]
            new_nodes += deq
            u_val, v_val = deq[0].outputs[0], deq[1].outputs[0]
        first = ir.Node("", "MatMul", [x, u_val], num_outputs=1, name=f"{base}/MatMul_U")
        second = ir.Node("", "MatMul", [first.outputs[0], v_val], num_outputs=1, name=f"{base}/MatMul_V")
        new_nodes += [first, second]
        if layer.bias is not None:
            new_nodes.append(ir.Node("", "Add", [second.outputs[0], layer.bias], num_outputs=1,
                                     name=f"{base}/Add_bias"))
    new_out = new_nodes[-1].outputs[0]
    if old_out.dtype is not None:
        new_out.dtype = old_out.dtype
    if old_out.shape is not None:
        new_out.shape = old_out.shape
    old_nodes = [mm] + ([layer.add] if layer.add is not None else [])
    ir.convenience.replace_nodes_and_values(graph, last, old_nodes, new_nodes, [old_out], [new_out])


def apply(model: ir.Model, options: LowRankOptions, *, explain: bool = False) -> PassResult:
    """Factor the eligible layers; count = layers replaced."""
    graph = model.graph
    explanations: list[str] = []
    layers = _candidates(graph, options, explanations if explain else None)
    if not layers:
        return PassResult(name=PASS.name, count=0, explanations=explanations,
                          details={"layers": [], "reason": "no MatMul or Gemm with a constant 2-D float weight"})
    _calibrate(model, layers, options)
    for layer in layers:
        _svd(layer, options)
    _choose_ranks(layers, options)

    report = []
    notes: list[str] = []  # said with or without --explain: layers left dense, underdetermined whitening
    count = 0
    params_before = params_after = flops_before = flops_after = 0
    for layer in layers:
        K, N = layer.weight.shape
        r = layer.rank
        energy = layer.weight_s ** 2  # W's own spectrum: the share a plain SVD at this rank keeps
        kept = float(energy[:r].sum() / energy.sum()) if energy.sum() > 0 else 1.0
        entry: dict[str, Any] = {"layer": layer.name, "weight": layer.matmul.inputs[1].name, "K": K, "N": N, "rank": r,
                                 "break_even_rank": _break_even(K, N), "kept_energy": kept,
                                 "bias_fused": layer.bias is not None}
        params_before += K * N
        flops_before += 2 * K * N
        if r >= _break_even(K, N) and not options.force:
            reason = (f"rank {r} >= K*N/(K+N) = {_break_even(K, N):.1f}: the factors would not cut "
                      f"weights or FLOPs; left dense")
            entry.update(skipped=True, reason=reason)
            params_after += K * N
            flops_after += 2 * K * N
            notes.append(f"node {layer.matmul.name or '<unnamed>'} ({layer.matmul.op_type}): {reason}")
            report.append(entry)
            continue
        U, V = _factors(layer)
        X = layer.rows
        ref = X @ layer.weight
        approx = (X @ U) @ V
        denom = float(np.linalg.norm(ref))
        entry["reconstruction_error"] = float(np.linalg.norm(ref - approx) / denom) if denom > 0 else 0.0
        entry["calibration_rows"] = int(X.shape[0])
        if options.whiten and layer.gram_rows < K:
            # fewer activation rows than input channels: the whitened factors can fit those
            # rows exactly, so their error on them says little about other inputs
            entry["calibration_underdetermined"] = True
            notes.append(
                f"node {layer.matmul.name or '<unnamed>'}: whitened on {layer.gram_rows} calibration rows for "
                f"{K} input channels (rank-deficient Gram matrix); its reconstruction_error is measured on those "
                "same rows and can be near 0 at any rank: pass more calibration_data")
        dtype = _constant_weight(layer.matmul.inputs[1]).dtype
        bytes_per = np.dtype(dtype).itemsize
        entry["params_saved"] = K * N - r * (K + N)
        factor_bytes = r * (K + N) + 4 * (r + N) if options.int8_weights else r * (K + N) * bytes_per
        entry["bytes_saved"] = K * N * bytes_per - factor_bytes
        entry["flops_saved_per_row"] = 2 * (K * N - r * (K + N))
        entry["skipped"] = False
        params_after += r * (K + N)
        flops_after += 2 * r * (K + N)
        int8 = None
        if options.int8_weights:  # the error the calibration rows see after quantizing the factors
            from toolkit.ops.reference import quantize_columns

            int8 = (quantize_columns(U), quantize_columns(V))
            (uq, us), (vq, vs) = int8
            approx = (X @ (uq * us.astype(np.float64))) @ (vq * vs.astype(np.float64))
            entry["reconstruction_error_int8"] = float(np.linalg.norm(ref - approx) / denom) if denom > 0 else 0.0
        _rewrite(graph, layer, U, V, options.use_op, dtype, int8)
        count += 1
        report.append(entry)

    if count and options.use_op:
        model.opset_imports.setdefault(DOMAIN, 1)
    summary = {"factored": count, "skipped": len(layers) - count, "params_before": params_before,
               "params_after": params_after, "param_reduction": 1 - params_after / params_before,
               "flops_per_row_before": flops_before, "flops_per_row_after": flops_after,
               "activation_aware": options.activation_aware, "whiten": options.whiten}
    model.metadata_props["toolkit.low_rank"] = json.dumps(
        {"options": dataclasses.asdict(options), **summary}, sort_keys=True)
    return PassResult(name=PASS.name, count=count, explanations=explanations + notes,
                      details={"summary": summary, "layers": report})


PASS = GraphPass(
    name="low-rank",
    description="Factor constant-weight MatMul(+Add) and Gemm layers by truncated (activation-aware) SVD into "
    "LowRankMatMul; rank by rank_ratio, energy or a global param_budget",
    options_type=LowRankOptions,
    apply=apply,
)
