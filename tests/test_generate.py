"""Generation: the sampling head gives the same tokens as logits argmax and as PyTorch; the
IOBinding loop matches a NumPy-cache loop; host-side sampling draws what the fused sampler would."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from passes import run_pipeline
from toolkit.generate import GREEDY, greedy
from toolkit.parity import make_session


def _torch_greedy(src, prompt, n):
    ids = torch.tensor([prompt])
    out = []
    with torch.no_grad():
        for _ in range(n):
            mask = torch.ones_like(ids)
            pos = torch.arange(ids.shape[1])[None]
            logits, _ = src.forward(ids, mask, pos, src.empty_past(1))
            nxt = int(logits[0, -1].argmax())
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out


def test_sampling_head_greedy_equals_logits_argmax_and_pytorch(exported, tmp_path):
    src, path = exported("llama")
    head_model, report = run_pipeline(onnx.load(str(path)), ["sampling-head"],
                                      {"sampling-head": {"k": 4, "keep_logits": "false"}})
    assert report.counts["sampling-head"] == 1
    head_path = tmp_path / "head.onnx"
    onnx.save(head_model, str(head_path))
    prompt = list(np.random.default_rng(0).integers(0, src.vocab_size, 6))
    plain = greedy(make_session(path), prompt, 12)
    head = greedy(make_session(head_path), prompt, 12)
    assert head.token_ids == plain.token_ids
    # the reference recomputes the whole prefix each step (no cache): an independent path
    assert plain.token_ids == _torch_greedy(src, prompt, 12)
    assert len(head.step_ms) == 11 and all(t > 0 for t in head.step_ms)


def test_sampled_head_parity_and_reproducible_generation(exported, tmp_path):
    from toolkit import parity

    src, path = exported("llama")
    opts = {"k": 16, "sample": "true", "temperature": "0.8", "top_p": "0.9"}
    model, _ = run_pipeline(onnx.load(str(path)), ["sampling-head"], {"sampling-head": opts})
    head_path = tmp_path / "sampled.onnx"
    onnx.save(model, str(head_path))
    report = parity.check(src, head_path, parity.ParitySettings(batch_sizes=(1, 3), prompt_len=6, decode_steps=3))
    heads = [r for r in report.records if r.name == "next_token_prob"]
    assert len(heads) == 4 and all(r.top1_agreement == 1.0 for r in heads), report.to_json()
    assert report.passed, report.to_json()
    sess = make_session(head_path)
    prompt = [5, 17, 42, 7]
    a, b, c = (greedy(sess, prompt, 10, seed=s).token_ids for s in (3, 3, 4))
    assert a == b and a != c


def _replay_logits(session, prompt, tokens):
    """Last-position logits before each generated token, through parity's own decoder
    (NumPy round trip of the cache each step: a path independent of IOBinding)."""
    from toolkit.parity import OnnxDecoder

    dec = OnnxDecoder(session)
    ids = np.array([prompt], np.int64)
    mask = np.ones_like(ids)
    pos = np.arange(len(prompt))[None]
    past = dec.empty_past(1)
    out = []
    for tok in tokens:
        logits, past, _ = dec.step(ids, mask, pos, past)
        out.append(logits[:, -1])
        ids = np.array([[tok]], np.int64)
        mask = np.concatenate([mask, np.ones((1, 1), np.int64)], 1)
        pos = pos[:, -1:] + 1
    return out, past


def test_iobinding_loop_matches_a_numpy_cache_loop_and_reports_the_cache(exported):
    """Plain, KIVI-cache (growing and fixed-capacity, in place) and low-rank latent-cache (float32 and int8)
    models: the bound loop picks the replayed argmax every step, and its reported KV bytes are the final cache's."""
    from toolkit.generate import generate

    _, path = exported("llama")
    kv, _ = run_pipeline(onnx.load(str(path)), ["kv-cache"],
                         {"kv-cache": {"scheme": "kivi2", "group": "8", "residual": "8"}})
    # A fixed-capacity cache: the loop binds present to past and the op appends in place.
    kv_cap, _ = run_pipeline(onnx.load(str(path)), ["kv-cache"],
                             {"kv-cache": {"scheme": "kivi2", "group": "8", "residual": "8", "capacity": "32"}})
    latent, _ = run_pipeline(onnx.load(str(path)), ["low-rank-kv"], {"low-rank-kv": {"rank_ratio": "0.5"}})
    assert any(i.name.endswith("key_latent") for i in latent.graph.input)
    latent8, _ = run_pipeline(onnx.load(str(path)), ["low-rank-kv"],
                              {"low-rank-kv": {"rank_ratio": "0.5", "latent_bits": "8"}})
    assert any(i.name.endswith("key_latent_q") for i in latent8.graph.input)
    prompt = [5, 17, 42, 7, 9]
    for model in (onnx.load(str(path)), kv, kv_cap, latent, latent8):
        sess = _session(model)
        streamed = []
        result = generate(sess, prompt, 20, on_token=streamed.append)
        assert streamed == result.token_ids and len(result.token_ids) == 20
        logits, past = _replay_logits(sess, prompt, result.token_ids)
        assert [int(row.argmax()) for row in np.concatenate(logits)] == result.token_ids
        # both caches hold the prompt and every generated token but the last (never fed)
        assert result.kv_cache_bytes == sum(a.nbytes for a in past.values()) > 0
        assert result.peak_rss_mb > 0


