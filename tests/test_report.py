"""The HTML parity report (toolkit/report.py) on real parity runs of the tiny Llama.

Each check parses the page with ``html.parser`` and compares what it shows against
the report it was rendered from: one histogram per output, one per-layer point per
layer and phase, failing records marked, nothing fetched from the network, and the
``--compare`` page of two saved reports (fp32 export vs a low-rank compressed one).
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from toolkit import parity
from toolkit.report import load_report, render_html, setting_label

SETTINGS = parity.ParitySettings(batch_sizes=(1, 3), prompt_len=8, decode_steps=3, perplexity_tokens=0,
                                 greedy_prompts=2, greedy_tokens=4)


class Page(HTMLParser):
    """What the tests look at: images, tables (by class), the embedded data, every URL attribute."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.images: list[dict[str, str]] = []
        self.tables: dict[str, list[dict]] = {}
        self.urls: list[tuple[str, str, str]] = []
        self.tags: list[str] = []
        self.data_json = ""
        self._table: str | None = None
        self._row: dict | None = None
        self._cell: list[str] | None = None
        self._in_data = False
        self.feed(text)
        self.close()
        self.data = json.loads(self.data_json)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        for key in ("src", "href", "data", "action", "srcset"):
            if key in a:
                self.urls.append((tag, key, a[key] or ""))
        if tag == "img":
            self.images.append(a)
        elif tag == "table":
            self._table = a.get("class", "")
            self.tables.setdefault(self._table, [])
        elif tag == "tr" and self._table is not None:
            self._row = {"class": a.get("class", ""), "cells": [], "status": None}
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []
            if "data-status" in a:
                self._row["status"] = a["data-status"]
        elif tag == "script" and a.get("id") == "report-data":
            self._in_data = True

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row["cells"].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.tables[self._table].append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None
        elif tag == "script":
            self._in_data = False

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)
        if self._in_data:
            self.data_json += data

    def body_rows(self, cls: str) -> list[dict]:
        return [r for r in self.tables.get(cls, []) if r["class"] in ("pass", "fail")]


def toolkit(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, "-m", "toolkit", *args], check=False, capture_output=True,
                          text=True, cwd=cwd, timeout=600, env=env)


@pytest.fixture(scope="module")
def reports(exported, tmp_path_factory):
    """Real parity reports of the tiny Llama: its export (passes) and a low-rank copy (fails fp32)."""
    from passes import run_pipeline
    from toolkit.export import save_model

    src, path = exported("llama")
    faithful = parity.check(src, path, SETTINGS)
    import onnx

    low_rank, _ = run_pipeline(onnx.load(str(path)), ["low-rank"], {"low-rank": {"param_budget": "0.5"}})
    lr_path = tmp_path_factory.mktemp("report") / "low_rank.onnx"
    save_model(low_rank, lr_path)
    compressed = parity.check(src, lr_path, SETTINGS)
    return src, faithful, compressed


def test_one_histogram_per_output_name(reports):
    _, faithful, _ = reports
    page = Page(render_html(faithful, "faithful"))
    hist = [img for img in page.images if img.get("class") == "histogram"]
    names = list(dict.fromkeys(r.name for r in faithful.records))
    assert sorted(img["data-output"] for img in hist) == sorted(names)  # one each, none twice
    assert "logits" in names and any(n.startswith("present.") for n in names)
    assert page.data["reports"][0]["histogram_outputs"] == names


def test_per_layer_plot_has_one_point_per_layer(reports):
    src, faithful, _ = reports
    page = Page(render_html(faithful, "faithful"))
    assert len([img for img in page.images if img.get("class") == "layer-divergence"]) == 1
    layers = page.data["reports"][0]["layers"]
    phases = list(dict.fromkeys(r.phase for r in faithful.records if r.name.startswith("present.")))
    assert len(phases) == 4  # prefill and decode at batch 1 and 3
    by_record = {(r.phase, r.name): r for r in faithful.records}
    for phase in phases:
        for kind in ("key", "value"):
            pts = [row for row in layers if row["phase"] == phase and row["kind"] == kind]
            assert [row["layer"] for row in pts] == list(range(src.num_layers))
            for row in pts:
                rec = by_record[(phase, f"present.{row['layer']}.{kind}")]
                assert row["max_abs"] == rec.max_abs and row["cosine"] == rec.cosine
    # the visible table carries the same rows
    assert len(page.body_rows("layers")) == len(layers) == 2 * src.num_layers * len(phases)


