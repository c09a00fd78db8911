"""``low-rank-kv``: cache a rank-r latent per token instead of the keys and values.

Palu / xKV-style KV-cache compression. For each layer the pass finds a projection
``A [kv_heads * head_dim, r]`` with orthonormal columns such that the cached rows
``k = [k_0 | ... | k_{H-1}]`` (all KV heads of one token, flattened) are close to
``(k · A) · A^T``. The cache stores the latent ``h = k · A`` ``[B, T, r]`` (one tensor
per layer, shared by the heads of a group) and attention never rebuilds the keys or
values:

* keys -- the up-projection is folded into the query (it is linear and comes after
  RoPE, so RoPE is no obstacle): ``q_h · K_h^T = (q_h · A_h) · h^T`` with ``A_h`` the
  rows of ``A`` of KV head ``h // n_rep``; scores cost ``r`` instead of ``head_dim``
  multiply-adds per cached token and query head;
* values -- folded after the probability-weighted sum:
  ``P_h · V_h = (P_h · h) · A_h^T``.

Where ``A`` comes from (and why post-RoPE keys): Palu factors ``W_k`` and rebuilds
``RoPE(h · B)`` for every cached position, which needs each cached token's position.
Here the basis is the principal subspace of the *post-RoPE* keys (and of the values)
measured on a calibration run of the graph (uncentred PCA, the Karhunen-Loeve
basis: the best rank-r projection for those rows, ``||K - K A A^T||_F`` minimal).
For the values ``h = x · (W_v A)`` is exactly a factorisation ``W_v ~ (W_v A) A^T``
of the value projection (the calibration-optimal one, as in SVD-LLM's whitened
SVD); for the keys it is a projection of ``RoPE(x W_k)``. The pass computes the
latent from the exported key/value tensors (``k_new · A``), so it matches the
attention only, not the projections: our models and Hugging Face GPT-2 / Llama /
Qwen2 / Mistral / Phi-3 alike.

Query-aware keys (``query_aware=true``): what attention needs of a key is ``q . k``, so
the keys are whitened by the calibration queries' covariance before the PCA
(``S = E[q q^T]^1/2`` per KV head, summed over its query heads): the latent is
``h = k S U_r`` and the query side reads ``S^-1 U_r``, still exact at full rank.

Groups (Palu's group-head low-rank, ``groups=G``): the KV heads are split into G
contiguous groups, each with its own basis of rank ``r / G``; a query head then
reads only its group's ``r / G`` latent columns. ``G = 1`` (default) is one joint
basis per layer (most accurate at a given cache size); ``G = kv_heads`` is one basis
per head (cheapest attention: ``r / kv_heads`` per head).

Rank, exactly one of: ``rank_ratio`` (share of the group width ``(kv_heads / G) *
head_dim``) or ``energy`` (smallest rank keeping that share of the calibration
rows' energy, the largest over the layer's groups). Keys and values are chosen
separately and can be switched off (``keys=false``: values-only latent cache).

Model I/O: ``past_key_values.{i}.key`` ``[B, kv_heads, P, head_dim]`` becomes
``past_key_values.{i}.key_latent`` ``[B, P, r_k]`` (``present.{i}.*`` likewise, same
for value). With ``latent_bits=8`` (Palu's latent quantization, here int8 per token
and head group, symmetric absmax) each becomes two tensors, ``{kind}_latent_q`` int8
``[B, P, r]`` and ``{kind}_latent_scale`` float32 ``[B, P, G]``: 4x fewer cache bytes
again, quantized once when a token is cached and dequantized for the attention.
``toolkit.low_rank_kv`` in the metadata records the ranks and bytes per
token. At full rank (``rank_ratio=1``) the rewrite is exact up to float32
rounding (tested); below it, it is lossy by design.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from typing import Any

import numpy as np
import onnx_ir as ir

from passes import calibration
from passes.calibration import CalibrationOptions
from passes.kv_cache import (
    SLICED_CACHE_HINT,
    NoMatch,
    SlicedCache,
    match_layer,
    remove_nodes,
    rewire_out_shapes,
)
from passes.registry import GraphPass, PassResult
from toolkit.errors import PassError

_PAST = re.compile(r"^past_key_values\.(\d+)\.key$")


@dataclasses.dataclass(frozen=True)
class LowRankKVOptions(CalibrationOptions):
    """Options of ``low-rank-kv`` (exactly one of rank_ratio / energy)."""

    rank_ratio: float | None = dataclasses.field(
        default=None, metadata={"help": "latent rank as a share of (kv_heads / groups) * head_dim, in (0, 1]"})
    energy: float | None = dataclasses.field(
        default=None, metadata={"help": "kept share of the calibration keys'/values' energy, in (0, 1]"})
    keys: bool = dataclasses.field(default=True, metadata={"help": "cache a key latent (false: keys stay full)"})
    values: bool = dataclasses.field(default=True, metadata={"help": "cache a value latent (false: values stay full)"})
    groups: int = dataclasses.field(
        default=1, metadata={"help": "head groups with their own basis (1: one per layer; kv_heads: one per head)"})
    query_aware: bool = dataclasses.field(
        default=False, metadata={"help": "key basis minimising the error of the scores q.k (keys whitened by "
                                          "the calibration queries' covariance) instead of the keys"})
    calibration_seq_len: int = dataclasses.field(
        default=128, metadata={"help": "length of random calibration sequences"})
    latent_bits: int = dataclasses.field(
        default=32, metadata={"help": "32: float32 latent cache; 8: int8 codes with a float32 scale per token and "
                                      "head group (symmetric, absmax), quantized once when the token is cached"})

    def validate(self) -> None:
        chosen = [n for n in ("rank_ratio", "energy") if getattr(self, n) is not None]
        if len(chosen) != 1:
            raise PassError(
                "low-rank-kv needs exactly one of rank_ratio, energy"
                + (f" (got {', '.join(chosen)})" if chosen else " (got none)"),
                hint="e.g. toolkit convert MODEL -o DIR --kv-rank-ratio 0.5, or "
                     "--passes low-rank-kv --pass-option low-rank-kv.energy=0.99")
        value = getattr(self, chosen[0])
        if not (isinstance(value, (int, float)) and 0 < value <= 1):
            raise PassError(f"low-rank-kv option {chosen[0]} must be in (0, 1], got {value!r}",
                            hint="1.0 keeps the full rank (exact); 0.5 halves the cache")
        if not (self.keys or self.values):
            raise PassError("low-rank-kv with keys=false and values=false would change nothing",
                            hint="leave keys or values at true (the default compresses both)")
        if self.latent_bits not in (8, 32):
            raise PassError(f"low-rank-kv option latent_bits must be 8 or 32, got {self.latent_bits!r}",
                            hint="32 keeps the float32 latent; 8 stores int8 codes + a scale per token and group")
        if self.groups < 1:
            raise PassError(f"low-rank-kv option groups must be >= 1, got {self.groups!r}",
                            hint="1 (one basis per layer) or a divisor of the number of KV heads")
        self.validate_calibration("low-rank-kv")


@dataclasses.dataclass
class _Side:
    """One of keys / values of one layer."""

    kind: str                  # "key" | "value"
    past: ir.Value
    concat: ir.Node
    grams: list[np.ndarray] = dataclasses.field(default_factory=list)  # per group: sum of x^T x (float64)
    bases: list[np.ndarray] = dataclasses.field(default_factory=list)  # per group [gD, gD], columns by energy
    spectra: list[np.ndarray] = dataclasses.field(default_factory=list)  # per group eigenvalues, descending
    ups: list[np.ndarray] = dataclasses.field(default_factory=list)  # per group up-projection (default: bases)
    rank: int = 0              # per group
    kept_energy: float = 1.0


@dataclasses.dataclass
class _LayerRewrite:
    index: int
    match: Any                 # passes.kv_cache.Layer
    key: _Side | None
    value: _Side | None
    q_heads: int = 0
    q_cov: list[np.ndarray] | None = None  # per KV head: sum over its query heads of E[q q^T] [D, D]


# ------------------------------------------------------------------ calibration


def _calibrate(model: ir.Model, layers: list[_LayerRewrite], options: LowRankKVOptions) -> None:
    """Prefill the calibration tokens batch by batch; keep statistics, not activations.

    Per side and head group the Gram matrix of the new key/value rows (``sum x^T x``),
    per KV head the sum of its query heads' ``q^T q``, and the query head count: all the
    fit needs, so memory does not grow with the calibration tokens.
    """
    wanted = []
    for layer in layers:
        for side in (layer.key, layer.value):
            if side is not None:
                wanted.append(side.concat.outputs[0].name)  # present.{i}.key/value
        wanted.append(layer.match.query.name)
    query_rows = [0]

    def take(values: dict[str, np.ndarray], _batches: int) -> None:
        for layer in layers:
            q = values[layer.match.query.name]
            if q.ndim != 4:
                raise PassError(f"low-rank-kv: layer {layer.index}: query {layer.match.query.name!r} has rank "
                                f"{q.ndim}, expected [batch, heads, seq, head_dim]",
                                hint="the pass rewrites 4-D attention (eager from `toolkit export`, torch "
                                     "exporters' SDPA forms)")
            layer.q_heads = int(q.shape[1])
            if options.query_aware and layer.key is not None:
                q = np.asarray(q, np.float64).transpose(1, 0, 2, 3).reshape(q.shape[1], -1, q.shape[3])  # [Hq, N, D]
                kv_heads = int(values[layer.key.concat.outputs[0].name].shape[1])
                n_rep = max(1, q.shape[0] // kv_heads)
                sums = [sum(q[h].T @ q[h] for h in range(j * n_rep, (j + 1) * n_rep)) for j in range(kv_heads)]
                layer.q_cov = sums if layer.q_cov is None else [a + b for a, b in zip(layer.q_cov, sums)]
            for side in (layer.key, layer.value):
                if side is not None:
                    kv = np.asarray(values[side.concat.outputs[0].name], np.float64)  # [B, H, S, D]
                    rows = kv.transpose(0, 2, 1, 3).reshape(-1, kv.shape[1] * kv.shape[3])
                    width = rows.shape[1] // options.groups
                    grams = [rows[:, g * width:(g + 1) * width].T @ rows[:, g * width:(g + 1) * width]
                             for g in range(options.groups)]
                    side.grams = grams if not side.grams else [a + b for a, b in zip(side.grams, grams)]
        first = values[layers[0].match.query.name]
        query_rows[0] += int(first.shape[0] * first.shape[2])  # batch * seq: rows per query head

    calibration.run_exposed(model, wanted, options, "low-rank-kv", threads=1, per_batch=take)
    for layer in layers:
        if layer.q_cov is not None:
            layer.q_cov = [c / query_rows[0] for c in layer.q_cov]


# ------------------------------------------------------------------ bases and ranks


def _sqrt_psd(c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(C^1/2, C^-1/2) of a covariance, eigenvalues floored at 1e-6 of the largest."""
    w, v = np.linalg.eigh(c)
    w = np.maximum(w, max(float(w.max()), 1e-30) * 1e-6)
    return (v * np.sqrt(w)) @ v.T, (v / np.sqrt(w)) @ v.T