def test_fixed_capacity_cache_too_small_is_a_named_error(exported):
    from toolkit.errors import ToolkitError
    from toolkit.generate import generate

    _, path = exported("llama")
    model, _ = run_pipeline(onnx.load(str(path)), ["kv-cache"],
                            {"kv-cache": {"scheme": "int8", "capacity": "16"}})
    sess = _session(model)
    assert len(generate(sess, [5, 17, 42], 14).token_ids) == 14  # 3 + 14 - 1 = 16 tokens: fits
    with pytest.raises(ToolkitError, match="holds 16 tokens.*need 17") as err:
        generate(sess, [5, 17, 42], 15)
    assert "--kv-capacity" in err.value.hint
    # KIVI fills the quantized slots a window (R = 16) at a time: 48 slots, plus 15 residual.
    kivi, _ = run_pipeline(onnx.load(str(path)), ["kv-cache"],
                           {"kv-cache": {"scheme": "kivi2", "group": "8", "residual": "16", "capacity": "48"}})
    sess = _session(kivi)
    assert len(generate(sess, [5, 17, 42], 61).token_ids) == 61  # 63 tokens fit
    with pytest.raises(ToolkitError, match="holds 63 tokens"):
        generate(sess, [5, 17, 42], 62)
    # A capacity that is not a multiple of the window would leave slots no flush can fill.
    from toolkit.errors import PassError

    with pytest.raises(PassError, match="capacity=40 is not a multiple of the residual window 16.*only 32"):
        run_pipeline(onnx.load(str(path)), ["kv-cache"],
                     {"kv-cache": {"scheme": "kivi2", "group": "8", "residual": "16", "capacity": "40"}})


def _session(model):
    import onnxruntime as ort

    from toolkit import ops

    return ort.InferenceSession(model.SerializeToString(), ops.session_options(1), providers=["CPUExecutionProvider"])


