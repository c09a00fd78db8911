"""HTML rendering of parity reports: one self-contained file for CI artifacts.

``toolkit parity`` already emits its records as text, JSON and JUnit XML (see
:mod:`toolkit.parity`); a reviewer looking at a CI run wants pictures: where the
errors of each output fall, which decoder layer starts to diverge, and, across
compression settings (``--kv-cache``, ``--param-budget``), how perplexity and greedy
agreement move. This module turns report dictionaries (``ParityReport.to_dict()``
or a ``parity.json`` read back) into one HTML page with:

* a verdict table: one row per record with the thresholds it was judged against,
* one error-histogram plot per output name, the phases overlaid,
* a per-layer divergence plot (max abs error and 1 - cosine of
  ``present.{i}.key/value`` against layer ``i``, one line per phase),
* held-out perplexity and greedy agreement when the report has them,
* with several reports, curves of perplexity increase and greedy agreement against
  the setting each report measured.

The page is self-contained (plots are inline PNG data URIs; no script, style sheet
or image is fetched), so it can be archived or mailed as one file. The numbers
behind every plot are also in HTML tables and in one
``<script type="application/json" id="report-data">`` block, so tests and tools can
check a plot against the report without reading pixels. Reports written by older
versions lack some fields (``model_metadata``, ``histogram_edges``, ``perplexity``);
those sections are left out or labelled "n/a" instead of failing. Plots need
matplotlib (Agg, no display); without it the page keeps its tables and says why the
plots are missing.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from toolkit.errors import ToolkitError

__all__ = ["compare_rows", "layer_divergence", "load_report", "render_html", "setting_label"]

_PRESENT = re.compile(r"^present\.(\d+)\.(key|value)$")
# Zero errors cannot sit on a log axis: plotted at this floor (the tables show the true value).
_LOG_FLOOR = 1e-17

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.4em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ccc}h3{font-size:1.05em}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}
th,td{border:1px solid #ccc;padding:2px 6px;text-align:left;vertical-align:top}
th{background:#f3f3f3}td.num{text-align:right;font-family:ui-monospace,Menlo,Consolas,monospace}
tr.fail td{background:#fde8e8}.verdict-pass{color:#1a7f37;font-weight:bold}
.verdict-fail{color:#c62828;font-weight:bold}.note{color:#666;font-size:.85em}
.plots{display:flex;flex-wrap:wrap;gap:10px}.plots figure{margin:0}
figcaption{font-size:.8em;color:#444;text-align:center}
"""


# ---------------------------------------------------------------- input