def _fit(side: _Side, groups: int, options: LowRankKVOptions, q_cov: list[np.ndarray] | None = None) -> None:
    """Per group: PCA basis of the rows, from their Gram matrix (of S k with S = (query covariance)^1/2 when
    ``q_cov``).

    Whitened: the latent is ``h = k S U`` and the score side reads ``S^-1 U``, so
    ``q . k_hat = (S q) . (U U^T S k)``: truncating U drops the directions that move the
    scores least. Without ``q_cov``, S = I and the up-projection is the basis itself.
    """
    width = side.grams[0].shape[0]
    side.bases, side.spectra, side.ups = [], [], []
    for g in range(groups):
        gram = side.grams[g]
        s = s_inv = None
        if q_cov is not None:
            per_group = len(q_cov) // groups
            head_dim = width // per_group
            s, s_inv = np.zeros((width, width)), np.zeros((width, width))
            for jj in range(per_group):
                a, b = _sqrt_psd(q_cov[g * per_group + jj])
                sl = slice(jj * head_dim, (jj + 1) * head_dim)
                s[sl, sl], s_inv[sl, sl] = a, b
            gram = s @ gram @ s  # (x S)^T (x S), S symmetric
        eigval, eigvec = np.linalg.eigh(gram)
        order = np.argsort(eigval)[::-1]
        side.spectra.append(np.maximum(eigval[order], 0.0))
        u = eigvec[:, order]
        side.bases.append(u if s is None else s @ u)
        side.ups.append(u if s is None else s_inv @ u)
    if options.rank_ratio is not None:
        side.rank = max(1, math.ceil(options.rank_ratio * width - 1e-9))
    else:
        ranks = []
        for sp in side.spectra:
            e = np.cumsum(sp) / sp.sum() if sp.sum() > 0 else np.ones_like(sp)
            ranks.append(int(min(len(e), np.searchsorted(e, options.energy - 1e-12) + 1)))
        side.rank = max(ranks)
    total = sum(float(sp.sum()) for sp in side.spectra)
    kept = sum(float(sp[:side.rank].sum()) for sp in side.spectra)
    side.kept_energy = kept / total if total > 0 else 1.0


