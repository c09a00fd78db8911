"""NumPy reference of the toolkit's custom operators (domain ``com.toolkit``).

Independent of the C++ kernels: plain NumPy in float64, used by the parity tests
and as the portable fallback. The operator contract (including the NaN/Inf rules
measured on ONNX Runtime 1.32) is documented in
``custom_ops/softmax_topk/softmax_topk.h``.
"""

from __future__ import annotations

import numpy as np


def _rank(x: np.ndarray) -> np.ndarray:
    """Row-wise order of ONNX Runtime's TopK: NaN first, then descending, ties by lower index."""
    key = -x  # -(-0.0) == 0.0 == -(0.0) compares equal, as in ORT
    key = np.where(np.isnan(x), -np.inf, key)
    # NaN and +inf both map to -inf; put NaN first with a primary key.
    primary = np.where(np.isnan(x), 0, 1)
    order = np.argsort(key, axis=-1, kind="stable")
    order = np.take_along_axis(order, np.argsort(np.take_along_axis(primary, order, -1), axis=-1, kind="stable"), -1)
    return order


def temperature_problem(temperature: float) -> str | None:
    """Why the kernels would refuse this ``temperature`` attribute, or None. They take it
    as float32 and need it > 0 and finite with a finite 1 / T (a tiny subnormal T's
    inverse overflows): the rule of FusedSoftmaxTopK's and SampleTopKTopP's checks."""
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        t = np.float32(temperature)
        ok = bool(t > 0) and bool(np.isfinite(t)) and bool(np.isfinite(np.float32(1.0) / t))
    if ok:
        return None
    return (f"must be > 0 and finite with a finite inverse in float32 (about 3e-39 or more); got {temperature!r}"
            + ("" if float(t) == temperature else f" ({float(t)!r} in float32)"))