def load_report(path: str | Path) -> dict[str, Any]:
    """Read a parity JSON report written by ``toolkit parity --json`` or ``toolkit convert``.

    Args:
        path: the JSON file (a bundle directory is accepted too: its ``parity.json``).

    Returns:
        The report dictionary.

    Raises:
        ToolkitError: the file does not exist, is not JSON, or is not a parity report.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "parity.json"
    if not path.is_file():
        raise ToolkitError(f"parity report {str(path)!r} does not exist",
                           hint="pass parity.json files written by `toolkit convert` (in the bundle) or "
                           "`toolkit parity --json PATH`")
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ToolkitError(f"parity report {str(path)!r} is not valid JSON ({exc})",
                           hint="the file is truncated or not a report: regenerate it with "
                           "`toolkit parity ... --json PATH`") from exc
    if not isinstance(data, dict) or not isinstance(data.get("records"), list):
        raise ToolkitError(f"{str(path)!r} is JSON but not a parity report (no 'records' list)",
                           hint="pass the parity.json of a bundle or a file from `toolkit parity --json`; "
                           "`--bisect` JSON is a different format")
    return data


def _as_dict(report: Any) -> dict[str, Any]:
    return report.to_dict() if hasattr(report, "to_dict") else report


def _num(v: Any) -> float | None:
    """A JSON number (or the strings 'inf'/'nan' that to_dict writes) as float; None if absent."""
    if v is None or isinstance(v, bool):
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _passed(rec: dict[str, Any]) -> bool:
    if "passed" in rec:
        return bool(rec["passed"])
    return not rec.get("failures")


# ---------------------------------------------------------------- labels


def setting_label(report: dict[str, Any], path: str | Path | None = None) -> str:
    """Name the compression setting a report measured.

    From the model's ``toolkit.*`` metadata (recorded in ``model_metadata``): the
    quantized KV scheme (and a latent cache's rank rule), the low-rank budget / ratio /
    energy (and ASVD or whitening, int8 factors), the sampling head; ``fp32`` for a
    model with none of them. Reports without metadata (older files) are named after
    their file: the bundle directory for a ``parity.json``, else the file's stem.

    Args:
        report: a parity report dictionary.
        path: where it was read from (fallback label).

    Returns:
        A short label such as ``"kv int8"`` or ``"low-rank budget=0.6 ASVD"``.
    """
    meta = report.get("model_metadata") or {}
    parts: list[str] = []
    kv = meta.get("toolkit.kv_cache")
    if kv and kv != "fp32":
        label = f"kv {kv}"
        try:
            info = json.loads(meta.get("toolkit.kv_quant") or "{}")
            latent = json.loads(meta.get("toolkit.low_rank_kv") or "{}")
        except json.JSONDecodeError:
            info, latent = {}, {}
        if kv.startswith("kivi") and "key_group" in info:
            label += f" G{info['key_group']} R{info.get('residual', '?')}"
        if isinstance(latent, dict):  # the latent cache's rank rule
            label += "".join(f" {k.replace('rank_', '')}={latent[k]}" for k in ("rank_ratio", "energy")
                             if latent.get(k) is not None)
        parts.append(label)
    if meta.get("toolkit.low_rank"):
        try:
            lr = json.loads(meta["toolkit.low_rank"])
        except json.JSONDecodeError:
            lr = {}
        opts = lr.get("options", {}) if isinstance(lr, dict) else {}
        chosen = [f"{k.replace('param_', '').replace('rank_', '')}={opts[k]}"
                  for k in ("param_budget", "rank_ratio", "energy") if opts.get(k) is not None]
        method = ["ASVD"] if opts.get("activation_aware") else ["whitened"] if opts.get("whiten") else []
        parts.append(" ".join(["low-rank", *chosen, *method] + (["int8"] if opts.get("int8_weights") else [])))
    if meta.get("toolkit.sampling_head"):
        try:
            head = json.loads(meta["toolkit.sampling_head"])
        except json.JSONDecodeError:
            head = {}
        parts.append(f"head k={head.get('k', '?')}")
    if parts:
        return ", ".join(parts)
    if meta:
        return "fp32"
    if path is not None:
        return _file_label(path)
    optimized = Path(str(report.get("optimized") or "report"))
    bundle = optimized.name == "model.onnx" and optimized.parent.name
    return optimized.parent.name if bundle else optimized.stem


def _file_label(path: str | Path) -> str:
    p = Path(path)
    if p.is_dir():
        return p.resolve().name
    if p.name == "parity.json" and p.parent.name:
        return p.parent.name
    return p.stem or p.name


# ---------------------------------------------------------------- derived data


def _present_thresholds(rec_name: str, th: dict[str, Any]) -> list[tuple[str, str, float | None]]:
    """The (metric, comparison, bound) checks ``parity.apply_thresholds`` applies to a record."""
    from toolkit.parity import HeadCheck

    if rec_name in HeadCheck.RECORD_NAMES:
        return [("max abs", "<=", _num(th.get("head_probs_max_abs"))),
                ("top-1", ">=", _num(th.get("top1_min")))]
    kind = "logits" if rec_name == "logits" else "present"
    checks = [("max abs", "<=", _num(th.get(f"{kind}_max_abs"))),
              ("cosine", ">=", _num(th.get(f"{kind}_cosine_min")))]
    if kind == "logits":
        checks += [("top-1", ">=", _num(th.get("top1_min"))), ("KL mean", "<=", _num(th.get("kl_mean_max")))]
    return checks


def layer_divergence(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Per-layer cache errors: one row per ``present.{i}.key/value`` record.

    Args:
        report: a parity report dictionary.

    Returns:
        Rows ``{"phase", "layer", "kind", "max_abs", "cosine", "passed"}`` sorted by
        phase (report order), layer and kind. Empty when the model's cache is not
        float32 (quantized caches are judged on logits, not cache tensors).
    """
    phases: dict[str, int] = {}
    rows = []
    for rec in report.get("records", []):
        m = _PRESENT.match(str(rec.get("name", "")))
        if not m:
            continue
        phase = str(rec.get("phase", "?"))
        phases.setdefault(phase, len(phases))
        rows.append({"phase": phase, "layer": int(m.group(1)), "kind": m.group(2),
                     "max_abs": _num(rec.get("max_abs")), "cosine": _num(rec.get("cosine")),
                     "passed": _passed(rec)})
    rows.sort(key=lambda r: (phases[r["phase"]], r["layer"], r["kind"]))
    return rows


def _summary_numbers(report: dict[str, Any]) -> dict[str, Any]:
    """The numbers one report contributes to a comparison (None where absent)."""
    records = report.get("records", [])
    greedy = [r for r in records if str(r.get("phase", "")).startswith("greedy")]
    decode_top1 = [_num(r.get("top1_agreement")) for r in records
                   if r.get("name") == "logits" and str(r.get("phase", "")).startswith("decode")]
    decode_top1 = [v for v in decode_top1 if v is not None]
    cosines = [_num(r.get("cosine")) for r in records if r.get("name") == "logits"]
    cosines = [c for c in cosines if c is not None]
    ppl = report.get("perplexity") if isinstance(report.get("perplexity"), dict) else None
    return {
        "profile": report.get("profile"),
        "passed": report.get("passed"),
        "ppl_reference": _num(ppl.get("reference")) if ppl else None,
        "ppl_onnx": _num(ppl.get("onnx")) if ppl else None,
        "ppl_rel_increase": _num(ppl.get("rel_increase")) if ppl else None,
        "greedy_agreement": _num(greedy[0].get("top1_agreement")) if greedy else None,
        "greedy_phase": greedy[0].get("phase") if greedy else None,
        "greedy_kl_mean": _num(greedy[0].get("kl_mean")) if greedy else None,
        "decode_top1": min(decode_top1) if decode_top1 else None,
        "logits_cosine_min": min(cosines) if cosines else None,
        "failed_records": sum(not _passed(r) for r in records) + bool(report.get("perplexity_failures")),
    }


def compare_rows(reports: Sequence[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row of comparison numbers per ``(label, report)``, in the given order."""
    return [{"label": label, **_summary_numbers(rep)} for label, rep in reports]


# ---------------------------------------------------------------- plots


class _Plotter:
    """Matplotlib (Agg canvas, no pyplot state) figures as inline PNG data URIs."""

    def __init__(self) -> None:
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError:
            self.available = False
            return
        self.available = True
        self._figure, self._canvas = Figure, FigureCanvasAgg

    def figure(self, width: float, height: float, ncols: int = 1) -> tuple[Any, list[Any]]:
        fig = self._figure(figsize=(width, height), dpi=90)
        self._canvas(fig)
        axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
        return fig, axes

    @staticmethod
    def data_uri(fig: Any) -> str:
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", metadata={"Software": None})  # no version stamp: reproducible bytes
        return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _img(uri: str, alt: str, cls: str, caption: str, **data: str) -> str:
    attrs = " ".join(f'data-{k}="{html.escape(v)}"' for k, v in data.items())
    return (f'<figure><img class="{cls}" src="{uri}" alt="{html.escape(alt)}" {attrs}>'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _edges(report: dict[str, Any], nbins: int) -> list[float] | None:
    from toolkit.parity import HIST_EDGES

    edges = report.get("histogram_edges") or HIST_EDGES
    edges = [_num(e) for e in edges]
    return edges if len(edges) == nbins + 1 and all(e is not None for e in edges) else None


def _edge_ticks(edges: list[float] | None, nbins: int) -> tuple[list[float], list[str]]:
    """Ticks on the bin boundaries (bin i spans [i, i+1]), labelled with the edge values."""
    if edges is None:
        return [i + 0.5 for i in range(nbins)], [f"bin {i}" for i in range(nbins)]
    inner = [(k, e) for k, e in enumerate(edges) if 0 < k < len(edges) - 1 and math.isfinite(e)]
    return [float(k) for k, _ in inner], [f"{e:.0e}" for _, e in inner]


def _threshold_x(edges: list[float], t: float) -> float | None:
    """Position of value ``t`` on the histogram's bin axis (bin i spans [i, i+1])."""
    if not math.isfinite(t) or t < 0:
        return None
    for k in range(len(edges) - 1):
        lo, hi = edges[k], edges[k + 1]
        if lo <= t < hi:
            if lo <= 0 or math.isinf(hi):
                return k + 0.5
            return k + (math.log10(t) - math.log10(lo)) / (math.log10(hi) - math.log10(lo))
    return None


def _histogram_plots(report: dict[str, Any], plotter: _Plotter) -> tuple[list[str], list[str]]:
    """One plot per output name (phases overlaid). Returns (figure HTML, output names)."""
    by_name: dict[str, list[dict[str, Any]]] = {}
    for rec in report.get("records", []):
        if isinstance(rec.get("histogram"), list) and rec["histogram"]:
            by_name.setdefault(str(rec.get("name")), []).append(rec)
    figures = []
    th = report.get("thresholds") or {}
    for name, recs in by_name.items():
        nbins = len(recs[0]["histogram"])
        edges = _edges(report, nbins)
        fig, (ax,) = plotter.figure(4.2, 2.6)
        for rec in recs:
            counts = [float(c) for c in rec["histogram"]]
            total = sum(counts) or 1.0
            ax.step(range(len(counts) + 1), [c / total for c in counts] + [counts[-1] / total], where="post",
                    label=f"{rec.get('phase')}{'' if _passed(rec) else ' (FAIL)'}", linewidth=1.2)
        bound = next((b for metric, _, b in _present_thresholds(name, th) if metric == "max abs"), None)
        x = _threshold_x(edges, bound) if edges and bound is not None else None
        if x is not None:
            ax.axvline(x, color="red", linestyle="--", linewidth=1, label=f"max abs bound {bound:.0e}")
        ticks, labels = _edge_ticks(edges, nbins)
        ax.set_xticks(ticks, labels, rotation=60, fontsize=6)
        ax.set_xlim(0, nbins)
        ax.set_ylabel("share of elements", fontsize=7)
        ax.set_xlabel("|onnx - reference| (bin edges; first bin holds exact zeros)", fontsize=7)
        ax.tick_params(axis="y", labelsize=6)
        ax.set_title(name, fontsize=8)
        ax.legend(fontsize=5, loc="upper right")
        figures.append(_img(plotter.data_uri(fig), f"error histogram of {name}", "histogram",
                            f"{name}: {len(recs)} phase(s)", output=name))
    return figures, list(by_name)


def _layer_plot(rows: list[dict[str, Any]], th: dict[str, Any], plotter: _Plotter) -> str:
    fig, (ax_abs, ax_cos) = plotter.figure(9, 3.2, ncols=2)
    series: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        series.setdefault((r["phase"], r["kind"]), []).append(r)
    colors: dict[str, Any] = {}
    for (phase, kind), pts in series.items():
        color = colors.setdefault(phase, f"C{len(colors) % 10}")
        style = "-" if kind == "key" else "--"
        layers = [p["layer"] for p in pts]
        abs_err = [max(p["max_abs"] or 0.0, _LOG_FLOOR) for p in pts]
        cos_err = [max(1.0 - (p["cosine"] if p["cosine"] is not None else 1.0), _LOG_FLOOR) for p in pts]
        for ax, ys in ((ax_abs, abs_err), (ax_cos, cos_err)):
            ax.plot(layers, ys, style, marker="o", markersize=3, color=color, label=f"{phase} {kind}")
    bound_abs, bound_cos = _num(th.get("present_max_abs")), _num(th.get("present_cosine_min"))
    if bound_abs is not None and math.isfinite(bound_abs) and bound_abs > 0:
        ax_abs.axhline(bound_abs, color="red", linestyle=":", linewidth=1, label="bound")
    if bound_cos is not None and 0 < 1 - bound_cos < 1:
        ax_cos.axhline(1 - bound_cos, color="red", linestyle=":", linewidth=1, label="bound")
    n_layers = max(r["layer"] for r in rows) + 1
    for ax, ylabel in ((ax_abs, "max |onnx - reference|"), (ax_cos, "1 - cosine")):
        ax.set_yscale("log")
        ax.set_xlabel("layer", fontsize=7)
        ax.set_ylabel(ylabel, fontsize=7)
        ax.set_xticks(range(n_layers))
        ax.tick_params(labelsize=6)
    ax_abs.set_title("cache max abs error per layer (key solid, value dashed)", fontsize=8)
    ax_cos.set_title(f"cache 1 - cosine per layer (0 drawn at {_LOG_FLOOR:.0e})", fontsize=8)
    ax_cos.legend(fontsize=5, loc="best")
    return _img(plotter.data_uri(fig), "per-layer divergence of present.{i}.key/value", "layer-divergence",
                f"{n_layers} layers, {len(series)} series")


def _compare_plot(rows: list[dict[str, Any]], plotter: _Plotter) -> str:
    fig, (ax_ppl, ax_agree) = plotter.figure(9, 3.2, ncols=2)
    x = list(range(len(rows)))
    labels = [r["label"] for r in rows]

    def line(ax: Any, key: str, scale: float, label: str, marker: str) -> None:
        ys = [float("nan") if r[key] is None else scale * r[key] for r in rows]
        ax.plot(x, ys, marker=marker, label=label)
        for xi, y in zip(x, ys):
            if not math.isnan(y):
                ax.annotate(f"{y:.3g}", (xi, y), fontsize=6, textcoords="offset points", xytext=(0, 4),
                            ha="center")

    line(ax_ppl, "ppl_rel_increase", 100.0, "held-out perplexity", "o")
    line(ax_agree, "greedy_agreement", 100.0, "greedy agreement (teacher-forced)", "o")
    line(ax_agree, "decode_top1", 100.0, "decode top-1 (parity phases, min)", "s")
    ax_ppl.axhline(0.0, color="gray", linewidth=0.8)
    ax_ppl.set_ylabel("perplexity increase (%)", fontsize=7)
    ax_agree.set_ylabel("agreement with reference (%)", fontsize=7)
    for ax in (ax_ppl, ax_agree):
        ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=7)
        ax.tick_params(axis="y", labelsize=6)
        ax.legend(fontsize=6, loc="best")
    ax_ppl.set_title("perplexity increase vs setting", fontsize=8)
    ax_agree.set_title("greedy agreement vs setting", fontsize=8)
    return _img(plotter.data_uri(fig), "perplexity increase and greedy agreement per setting",
                "compare-curve", ", ".join(labels), labels=json.dumps(labels))


# ---------------------------------------------------------------- HTML pieces


def _fmt(v: Any, spec: str = ".3e") -> str:
    n = _num(v)
    if n is None:
        return "n/a"
    if math.isinf(n) or math.isnan(n):
        return str(n)
    return format(n, spec)


def _pct(v: Any, spec: str = ".3f") -> str:
    n = _num(v)
    return "n/a" if n is None else f"{100 * n:{spec}}%"


def _table(headers: Iterable[str], rows: Iterable[tuple[list[str], str]], cls: str) -> str:
    """``rows``: (cells already escaped, row class)."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join(f'<tr class="{rc}">' + "".join(cells) + "</tr>" for cells, rc in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _td(text: str, num: bool = False) -> str:
    return f'<td class="num">{html.escape(text)}</td>' if num else f"<td>{html.escape(text)}</td>"


def _status_td(ok: bool, failures: list[str]) -> str:
    status = "PASS" if ok else "FAIL: " + "; ".join(failures)
    return f'<td class="status" data-status="{"pass" if ok else "fail"}">{html.escape(status)}</td>'


def _verdict_table(report: dict[str, Any]) -> str:
    th = report.get("thresholds") or {}
    rows = []
    for rec in report.get("records", []):
        ok = _passed(rec)
        checks = "; ".join(f"{m} {op} {_fmt(b, '.6g')}"
                           for m, op, b in _present_thresholds(str(rec.get("name")), th) if b is not None)
        rows.append(([_td(str(rec.get("phase", ""))), _td(str(rec.get("name", ""))),
                      _td(_fmt(rec.get("max_abs")), True), _td(_fmt(rec.get("max_rel")), True),
                      _td(_fmt(rec.get("cosine"), ".9f"), True),
                      _td(_pct(rec.get("top1_agreement"), ".2f"), True),
                      _td(_fmt(rec.get("kl_mean")), True), _td(checks or "n/a"),
                      _status_td(ok, rec.get("failures") or [])],
                     "pass" if ok else "fail"))
    ppl = report.get("perplexity")
    if isinstance(ppl, dict):
        fails = report.get("perplexity_failures") or []
        rows.append(([_td("heldout"), _td("perplexity"), _td(""),
                      _td(_fmt(ppl.get("rel_increase"), "+.3e"), True), _td(""), _td(""), _td(""),
                      _td(f"rel increase <= {_fmt(th.get('ppl_rel_increase_max'), '.6g')}"),
                      _status_td(not fails, fails)],
                     "fail" if fails else "pass"))
    headers = ("phase", "output", "max abs", "max rel", "cosine", "top-1", "KL mean", "thresholds", "status")
    return _table(headers, rows, "verdict")


def _layer_table(rows: list[dict[str, Any]]) -> str:
    return _table(("phase", "layer", "kind", "max abs", "cosine", "status"),
                  (([_td(r["phase"]), _td(str(r["layer"]), True), _td(r["kind"]),
                     _td(_fmt(r["max_abs"]), True), _td(_fmt(r["cosine"], ".12f"), True),
                     _td("PASS" if r["passed"] else "FAIL")],
                    "pass" if r["passed"] else "fail") for r in rows), "layers")


def _quality_section(report: dict[str, Any]) -> str:
    parts = []
    ppl = report.get("perplexity")
    if isinstance(ppl, dict):
        modes = {1.0: "decode (token by token through the cache)", 0.0: "prefill windows"}
        mode = modes.get(_num(ppl.get("decode")), "n/a")
        parts.append(_table(("reference", "onnx", "increase", "tokens", "window", "mode"), [(
            [_td(_fmt(ppl.get("reference"), ".4f"), True), _td(_fmt(ppl.get("onnx"), ".4f"), True),
             _td(_pct(ppl.get("rel_increase"), "+.4f"), True), _td(_fmt(ppl.get("tokens"), ".0f"), True),
             _td(_fmt(ppl.get("window"), ".0f"), True), _td(mode)], "pass")], "perplexity"))
    greedy = [r for r in report.get("records", []) if str(r.get("phase", "")).startswith("greedy")]
    if greedy:
        parts.append(_table(("phase", "greedy agreement", "KL mean", "KL max", "cosine"), [(
            [_td(str(r.get("phase"))), _td(_pct(r.get("top1_agreement"), ".2f"), True),
             _td(_fmt(r.get("kl_mean")), True), _td(_fmt(r.get("kl_max")), True),
             _td(_fmt(r.get("cosine"), ".9f"), True)],
            "pass" if _passed(r) else "fail") for r in greedy], "greedy"))
    if not parts:
        return ""
    return "<h3>Held-out perplexity and greedy agreement</h3>" + "".join(parts)


def _report_section(report: dict[str, Any], plotter: _Plotter, data: dict[str, Any], heading: str) -> str:
    passed = report.get("passed")
    verdict = ('<span class="verdict-pass">PASS</span>' if passed else
               '<span class="verdict-fail">FAIL</span>' if passed is not None else "n/a")
    where = ", ".join(f"{key} {html.escape(str(report.get(key, 'n/a')))}"
                      for key in ("original", "optimized", "profile"))
    if report.get("profile_note"):
        where += html.escape(f" ({report['profile_note']})")
    notes = "".join(f'<p class="note"><b>note:</b> {html.escape(n)}</p>' for n in report.get("notes") or [])
    out = [f"<h2>{html.escape(heading)}: {verdict}</h2>", f'<p class="note">{where}</p>', notes, "<h3>Verdicts</h3>",
           _verdict_table(report), _quality_section(report)]

    out.append("<h3>Error histograms per output</h3>")
    if plotter.available:
        figures, names = _histogram_plots(report, plotter)
        data["histogram_outputs"] = names
        out.append('<div class="plots">' + "".join(figures) + "</div>" if figures
                   else '<p class="note">no record has a histogram</p>')
    else:
        out.append('<p class="note">plots omitted: matplotlib is not installed</p>')

    rows = layer_divergence(report)
    data["layers"] = rows
    out.append("<h3>Per-layer divergence (present.{i}.key/value)</h3>")
    if not rows:
        out.append('<p class="note">no per-layer cache records (the model\'s cache is not float32, e.g. a '
                   "quantized KV cache, or the report predates them)</p>")
    else:
        if plotter.available:
            plot = _layer_plot(rows, report.get("thresholds") or {}, plotter)
            out.append(f'<div class="plots">{plot}</div>')
        out.append(f"<details><summary>per-layer numbers ({len(rows)} rows)</summary>"
                   f"{_layer_table(rows)}</details>")
    return "\n".join(out)


def _compare_section(pairs: list[tuple[str, dict[str, Any]]], plotter: _Plotter, data: dict[str, Any]) -> str:
    rows = compare_rows(pairs)
    data["compare"] = rows
    out = ["<h2>Compression settings compared</h2>"]
    if plotter.available:
        out.append('<div class="plots">' + _compare_plot(rows, plotter) + "</div>")
    else:
        out.append('<p class="note">plots omitted: matplotlib is not installed</p>')
    out.append(_table(
        ("setting", "profile", "verdict", "perplexity ref", "perplexity onnx", "increase", "greedy agreement",
         "decode top-1 (min)", "logits cosine (min)", "failed records"),
        (([_td(r["label"]), _td(str(r["profile"] or "n/a")),
           _td("n/a" if r["passed"] is None else "PASS" if r["passed"] else "FAIL"),
           _td(_fmt(r["ppl_reference"], ".4f"), True), _td(_fmt(r["ppl_onnx"], ".4f"), True),
           _td(_pct(r["ppl_rel_increase"], "+.4f"), True), _td(_pct(r["greedy_agreement"], ".2f"), True),
           _td(_pct(r["decode_top1"], ".2f"), True), _td(_fmt(r["logits_cosine_min"], ".9f"), True),
           _td(str(r["failed_records"]), True)], "fail" if r["passed"] is False else "pass") for r in rows),
        "compare"))
    out.append('<p class="note">n/a: the report has no such measurement (perplexity needs held-out text; '
               "greedy agreement runs by default for quantized caches, else with "
               "<code>--greedy N</code>).</p>")
    return "\n".join(out)


# ---------------------------------------------------------------- entry point


def _json_safe(v: Any) -> Any:
    """Non-finite floats as the strings 'inf' / 'nan' (as ``ParityReport.to_dict`` writes them)."""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    return v



def render_html(reports: Any, title: str = "toolkit parity report") -> str:
    """Render one or several parity reports as one self-contained HTML page.

    Args:
        reports: a report (``ParityReport`` or its ``to_dict()``), or a sequence of
            reports or of ``(label, report)`` pairs. With several, the page opens
            with the comparison across settings (perplexity increase and greedy
            agreement against the label), then each report's sections.
        title: the page title.

    Returns:
        The HTML text. Plots are inline PNGs; the numbers behind them are in
        ``<script type="application/json" id="report-data">``.
    """
    if isinstance(reports, (list, tuple)):
        pairs: list[tuple[str, dict[str, Any]]] = []
        for item in reports:
            if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
                pairs.append((item[0], _as_dict(item[1])))
            else:
                rep = _as_dict(item)
                pairs.append((setting_label(rep), rep))
    else:
        rep = _as_dict(reports)
        pairs = [(setting_label(rep), rep)]
    plotter = _Plotter()
    data: dict[str, Any] = {"title": title, "plots": plotter.available, "reports": []}
    body = [f"<h1>{html.escape(title)}</h1>"]
    if len(pairs) > 1:
        body.append(_compare_section(pairs, plotter, data))
    for label, rep in pairs:
        section_data: dict[str, Any] = {"label": label, "passed": rep.get("passed")}
        section = _report_section(rep, plotter, section_data, label if len(pairs) > 1 else "Verdict")
        data["reports"].append(section_data)
        body.append(f'<section class="report" data-label="{html.escape(label)}">{section}</section>'
                    if len(pairs) == 1 else
                    f'<section class="report" data-label="{html.escape(label)}"><details>'
                    f"<summary>{html.escape(label)}: details</summary>{section}</details></section>")
    # "</" inside a script element would end it early: escape it in the embedded JSON.
    blob = json.dumps(_json_safe(data), allow_nan=False, default=str).replace("</", "<\\/")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>\n"
            + "\n".join(body)
            + f'\n<script type="application/json" id="report-data">{blob}</script>\n</body></html>\n')