def test_failing_records_are_marked_failed(reports):
    _, faithful, compressed = reports
    failing = {(r.phase, r.name) for r in compressed.records if not r.passed}
    assert failing, "a low-rank model must fail the fp32 thresholds"
    assert not compressed.passed
    page = Page(render_html(compressed, "low-rank"))
    rows = page.body_rows("verdict")
    assert len(rows) == len(compressed.records)
    marked = {(r["cells"][0], r["cells"][1]) for r in rows if r["status"] == "fail"}
    assert marked == failing
    for r in rows:
        assert (r["class"] == "fail") == (r["status"] == "fail")
        if r["status"] == "fail":
            status = r["cells"][-1]
            assert status.startswith("FAIL: ") and ("max abs" in status or "cosine" in status)
    # thresholds are shown with each record
    logits_row = next(r for r in rows if r["cells"][1] == "logits")
    assert "max abs <= 0.001" in logits_row["cells"][7] and "top-1 >= 0.999" in logits_row["cells"][7]
    assert page.data["reports"][0]["passed"] is False
    ok = Page(render_html(faithful.to_dict(), "faithful"))
    assert all(r["status"] == "pass" for r in ok.body_rows("verdict"))


def test_page_is_self_contained(reports):
    _, faithful, compressed = reports
    text = render_html([faithful, compressed], "both")
    page = Page(text)
    assert "link" not in page.tags and "iframe" not in page.tags
    assert page.images
    for tag, key, url in page.urls:
        assert url.startswith("data:image/png;base64,"), (tag, key, url[:80])
        assert base64.b64decode(url.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert "http://" not in text and "https://" not in text


def test_greedy_and_perplexity_sections_and_older_json(reports):
    _, faithful, _ = reports
    data = faithful.to_dict()
    page = Page(render_html(data, "faithful"))
    greedy = [r for r in faithful.records if r.phase.startswith("greedy")]
    assert len(greedy) == 1 and page.body_rows("greedy")[0]["cells"][0] == greedy[0].phase
    assert "perplexity" not in page.tables  # this source ships no held-out text
    # perplexity as the trained reference model reports it
    ppl = {"reference": 100.0, "onnx": 101.0, "rel_increase": 0.01, "tokens": 2048.0, "window": 256.0,
           "decode": 1.0}
    with_ppl = dict(data, perplexity=ppl, perplexity_failures=["perplexity 100 -> 101"], passed=False)
    page = Page(render_html(with_ppl, "ppl"))
    assert page.body_rows("perplexity")[0]["cells"][2] == "+1.0000%"
    assert page.body_rows("verdict")[-1]["status"] == "fail"
    # a report written before model_metadata / histogram_edges existed still renders
    old = {k: v for k, v in data.items() if k not in ("model_metadata", "histogram_edges", "perplexity")}
    page = Page(render_html(old, "old"))
    histograms = [i for i in page.images if i.get("class") == "histogram"]
    assert len(histograms) == len({r.name for r in faithful.records})


def test_setting_label_from_metadata(reports, tmp_path):
    _, faithful, compressed = reports
    assert setting_label(faithful.to_dict()) == "fp32"
    assert setting_label(compressed.to_dict()) == "low-rank budget=0.5"
    assert setting_label({"records": []}, tmp_path / "kv8" / "parity.json") == "kv8"
    meta = {"toolkit.kv_cache": "kivi4", "toolkit.kv_quant": json.dumps({"key_group": 32, "residual": 128})}
    assert setting_label({"records": [], "model_metadata": meta}) == "kv kivi4 G32 R128"
    # settings that differ only in whitening, int8 factors or the latent rank get different labels
    for opts, label in (({"energy": 0.9}, "low-rank energy=0.9"),
                        ({"energy": 0.9, "whiten": True}, "low-rank energy=0.9 whitened"),
                        ({"param_budget": 0.6, "activation_aware": True, "int8_weights": True},
                         "low-rank budget=0.6 ASVD int8")):
        meta = {"toolkit.low_rank": json.dumps({"options": opts})}
        assert setting_label({"records": [], "model_metadata": meta}) == label
    meta = {"toolkit.kv_cache": "int8-latent", "toolkit.low_rank_kv": json.dumps({"rank_ratio": 0.5})}
    assert setting_label({"records": [], "model_metadata": meta}) == "kv int8-latent ratio=0.5"


def test_compare_cli_plots_both_settings(reports, tmp_path):
    _, faithful, compressed = reports
    for name, rep in (("ref", faithful), ("lr", compressed)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "parity.json").write_text(rep.to_json())
    out = tmp_path / "cmp.html"
    r = toolkit("parity", "--html", str(out), "--compare", str(tmp_path / "ref" / "parity.json"),
                str(tmp_path / "lr" / "parity.json"))
    assert r.returncode == 0, r.stderr
    page = Page(out.read_text())
    curve = [img for img in page.images if img.get("class") == "compare-curve"]
    assert len(curve) == 1 and json.loads(curve[0]["data-labels"]) == ["fp32", "low-rank budget=0.5"]
    rows = page.data["compare"]
    assert [row["label"] for row in rows] == ["fp32", "low-rank budget=0.5"]
    greedy = [next(x.top1_agreement for x in rep.records if x.phase.startswith("greedy"))
              for rep in (faithful, compressed)]
    assert [row["greedy_agreement"] for row in rows] == greedy
    assert [row["passed"] for row in rows] == [True, False]
    assert [row["cells"][0] for row in page.body_rows("compare")] == ["fp32", "low-rank budget=0.5"]
    # the same setting twice: the labels say which file each is
    r = toolkit("parity", "--html", str(out), "--compare", str(tmp_path / "ref"),
                str(tmp_path / "ref" / "parity.json"))
    assert r.returncode == 0, r.stderr
    labels = [row["label"] for row in Page(out.read_text()).data["compare"]]
    assert labels[0] == "fp32" and labels[1] != "fp32" and labels[1].startswith("fp32")


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    ('{"records": [', "is not valid JSON"),
    ('{"first_failing_pass": null, "steps": []}', "not a parity report"),
])
def test_compare_rejects_missing_or_invalid_json(reports, tmp_path, content, message):
    _, faithful, _ = reports
    good = tmp_path / "good.json"
    good.write_text(faithful.to_json())
    bad = tmp_path / "bad.json"
    if content is not None:
        bad.write_text(content)
    out = tmp_path / "out.html"
    r = toolkit("parity", "--html", str(out), "--compare", str(good), str(bad))
    assert r.returncode == 2, r.stdout + r.stderr
    assert message in r.stderr and "bad.json" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()
    with pytest.raises(Exception, match=message):
        load_report(bad)


def test_parity_html_option_and_compare_needs_html(exported, tmp_path):
    _, path = exported("llama")
    out = tmp_path / "p.html"
    r = toolkit("parity", "llama", str(path), "--decode-steps", "1", "--batch-sizes", "1",
                "--json", str(tmp_path / "p.json"), "--html", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    saved = json.loads((tmp_path / "p.json").read_text())
    page = Page(out.read_text())
    assert len(page.body_rows("verdict")) == len(saved["records"])
    assert sorted(i["data-output"] for i in page.images if i.get("class") == "histogram") == sorted(
        {rec["name"] for rec in saved["records"]})
    r = toolkit("parity", "--compare", str(tmp_path / "p.json"))
    assert r.returncode == 2 and "--html" in r.stderr


def test_convert_writes_parity_html_into_the_bundle(tmp_path):
    out = tmp_path / "bundle"
    r = toolkit("convert", "llama", "-o", str(out), "--decode-steps", "1", "--batch-sizes", "1")
    assert r.returncode == 0, r.stderr
    saved = json.loads((out / "parity.json").read_text())
    page = Page((out / "parity.html").read_text())
    assert page.data["reports"][0]["passed"] is saved["passed"] is True
    assert len(page.body_rows("verdict")) == len(saved["records"])