def softmax_topk(
    logits: np.ndarray,
    k: int,
    temperature: float = 1.0,
    normalize: int = 0,
    log_probs: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reference of ``com.toolkit::FusedSoftmaxTopK``.

    Args:
        logits: float32 or float16 array of shape ``[..., V]``.
        k: number of entries kept, ``1 <= k <= V``.
        temperature: probabilities are ``softmax(logits / temperature)``, > 0.
        normalize: 0 = probabilities over the full row (Softmax -> TopK); 1 =
            renormalised over the kept k (TopK -> Softmax).
        log_probs: return log-probabilities.

    Returns:
        ``(values [..., k] in the input dtype, indices [..., k] int64,
        log_normalizer [...] float32)``.
    """
    x_in = np.asarray(logits)
    if x_in.ndim < 1 or x_in.shape[-1] < 1:
        raise ValueError(f"logits must have rank >= 1 and a non-empty last axis, got shape {x_in.shape}")
    V = x_in.shape[-1]
    if not 1 <= k <= V:
        raise ValueError(f"expected 1 <= k <= {V}, got k={k}")
    if not temperature > 0:
        raise ValueError(f"expected temperature > 0, got {temperature}")
    lead = x_in.shape[:-1]
    x = x_in.astype(np.float64).reshape(-1, V)
    rows = x.shape[0]

    has_nan = np.isnan(x).any(axis=1)
    has_pinf = np.isposinf(x).any(axis=1)
    all_ninf = np.isneginf(x).all(axis=1)
    poisoned = has_nan | has_pinf | all_ninf

    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        m = np.where(poisoned, 0.0, np.max(np.where(np.isnan(x), -np.inf, x), axis=1))
        t = (x - m[:, None]) / temperature
        lse = np.log(np.sum(np.exp(t), axis=1))
        log_norm = m / temperature + lse
    log_norm = np.where(all_ninf, -np.inf, log_norm)
    log_norm = np.where(has_pinf, np.inf, log_norm)
    log_norm = np.where(has_nan, np.nan, log_norm)

    order = _rank(x)[:, :k]
    indices = order.copy()
    values = np.empty((rows, k), dtype=np.float64)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        if normalize:
            kept = np.take_along_axis(x, order, axis=1)
            tk = (kept - kept[:, :1]) / temperature
            lse_k = np.log(np.sum(np.exp(tk), axis=1, keepdims=True))
            values = tk - lse_k if log_probs else np.exp(tk - lse_k)
        else:
            tk = np.take_along_axis(t, order, axis=1)
            values = tk - lse[:, None] if log_probs else np.exp(tk - lse[:, None])
            # ORT: the probability row is all NaN, and TopK of NaNs keeps 0..k-1.
            indices[poisoned] = np.arange(k)
    values[poisoned] = np.nan

    out_shape = (*lead, k)
    return (
        values.astype(x_in.dtype).reshape(out_shape),
        indices.astype(np.int64).reshape(out_shape),
        log_norm.astype(np.float32).reshape(lead),
    )


_MASK64 = (1 << 64) - 1


def _splitmix64(z: int) -> int:
    """SplitMix64 (Steele, Lea & Flood 2014), as in custom_ops/sample_topk/sample_math.h."""
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def uniform(seed: int, row: int) -> float:
    """The uniform number in [0, 1) that row ``row`` of a call with ``seed`` draws."""
    bits = _splitmix64(_splitmix64(seed & _MASK64) ^ (row & _MASK64))
    return (bits >> 11) * (1.0 / 9007199254740992.0)


def call_seed(seed: int, call: int) -> int:
    """The ``sampling_seed`` a host feeds for call ``call`` of a run with base seed
    ``seed`` (an int64; ``CallSeed`` in sample_math.h). The base is hashed so that runs
    with nearby seeds draw unrelated streams (``seed + call`` made seed s's call i + 1
    equal seed s + 1's call i)."""
    v = (_splitmix64(seed & _MASK64) + call) & _MASK64
    return v - (1 << 64) if v >= 1 << 63 else v


def sample_position(probs: np.ndarray, top_p: float, min_p: float, u: float) -> int:
    """The draw over descending top-k probabilities, in transformers' order: top-p on the
    top-k mass (zero probabilities after the first left out), then min-p relative to the
    largest, then ``u`` over what is kept."""
    p = [float(v) for v in probs]
    if np.isnan(p[0]):
        return 0
    m, total = 0, 0.0
    for i, v in enumerate(p):
        if i > 0 and not v > 0.0:
            break
        total += v
        m += 1
    mass, n = 0.0, 0
    while n < m:
        mass += p[n]
        n += 1
        if mass >= top_p * total:
            break
    q, kept = 1, p[0]
    while q < n and p[q] >= min_p * p[0]:
        kept += p[q]
        q += 1
    target, c = u * kept, 0.0
    for j in range(q):
        c += p[j]
        if c > target:
            return j
    return q - 1


def draw_margin(probs: np.ndarray, top_p: float, min_p: float, u: float) -> float:
    """How far (in probability) :func:`sample_position`'s decision lies from flipping:
    the smallest distance from a prefix mass to the top-p cut, from a candidate to the
    min-p cut, and from the draw ``u * kept`` to a cumulative boundary of the kept
    candidates. Probabilities that move by less than this cannot change the drawn token."""
    p = np.asarray(probs, np.float64)
    if not len(p) or np.isnan(p[0]):
        return 0.0
    valid = (np.arange(len(p)) == 0) | (p > 0)
    m = int(np.argmin(valid)) if not valid.all() else len(p)
    cum = np.cumsum(p[:m])
    total = float(cum[-1])
    margins: list[float] = []
    n = min(int(np.searchsorted(cum, top_p * total)) + 1, m) if top_p < 1 else m
    if top_p < 1:
        margins += [abs(float(c) - top_p * total) for c in cum]
    if min_p > 0:
        margins += [abs(float(v) - min_p * float(p[0])) for v in p[1:n]]
    below = np.flatnonzero(p[1:n] < min_p * p[0])
    q = int(below[0]) + 1 if len(below) else n
    kept = float(cum[q - 1])
    margins += [abs(float(c) - u * kept) for c in cum[:q]]
    return min(margins) if margins else float("inf")


def sample_topk_top_p(
    logits: np.ndarray,
    k: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    seed: int | np.ndarray = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Reference of ``com.toolkit::SampleTopKTopP`` (contract in sample_topk.h).

    ``seed``: the call's seed (row ``r`` draws ``uniform(seed, r)``), or one per row of
    ``logits`` (row ``r`` draws ``uniform(seed[r], 0)``: what it draws alone in a call
    with that seed, whatever its slot in the batch).

    Returns:
        ``(token_ids [...] int64, token_probs [...] float32)``.
    """
    if not 0 < top_p <= 1:
        raise ValueError(f"expected 0 < top_p <= 1, got {top_p}")
    if not 0 <= min_p < 1:
        raise ValueError(f"expected 0 <= min_p < 1, got {min_p}")
    # The op's attributes are float32: 0.05 arrives as 0.0500000007. With tied
    # probabilities the top-p cut can fall exactly on such a value, so use theirs.
    top_p, min_p = float(np.float32(top_p)), float(np.float32(min_p))
    temperature = float(np.float32(temperature))
    values, indices, _ = softmax_topk(logits, k, temperature)
    lead = values.shape[:-1]
    values = values.astype(np.float64).reshape(-1, k)
    indices = indices.reshape(-1, k)
    ids = np.empty(values.shape[0], np.int64)
    probs = np.empty(values.shape[0], np.float32)
    seeds = np.asarray(seed, np.int64).reshape(-1)
    if seeds.size not in (1, values.shape[0]):
        raise ValueError(f"expected one seed or one per row ({values.shape[0]}), got {seeds.size}")
    for r in range(values.shape[0]):  # (one row: uniform(s, 0) either way)
        u = uniform(int(seeds[r]), 0) if seeds.size > 1 else uniform(int(seeds[0]), r)
        j = sample_position(values[r], top_p, min_p, u)
        ids[r], probs[r] = indices[r, j], values[r, j]
    return ids.reshape(lead), probs.reshape(lead)


def quantize_columns(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per output column: ``w[:, j] ~ scale[j] * q[:, j]``, ``q`` in [-127, 127].

    The layout of LowRankMatMul's int8 weights (``lowrank_matmul.h``). A zero column
    gets scale 1 (its codes are 0).

    Args:
        w: float ``[rows, cols]``.

    Returns:
        ``(q int8 [rows, cols], scale float32 [cols])``.
    """
    w = np.asarray(w, np.float64)
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {w.shape}")
    amax = np.abs(w).max(axis=0)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale.astype(np.float64)), -127, 127).astype(np.int8)
    return q, scale


def lowrank_matmul(
    x: np.ndarray,
    U: np.ndarray,
    V: np.ndarray,
    bias: np.ndarray | None = None,
    u_scale: np.ndarray | None = None,
    v_scale: np.ndarray | None = None,
) -> np.ndarray:
    """Reference of ``com.toolkit::LowRankMatMul``: ``(x @ U) @ V + bias`` in float64.

    Contract in ``custom_ops/lowrank_matmul/lowrank_matmul.h``. float16 weights are
    widened exactly, so the reference sees the very values the kernel multiplies;
    int8 weights are codes times their column scale (``quantize_columns``).

    Args:
        x: float32 array ``[..., K]``.
        U: float32, float16 or int8 ``[K, r]``.
        V: same dtype as ``U``, ``[r, N]``.
        bias: optional float32 ``[N]``.
        u_scale, v_scale: float32 ``[r]`` / ``[N]``, exactly when ``U`` / ``V`` are int8.

    Returns:
        float32 array ``[..., N]``.
    """
    x, U, V = np.asarray(x), np.asarray(U), np.asarray(V)
    if x.ndim < 1 or x.shape[-1] < 1:
        raise ValueError(f"x must have rank >= 1 and a non-empty last axis, got shape {x.shape}")
    if U.ndim != 2 or U.shape[0] != x.shape[-1] or U.shape[1] < 1:
        raise ValueError(f"U must be [K={x.shape[-1]}, r>=1], got shape {U.shape}")
    if V.ndim != 2 or V.shape[0] != U.shape[1] or V.shape[1] < 1:
        raise ValueError(f"V must be [r={U.shape[1]}, N>=1], got shape {V.shape}")
    int8 = U.dtype == np.int8
    if int8 != (u_scale is not None) or int8 != (v_scale is not None) or (V.dtype == np.int8) != int8:
        raise ValueError("u_scale and v_scale go with int8 U and V, and only with them")
    Uf, Vf = U.astype(np.float64), V.astype(np.float64)
    if int8:
        u_scale, v_scale = np.asarray(u_scale), np.asarray(v_scale)
        if u_scale.shape != (U.shape[1],) or v_scale.shape != (V.shape[1],):
            raise ValueError(f"u_scale must be [{U.shape[1]}] and v_scale [{V.shape[1]}], "
                             f"got {u_scale.shape} and {v_scale.shape}")
        Uf, Vf = Uf * u_scale.astype(np.float64), Vf * v_scale.astype(np.float64)
    y = (x.astype(np.float64) @ Uf) @ Vf
    if bias is not None:
        bias = np.asarray(bias)
        if bias.shape != (V.shape[1],):
            raise ValueError(f"bias must be [N={V.shape[1]}], got shape {bias.shape}")
        y = y + bias.astype(np.float64)
    return y.astype(np.float32)