def test_host_sampling_draws_what_the_fused_sampler_would(exported):
    """--do-sample on a top-k head (candidates re-weighted to T) and on plain logits: every
    token is the one SampleTopKTopP's reference draws from the full logits with that call's seed."""
    from toolkit.generate import Sampling, generate
    from toolkit.ops.reference import call_seed, sample_topk_top_p

    _, path = exported("llama")
    head, _ = run_pipeline(onnx.load(str(path)), ["sampling-head"], {"sampling-head": {"k": 40, "temperature": 1.3}})
    sampling = Sampling(True, temperature=0.7, top_k=24, top_p=0.9, min_p=0.02)
    prompt = [5, 17, 42, 7]
    for model in (head, onnx.load(str(path))):
        sess = _session(model)
        result = generate(sess, prompt, 16, sampling, seed=100)
        logits, _ = _replay_logits(sess, prompt, result.token_ids)
        expected = [int(sample_topk_top_p(row, 24, 0.7, 0.9, 0.02, seed=call_seed(100, i))[0][0])
                    for i, row in enumerate(logits)]
        assert result.token_ids == expected
        assert len(set(result.token_ids)) > 3  # it did sample (greedy on a random model repeats)
        assert generate(sess, prompt, 16, sampling, seed=101).token_ids != result.token_ids


def test_sampling_options_are_checked_against_the_head(exported):
    from toolkit.errors import ToolkitError
    from toolkit.generate import Sampling, generate

    _, path = exported("llama")
    topk, _ = run_pipeline(onnx.load(str(path)), ["sampling-head"], {"sampling-head": {"k": 8}})
    drawn, _ = run_pipeline(onnx.load(str(path)), ["sampling-head"], {"sampling-head": {"k": 8, "sample": "true"}})
    with pytest.raises(ToolkitError, match="--top-k 9 is more than the 8 candidates"):
        generate(_session(topk), [1, 2], 2, Sampling(True, top_k=9))
    with pytest.raises(ToolkitError, match="draws in the graph"):
        generate(_session(drawn), [1, 2], 2, Sampling(True, temperature=0.5))
    with pytest.raises(ToolkitError, match="--top-p must be in"):
        generate(_session(topk), [1, 2], 2, Sampling(True, top_p=0.0))


def test_generation_stops_at_the_recorded_eos_and_within_the_context(exported, tmp_path):
    """`toolkit generate` ran past the end-of-sequence id the source's config names, and
    past the positions a learned table has (an ORT Gather traceback after 8 tokens).
    Export records both; generate stops at the first and refuses the second up front."""
    import json
    import subprocess
    import sys

    from toolkit.errors import ToolkitError
    from toolkit.generate import generate
    from toolkit.parity import metadata

    _, path = exported("hf:llama")
    assert json.loads(metadata(onnx.load(str(path)))["toolkit.eos_token_ids"]) == [2]  # its config's eos
    _, path = exported("gpt2")
    meta = metadata(onnx.load(str(path)))
    assert meta["toolkit.context_length"] == "128" and "toolkit.eos_token_ids" not in meta  # the preset names none
    sess = make_session(path, threads=1)
    full = generate(sess, [5, 6, 7], 8).token_ids
    stop = full[3]
    cut = generate(sess, [5, 6, 7], 8, eos_id=[stop]).token_ids
    assert cut == full[:full.index(stop) + 1]
    with pytest.raises(ToolkitError, match="need 139 positions; the model was built for 128") as err:
        generate(sess, list(range(3, 123)), 20, context_length=128)
    assert "--max-new-tokens 9" in err.value.hint
    assert len(generate(sess, list(range(3, 123)), 9, context_length=128).token_ids) == 9
    with pytest.raises(ToolkitError) as err:
        generate(sess, [5] * 130, 1, context_length=128)
    assert "shorten the prompt to at most 128 tokens" in err.value.hint
    # the Python API reads the model's own context length by default (it ran a 129-token
    # prompt on a 128-position model without a word: an audit)
    from toolkit.generate import generate_batch

    with pytest.raises(ToolkitError, match="need 129 positions; the model was built for 128"):
        generate_batch(sess, [[5, 6], [5] * 128], 2)
    assert len(generate_batch(sess, [[5, 6], [5] * 127], 2).token_ids[1]) == 2

    model = onnx.load(str(path))  # the CLI reads the recorded ids; --eos-id -1 ignores them
    model.metadata_props.append(onnx.StringStringEntryProto(key="toolkit.eos_token_ids", value=json.dumps([stop])))
    onnx.save(model, str(tmp_path / "m.onnx"))
    for extra, expected in (((), full[:full.index(stop) + 1]), (("--eos-id", "-1"), full)):
        r = subprocess.run([sys.executable, "-m", "toolkit", "generate", str(tmp_path / "m.onnx"), "--prompt-ids",
                            "5,6,7", "--max-new-tokens", "8", "--json", *extra], capture_output=True, text=True,
                           check=False, timeout=300)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["token_ids"] == expected