def _down(side: _Side, kv_heads: int, head_dim: int) -> np.ndarray:
    """Block-diagonal ``[kv_heads * head_dim, G * r]``: flattened k/v rows -> latent."""
    groups, r = len(side.bases), side.rank
    width = kv_heads * head_dim // groups
    a = np.zeros((kv_heads * head_dim, groups * r))
    for g, basis in enumerate(side.bases):
        a[g * width:(g + 1) * width, g * r:(g + 1) * r] = basis[:, :r]
    return a


def _per_head(side: _Side, kv_heads: int, head_dim: int, q_heads: int) -> np.ndarray:
    """``[q_heads, head_dim, r]``: rows of the group basis that belong to query head h's KV head."""
    groups, r = len(side.bases), side.rank
    n_rep, per_group = q_heads // kv_heads, kv_heads // groups
    out = np.zeros((q_heads, head_dim, r))
    for h in range(q_heads):
        j = h // n_rep
        g, jj = divmod(j, per_group)
        out[h] = side.ups[g][jj * head_dim:(jj + 1) * head_dim, :r]
    return out


# ------------------------------------------------------------------ rewrite


class _Builder:
    def __init__(self, graph: ir.Graph, prefix: str) -> None:
        self.graph, self.prefix, self.nodes, self.n = graph, prefix, [], 0

    def const(self, name: str, array: np.ndarray) -> ir.Value:
        self.n += 1
        value = ir.val(f"{self.prefix}/{name}_{self.n}", const_value=ir.tensor(array))
        self.graph.register_initializer(value)
        return value

    def op(self, op_type: str, inputs: list[ir.Value], attrs: list | None = None, name: str = "") -> ir.Value:
        self.n += 1
        node = ir.Node("", op_type, inputs, attrs or [], num_outputs=1,
                       name=f"{self.prefix}/{name or op_type}_{self.n}")
        self.nodes.append(node)
        return node.outputs[0]

    def i64(self, name: str, values: list[int]) -> ir.Value:
        return self.const(name, np.array(values, np.int64))