def test_sliding_window_rows_of_a_padded_batch_decode_as_alone_past_the_window(tmp_path):
    """Mistral with a 4-token window, prompts of 6 and 3 tokens in one left-padded batch,
    12 new tokens: every row gets PyTorch's recomputed greedy (no cache), and with the int8
    cache, which takes the window from the attention mask, what it gets alone. The export
    refilled capped sliding-window cache layers each call, so their mask offset read the
    padding columns: rows diverged past the window and parity, run on the same wrapper,
    passed (found by an audit)."""
    from toolkit import export, sources
    from toolkit.generate import generate_batch

    src = sources.resolve("hf:mistral", overrides={"sliding_window": 4})
    export.export(src, tmp_path / "m.onnx")
    prompts = [[5, 17, 99, 3, 250, 8], [7, 7, 7]]
    expected = [_torch_greedy(src, p, 12) for p in prompts]
    assert generate_batch(make_session(tmp_path / "m.onnx", threads=1), prompts, 12).token_ids == expected
    int8, _ = run_pipeline(onnx.load(str(tmp_path / "m.onnx")), ["kv-cache"], {"kv-cache": {"scheme": "int8"}})
    sess = _session(int8)
    assert generate_batch(sess, prompts, 12).token_ids == [generate_batch(sess, [p], 12).token_ids[0]
                                                          for p in prompts]


def test_a_batch_of_prompts_decodes_each_as_it_would_alone(exported, tmp_path):
    """Prompts of different lengths in one left-padded batch: every row gets the tokens
    it gets alone (and PyTorch's recomputed greedy), on plain models (RoPE and learned
    positions) and on a
    fixed-capacity quantized cache appended in place; a row stops at eos on its own;
    the CLI takes --prompt-ids more than once."""
    import json
    import subprocess
    import sys

    from toolkit.errors import ToolkitError
    from toolkit.generate import generate, generate_batch

    src, path = exported("llama")
    prompts = [[5, 17, 42, 7, 9], [3], [8, 8, 1]]
    kv_cap, _ = run_pipeline(onnx.load(str(path)), ["kv-cache"], {"kv-cache": {"scheme": "int8", "capacity": "32"}})
    for sess in (make_session(path, threads=1), _session(kv_cap)):
        alone = [generate(sess, p, 10).token_ids for p in prompts]
        seen: list[tuple[int, int]] = []
        batch = generate_batch(sess, prompts, 10, on_token=lambda row, tok, seen=seen: seen.append((row, tok)))
        assert batch.token_ids == alone
        assert [t for r, t in seen if r == 1] == alone[1] and len(seen) == 30
        assert len(batch.step_ms) == 9
        # tokens/s: every row's decoded tokens (3 rows x 9 steps) over the steps' total time,
        # the same definition as one prompt's (9 tokens over its own steps' time)
        assert batch.tokens_per_second == pytest.approx(1000.0 * 27 / sum(batch.step_ms), rel=1e-12)
        one = generate(sess, prompts[0], 10)
        assert one.tokens_per_second == pytest.approx(1000.0 * 9 / sum(one.step_ms), rel=1e-12)
    assert alone[0] == _torch_greedy(src, prompts[0], 10)  # the quantized cache's row 0, against PyTorch
    gpt2_src, gpt2_path = exported("gpt2")  # learned positions: each row's count from its first token matters
    sess = make_session(gpt2_path, threads=1)
    assert generate_batch(sess, prompts, 6).token_ids == [_torch_greedy(gpt2_src, p, 6) for p in prompts]
    # row 1 stops at its third token; the others run on
    stop = alone[1][2]
    cut = generate_batch(make_session(path, threads=1), prompts, 10, eos_id=stop).token_ids
    for row, tokens in zip(cut, alone):
        assert row == (tokens[:tokens.index(stop) + 1] if stop in tokens else tokens)
    with pytest.raises(ToolkitError, match="prompt 2 of 2 is empty"):
        generate_batch(make_session(path, threads=1), [[5], []], 3)
    with pytest.raises(ToolkitError, match="holds 32 tokens; a 30-token prompt and 4 new tokens need 33"):
        generate_batch(_session(kv_cap), [[5], [6] * 30], 4)  # the padded length counts

    r = subprocess.run([sys.executable, "-m", "toolkit", "generate", str(path), "--prompt-ids", "5,17,42,7,9",
                        "--prompt-ids", "3", "--max-new-tokens", "10", "--json"], capture_output=True, text=True,
                       check=False, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert [row["token_ids"] for row in out["rows"]] == alone[:2] and out["batch"] == 2
    r = subprocess.run([sys.executable, "-m", "toolkit", "generate", str(path), "--prompt-ids", "3",
                        "--max-new-tokens", "10", "--json"], capture_output=True, text=True, check=False, timeout=300)
    one = json.loads(r.stdout)  # one prompt: the flat fields and the same "rows" schema
    assert one["token_ids"] == one["rows"][0]["token_ids"] == alone[1] and one["batch"] == 1


def test_a_zero_length_prompt_through_a_sampling_head_is_a_named_error(tmp_path):
    """toolkit.load(DIR).run with an empty input_ids on a bundle with a sampling head:
    ORT failed in the head's Gather of the last position ("indices element out of data
    bounds"); the session refuses it first, naming input_ids. A one-token prompt still
    runs, and the head's choice is the logits' argmax."""
    import onnxruntime as ort

    import toolkit
    from toolkit.cli import main
    from toolkit.errors import ToolkitError
    from toolkit.generate import BoundDecoder, TokenChooser, head_options

    bundle = tmp_path / "b"
    assert main(["convert", "llama", "-o", str(bundle), "--sampling-head", "8", "--no-parity"]) == 0
    session = toolkit.load(bundle, threads=1)
    assert isinstance(session, ort.InferenceSession)
    outputs = [o.name for o in session.get_outputs()]
    assert "next_token_ids" in outputs and "logits" in outputs

    def feeds(seq: int) -> dict[str, np.ndarray]:
        out = {"input_ids": np.full((1, seq), 7, np.int64), "attention_mask": np.ones((1, seq), np.int64),
               "position_ids": np.arange(seq, dtype=np.int64)[None]}
        for i in session.get_inputs():
            if i.name.startswith("past_key_values."):
                dims = [d if isinstance(d, int) else 0 for d in i.shape]
                dims[0] = 1
                out[i.name] = np.zeros(dims, np.float32)
        return out

    with pytest.raises(ToolkitError) as err:
        session.run(["next_token_ids"], feeds(0))
    assert "input_ids" in str(err.value) and "[1, 0]" in str(err.value)
    assert err.value.hint and "at least one token" in err.value.hint
    ids, logits = session.run(["next_token_ids", "logits"], feeds(1))
    assert ids.shape == (1, 8) and ids[0, 0] == logits[0, -1].argmax()

    # the IOBinding driver of toolkit.generate checks it too (generate_batch refuses an
    # empty prompt earlier; a host driving BoundDecoder itself reached ORT)
    dec = BoundDecoder(session, TokenChooser(head_options(session), GREEDY).wanted_outputs)
    empty = np.zeros((1, 0), np.int64)
    with pytest.raises(ToolkitError, match="input_ids"):
        dec.step(empty, empty, empty, dec.empty_past(1), seed=0)