def _latent_cache(b: _Builder, side: _Side, index: int, kv_heads: int, head_dim: int,
                  bits: int) -> tuple[list[ir.Value], list[ir.Value], ir.Value]:
    """New past inputs, present outputs and per-group view ``[B, T, G, r]`` of one side's latent.

    float32 (bits=32): one tensor ``{kind}_latent`` ``[B, T, G*r]``. int8 (bits=8):
    ``{kind}_latent_q`` int8 ``[B, T, G*r]`` and ``{kind}_latent_scale`` float32
    ``[B, T, G]``: each new token's latent is quantized once, per head group, with
    scale = max|h| / 127 and codes = round(h / scale) (half to even, as ONNX Round),
    and the whole cache is dequantized (codes * scale) for the attention.
    """
    groups, r = len(side.bases), side.rank
    new = side.concat.inputs[1]  # [B, H, S, D]
    rows = b.op("Transpose", [new], [ir.AttrInt64s("perm", [0, 2, 1, 3])], f"{side.kind}_rows")
    flat = b.op("Reshape", [rows, b.i64(f"{side.kind}_flat_shape", [0, 0, kv_heads * head_dim])])
    down = b.const(f"{side.kind}_down", _down(side, kv_heads, head_dim).astype(np.float32))
    latent_new = b.op("MatMul", [flat, down], name=f"{side.kind}_latent")
    old = side.past.shape
    batch, past_len = (old[0], old[2]) if old is not None and len(old) == 4 else ("batch_size", "past_sequence_length")

    def cache(suffix: str, dtype: ir.DataType, width: int, fresh: ir.Value) -> tuple[ir.Value, ir.Value]:
        past = ir.val(f"past_key_values.{index}.{side.kind}_{suffix}", dtype, ir.Shape([batch, past_len, width]))
        present = b.op("Concat", [past, fresh], [ir.AttrInt64("axis", 1)], f"{side.kind}_{suffix}_cache")
        present.name = f"present.{index}.{side.kind}_{suffix}"
        present.dtype = dtype
        present.shape = ir.Shape([batch, "total_sequence_length", width])
        return past, present

    group_shape = b.i64(f"{side.kind}_group_shape", [0, 0, groups, r])
    if bits == 32:
        past, present = cache("latent", ir.DataType.FLOAT, groups * r, latent_new)
        return [past], [present], b.op("Reshape", [present, group_shape])
    grouped = b.op("Reshape", [latent_new, group_shape])                                     # [B, S, G, r]
    amax = b.op("ReduceMax", [b.op("Abs", [grouped]), b.i64("last_axis", [3])], [ir.AttrInt64("keepdims", 1)])
    # An all-zero group gets the smallest normal scale (codes 0) instead of a 0/0.
    scale = b.op("Max", [b.op("Div", [amax, b.const("qmax", np.array(127.0, np.float32))]),
                         b.const("tiny", np.array(np.finfo(np.float32).tiny, np.float32))], name="latent_scale")
    codes = b.op("Round", [b.op("Div", [grouped, scale])])
    codes = b.op("Clip", [codes, b.const("lo", np.array(-127.0, np.float32)),
                          b.const("hi", np.array(127.0, np.float32))])
    codes = b.op("Cast", [codes], [ir.AttrInt64("to", ir.DataType.INT8)], "latent_codes")
    flat_codes = b.op("Reshape", [codes, b.i64(f"{side.kind}_codes_shape", [0, 0, groups * r])])
    flat_scale = b.op("Reshape", [scale, b.i64(f"{side.kind}_scale_shape", [0, 0, groups])])
    past_q, present_q = cache("latent_q", ir.DataType.INT8, groups * r, flat_codes)
    past_s, present_s = cache("latent_scale", ir.DataType.FLOAT, groups, flat_scale)
    all_codes = b.op("Cast", [b.op("Reshape", [present_q, group_shape])], [ir.AttrInt64("to", ir.DataType.FLOAT)])
    all_scale = b.op("Unsqueeze", [present_s, b.i64("scale_axis", [3])])                     # [B, T, G, 1]
    return [past_q, past_s], [present_q, present_s], b.op("Mul", [all_codes, all_scale], name="latent_dequant")


def _rewrite_layer(graph: ir.Graph, layer: _LayerRewrite, kv_heads: int, head_dim: int,
                   bits: int = 32) -> dict[str, Any]:
    m = layer.match
    i, hq = layer.index, layer.q_heads
    groups = len((layer.key or layer.value).bases)
    b = _Builder(graph, f"low_rank_kv/layer{i}")
    new_io: dict[str, tuple[list[ir.Value], list[ir.Value]]] = {}
    remove: list[ir.Node] = []
    qk = m.key_path[-1]
    pv = m.remove[-1]

    if layer.key is not None:
        side = layer.key
        r = side.rank
        # Key side of the attention core: keys^T [-> Mul(sqrt scale)] -> MatMul(q, .) (with
        # the shape arithmetic that served it alone). An SDPA decomposition's constant scale
        # of K^T is folded into the query-side basis.
        core = [*m.key_path, *m.dead_k]
        pasts, presents, split = _latent_cache(b, side, i, kv_heads, head_dim, bits)
        keys_t = b.op("Transpose", [split], [ir.AttrInt64s("perm", [0, 2, 3, 1])], "key_latent_t")  # [B,G,r,T]
        up = b.const("key_up", (m.key_scale * _per_head(side, kv_heads, head_dim, hq)).astype(np.float32))
        q_lat = b.op("MatMul", [m.query, up], name="query_latent")                   # [B, Hq, S, r]
        q_grp = b.op("Reshape", [q_lat, b.i64("query_group_shape", [0, groups, -1, r])])
        scores = b.op("MatMul", [q_grp, keys_t], name="scores")                     # [B, G, hpg*S, T]
        scores = b.op("Reshape", [scores, b.i64("scores_shape", [0, hq, -1, 0])])    # [B, Hq, S, T]
        scores.dtype, scores.shape = qk.outputs[0].dtype or ir.DataType.FLOAT, qk.outputs[0].shape
        graph.insert_before(qk, b.nodes)
        b.nodes = []
        ir.convenience.replace_all_uses_with(qk.outputs[0], scores)
        remove += [side.concat, *m.repeat_k, *core]
        new_io["key"] = (pasts, presents)

    if layer.value is not None:
        side = layer.value
        r = side.rank
        pasts, presents, split = _latent_cache(b, side, i, kv_heads, head_dim, bits)
        values = b.op("Transpose", [split], [ir.AttrInt64s("perm", [0, 2, 1, 3])], "value_latent_t")  # [B,G,T,r]
        softmax = pv.inputs[0]
        p_grp = b.op("Reshape", [softmax, b.i64("probs_group_shape", [0, groups, -1, 0])])  # [B,G,hpg*S,T]
        mixed = b.op("MatMul", [p_grp, values], name="probs_latent")                       # [B,G,hpg*S,r]
        mixed = b.op("Reshape", [mixed, b.i64("mixed_shape", [0, hq, -1, r])])             # [B,Hq,S,r]
        up = b.const("value_up", _per_head(side, kv_heads, head_dim, hq).transpose(0, 2, 1).astype(np.float32))
        out = b.op("MatMul", [mixed, up], name="value_up")                                 # [B,Hq,S,D]
        out.dtype, out.shape = pv.outputs[0].dtype or ir.DataType.FLOAT, pv.outputs[0].shape
        graph.insert_before(pv, b.nodes)
        b.nodes = []
        ir.convenience.replace_all_uses_with(pv.outputs[0], out)
        remove += [side.concat, *m.repeat_v, *m.dead_v, pv]
        new_io["value"] = (pasts, presents)

    # Shape nodes that read a replaced cache tensor (exporters take batch / past length
    # from them): rebuild [B, kv_heads, len, head_dim] from the past latent's [B, P, r]
    # (+ the new tokens' S for a present tensor; the present latent itself is produced
    # only where the attention was, possibly after the Shape node's consumers).
    # Shape readers of the repeated keys / values sized by batch, head and head dim read
    # the attention's output instead (the value side's new one, or the kept MatMul's).
    rewire_out_shapes(graph, m, (out if layer.value is not None else pv.outputs[0]))
    replaced = {}
    for kind, (pasts, _) in new_io.items():
        concat = (layer.key if kind == "key" else layer.value).concat
        replaced[concat.inputs[0]] = (pasts[0], None)
        replaced[m.past_k if kind == "key" else m.past_v] = (pasts[0], None)  # also past of an identity Concat
        replaced[concat.outputs[0]] = (pasts[0], concat.inputs[1])
        repeat = m.repeat_k if kind == "key" else m.repeat_v
        if repeat:  # a Shape of the repeated tensor that reads batch, length or head dim only
            replaced[repeat[-1].outputs[0]] = (pasts[0], concat.inputs[1])
    for shape_node, _ in m.shape_users:
        if shape_node.inputs[0] not in replaced:
            continue
        past, new = replaced[shape_node.inputs[0]]
        dims = b.op("Shape", [past], name="latent_shape")
        bdim = b.op("Slice", [dims, b.i64("s0", [0]), b.i64("s1", [1])])
        tdim = b.op("Slice", [dims, b.i64("t1", [1]), b.i64("t2", [2])])
        if new is not None:
            s_len = b.op("Shape", [new], [ir.AttrInt64("start", 2), ir.AttrInt64("end", 3)], "new_len")
            tdim = b.op("Add", [tdim, s_len], name="total_len")
        full = b.op("Concat", [bdim, b.i64("heads", [kv_heads]), tdim, b.i64("hd", [head_dim])],
                    [ir.AttrInt64("axis", 0)], "old_shape")
        start = shape_node.attributes.get_int("start", 0)
        end = shape_node.attributes.get_int("end", 4)
        sliced = b.op("Slice", [full, b.i64("start", [start]), b.i64("end", [end])])
        graph.insert_before(shape_node, b.nodes)
        b.nodes = []
        ir.convenience.replace_all_uses_with(shape_node.outputs[0], sliced)
        remove.append(shape_node)

    # Cache I/O: each latent takes its full tensor's place.
    for kind, (pasts, presents) in new_io.items():
        pos = list(graph.inputs).index(m.past_k if kind == "key" else m.past_v)
        graph.inputs.pop(pos)
        for j, past in enumerate(pasts):
            graph.inputs.insert(pos + j, past)
        pos = [v.name for v in graph.outputs].index(f"present.{i}.{kind}")
        graph.outputs.pop(pos)
        for j, present in enumerate(presents):
            graph.outputs.insert(pos + j, present)
    remove_nodes(graph, list({id(n): n for n in remove}.values()))
    return {"layer": i, "q_heads": hq, "groups": groups}


def apply(model: ir.Model, options: LowRankKVOptions, *, explain: bool = False) -> PassResult:
    """Rewrite every layer's attention onto latent caches; count = layers rewritten."""
    del explain  # a mismatch is an error (all layers or none), with its reason
    graph = model.graph
    if "toolkit.kv_quant" in model.metadata_props or any(n.op_type == "QuantKVAttention" for n in graph):
        raise PassError("low-rank-kv: the model already has a quantized KV cache (kv-cache pass), which replaced "
                        "the attention this pass rewrites",
                        hint="run either --kv-cache or --kv-rank-ratio; to quantize the latent cache use "
                             "--kv-rank-ratio R --kv-latent-bits 8 (low-rank-kv.latent_bits=8)")
    pasts = {int(mt.group(1)): v for v in graph.inputs if (mt := _PAST.match(v.name or ""))}
    if not pasts:
        latent = [v.name for v in graph.inputs if "_latent" in (v.name or "")]
        why = ("the cache is already latent (low-rank-kv ran before)" if latent else
               "the model has no past_key_values.{i}.key inputs (export it with `toolkit export`)")
        return PassResult(name=PASS.name, count=0, explanations=[why])
    inputs = {v.name: v for v in graph.inputs}
    layers = []
    for index in sorted(pasts):
        past_v = inputs.get(f"past_key_values.{index}.value")
        if past_v is None:
            raise PassError(f"low-rank-kv: input past_key_values.{index}.value is missing",
                            hint="the model must have a flat KV cache (`toolkit export`)")
        try:
            match = match_layer(model, index, pasts[index], past_v)
        except NoMatch as err:
            raise PassError(f"low-rank-kv: layer {index}: {err}",
                            hint=SLICED_CACHE_HINT if isinstance(err, SlicedCache) else
                            "the pass rewrites the attention kv-cache matches (eager from `toolkit export`, torch "
                            "exporters' SDPA forms) except ONNX Attention nodes; run `toolkit inspect` and report "
                            "the pattern") from None
        if match.form != "eager":
            raise PassError(f"low-rank-kv: layer {index}: the attention is an ONNX Attention node, whose score "
                            "and value products this pass cannot split",
                            hint="export at opset 21 or 22 (torch then writes the attention as MatMul/Softmax), or "
                                 "use --kv-cache, which rewrites Attention nodes")
        layers.append(_LayerRewrite(index, match,
                                    _Side("key", match.past_k, match.concat_k) if options.keys else None,
                                    _Side("value", match.past_v, match.concat_v) if options.values else None))

    shape = layers[0].match.past_k.shape
    if shape is None or len(shape) != 4 or not isinstance(shape[1], int) or not isinstance(shape[3], int):
        raise PassError(f"low-rank-kv: input {layers[0].match.past_k.name!r} has shape {shape}; expected "
                        "[batch, kv_heads, past_len, head_dim] with static kv_heads and head_dim",
                        hint="re-export with `toolkit export`")
    kv_heads, head_dim = shape[1], shape[3]
    if kv_heads % options.groups:
        raise PassError(f"low-rank-kv: groups={options.groups} does not divide kv_heads={kv_heads}",
                        hint=f"use a divisor of {kv_heads} (1 = one basis per layer)")
    _calibrate(model, layers, options)
    report = []
    for layer in layers:
        if layer.q_heads % kv_heads:
            raise PassError(f"low-rank-kv: layer {layer.index}: {layer.q_heads} query heads is not a multiple of "
                            f"{kv_heads} KV heads", hint="report the model")
        entry: dict[str, Any] = {"layer": layer.index}
        for side in (layer.key, layer.value):
            if side is not None:
                _fit(side, options.groups, options, layer.q_cov if side.kind == "key" else None)
                entry[f"{side.kind}_rank"] = side.rank * options.groups
                entry[f"{side.kind}_kept_energy"] = side.kept_energy
        entry.update(_rewrite_layer(graph, layer, kv_heads, head_dim, options.latent_bits))
        report.append(entry)

    full = kv_heads * head_dim

    def side_bytes(rank: int | None) -> int:
        if rank is None:
            return 4 * full  # that side stays a float32 [kv_heads, head_dim] row
        # int8: one byte per latent value, plus a float32 scale per head group
        return 4 * rank if options.latent_bits == 32 else rank + 4 * options.groups

    per_token = sum(side_bytes(e.get("key_rank")) + side_bytes(e.get("value_rank")) for e in report)
    fp32 = 2 * full * 4 * len(layers)
    info = {"layers": report, "kv_heads": kv_heads, "head_dim": head_dim, "groups": options.groups,
            "keys": options.keys, "values": options.values, "query_aware": options.query_aware,
            "rank_ratio": options.rank_ratio, "energy": options.energy, "latent_bits": options.latent_bits,
            "bytes_per_token": per_token, "fp32_bytes_per_token": fp32, "reduction_vs_fp32": fp32 / per_token}
    model.metadata_props["toolkit.low_rank_kv"] = json.dumps(info, sort_keys=True)
    model.metadata_props["toolkit.kv_cache"] = "fp32-latent" if options.latent_bits == 32 else "int8-latent"
    return PassResult(name=PASS.name, count=len(layers),
                      details={"bytes_per_token": per_token, "fp32_bytes_per_token": fp32,
                               "reduction_vs_fp32": fp32 / per_token, "layers": report})


PASS = GraphPass(
    name="low-rank-kv",
    description="Cache a rank-r latent of the keys/values per token (Palu/xKV style, calibrated PCA basis; "
    "up-projection folded into query and output); changes the cache I/O",
    options_type=LowRankKVOptions,
    apply=apply,
)
