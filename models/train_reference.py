"""Train the ``llama-stdlib`` reference checkpoint shipped with :mod:`models`.

Builds a fully offline corpus from the Python standard library's ``.py``
sources, trains a byte-level BPE tokenizer (Radford et al., 2019; Sennrich et
al., 2016, "Neural Machine Translation of Rare Words with Subword Units") with
the ``tokenizers`` package, and trains the from-scratch Llama model of
:mod:`models.llama` with AdamW (Loshchilov & Hutter, 2019) and a cosine
learning-rate schedule for a fixed wall-clock budget.

Usage::

    python -m models.train_reference --out models/checkpoints/llama-stdlib --minutes 25

Outputs in ``--out``: ``config.json``, ``model.safetensors`` (float16),
``tokenizer.json``, ``heldout.txt`` and ``train_log.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import models
from models.llama import LlamaConfig

SKIP_PARTS = {"test", "tests", "site-packages", "idlelib", "__pycache__"}
PAD, EOS = "<pad>", "<eos>"


def stdlib_files(root: Path) -> list[Path]:
    """List the standard library's ``.py`` files in sorted order.

    Args:
        root: the stdlib directory.

    Returns:
        Sorted paths, skipping test suites, ``site-packages`` and ``idlelib``.
    """
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if SKIP_PARTS.intersection(rel.parts[:-1]):
            continue
        out.append(path)
    return out


def is_heldout(rel_path: str, percent: int) -> bool:
    """Decide deterministically whether a file belongs to the held-out split.

    Args:
        rel_path: path relative to the stdlib root, with ``/`` separators.
        percent: share of files to hold out, in percent.

    Returns:
        ``True`` for held-out files.
    """
    digest = hashlib.sha256(rel_path.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 100 < percent


def build_corpus(root: Path, heldout_percent: int) -> tuple[list[str], list[str]]:
    """Read the stdlib sources and split them into train and held-out texts.

    Args:
        root: the stdlib directory.
        heldout_percent: share of files held out.

    Returns:
        ``(train_texts, heldout_texts)``, one string per file, in sorted path order.
    """
    train, heldout = [], []
    for path in stdlib_files(root):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if not text.strip():
            continue
        rel = path.relative_to(root).as_posix()
        (heldout if is_heldout(rel, heldout_percent) else train).append(text)
    return train, heldout


def train_tokenizer(texts: list[str], vocab_size: int):
    """Train a byte-level BPE tokenizer with ``<pad>`` = 0 and ``<eos>`` = 1.

    Args:
        texts: training documents.
        vocab_size: target vocabulary size including special tokens.

    Returns:
        A ``tokenizers.Tokenizer``.
    """
    from tokenizers import Tokenizer, decoders, models as tok_models, pre_tokenizers, trainers

    tok = Tokenizer(tok_models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[PAD, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    assert tok.token_to_id(PAD) == 0 and tok.token_to_id(EOS) == 1
    return tok


def encode_stream(tok, texts: list[str]) -> np.ndarray:
    """Tokenise documents into one stream, each followed by ``<eos>``.

    Args:
        tok: the tokenizer.
        texts: documents.

    Returns:
        1-D ``uint16`` array of token ids.
    """
    eos = tok.token_to_id(EOS)
    parts = []
    for enc in tok.encode_batch(texts):
        parts.append(np.asarray(enc.ids + [eos], dtype=np.uint16))
    return np.concatenate(parts)


def unigram_perplexity(train_ids: np.ndarray, eval_ids: np.ndarray, vocab_size: int) -> float:
    """Perplexity of an add-one-smoothed unigram model fit on ``train_ids``.

    Args:
        train_ids: training tokens.
        eval_ids: tokens to score.
        vocab_size: vocabulary size.

    Returns:
        The unigram perplexity on ``eval_ids``.
    """
    counts = np.bincount(train_ids.astype(np.int64), minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(math.exp(-logp[eval_ids.astype(np.int64)].mean()))


def lr_at(step: int, progress: float, peak: float, warmup: int, floor: float) -> float:
    """Linear warm-up then cosine decay driven by wall-clock progress.

    Args:
        step: optimizer steps done.
        progress: elapsed fraction of the time budget in ``[0, 1]``.
        peak: peak learning rate.
        warmup: warm-up steps.
        floor: final learning rate as a fraction of ``peak``.

    Returns:
        The learning rate for this step.
    """
    if step < warmup:
        return peak * (step + 1) / warmup
    cos = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return peak * (floor + (1.0 - floor) * cos)


def main(argv: list[str] | None = None) -> int:
    """Run the full pipeline; see the module docstring.

    Args:
        argv: command-line arguments (default ``sys.argv[1:]``).

    Returns:
        Process exit code.
    """
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(models.CHECKPOINT_ROOT / "llama-stdlib"))
    p.add_argument("--minutes", type=float, default=25.0, help="training-loop wall-clock budget")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--heldout-percent", type=int, default=3)
    p.add_argument("--heldout-bytes", type=int, default=80_000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    t_start = time.time()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    root = Path(sysconfig.get_paths()["stdlib"])

    train_texts, heldout_texts = build_corpus(root, args.heldout_percent)
    heldout_text, size = [], 0
    for text in heldout_texts:
        if size >= args.heldout_bytes:
            break
        heldout_text.append(text)
        size += len(text.encode("utf-8"))
    heldout_str = "\n\n".join(heldout_text)
    (out / models.HELDOUT_FILE).write_text(heldout_str, encoding="utf-8")
    print(f"corpus: {len(train_texts)} train files, {len(heldout_texts)} held-out files, "
          f"heldout.txt {len(heldout_str.encode())} bytes", flush=True)

    tok = train_tokenizer(train_texts, args.vocab_size)
    tok.save(str(out / models.TOKENIZER_FILE))
    train_ids = encode_stream(tok, train_texts)
    heldout_ids = np.asarray(tok.encode(heldout_str).ids, dtype=np.uint16)
    unigram_ppl = unigram_perplexity(train_ids, heldout_ids, args.vocab_size)
    print(f"tokenizer: {tok.get_vocab_size()} tokens; train stream {len(train_ids)} tokens; "
          f"heldout {len(heldout_ids)} tokens; unigram ppl {unigram_ppl:.1f} "
          f"({time.time() - t_start:.0f}s)", flush=True)

    config = LlamaConfig(**{**models.PRESETS["llama"]["small"], "vocab_size": args.vocab_size,
                            "max_position_embeddings": max(512, args.seq_len)})
    model = models.build_from_config(config, seed=args.seed).train()
    decay = [p_ for n, p_ in model.named_parameters() if p_.ndim >= 2]
    no_decay = [p_ for n, p_ in model.named_parameters() if p_.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8)

    rng = np.random.default_rng(args.seed)
    data = torch.from_numpy(train_ids.astype(np.int64))
    seq, bs = args.seq_len, args.batch_size
    mask = torch.ones(bs, seq, dtype=torch.long)
    pos = torch.arange(seq)[None].expand(bs, -1)
    budget = args.minutes * 60.0
    t_train = time.time()
    step, tokens, ema = 0, 0, None
    history = []
    while True:
        elapsed = time.time() - t_train
        if elapsed >= budget:
            break
        lr = lr_at(step, elapsed / budget, args.lr, args.warmup, 0.1)
        for g in opt.param_groups:
            g["lr"] = lr
        starts = torch.from_numpy(rng.integers(0, len(data) - seq - 1, size=bs))
        idx = starts[:, None] + torch.arange(seq + 1)[None]
        batch = data[idx]
        logits, _ = model(batch[:, :-1], mask, pos)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens += bs * seq
        loss_value = loss.item()
        ema = loss_value if ema is None else 0.95 * ema + 0.05 * loss_value
        if step % 10 == 0:
            rate = tokens / (time.time() - t_train)
            print(f"step {step} loss {loss_value:.3f} ema {ema:.3f} lr {lr:.2e} "
                  f"{rate:.0f} tok/s {elapsed / 60:.1f} min", flush=True)
            history.append({"step": step, "loss_ema": round(ema, 4), "minutes": round(elapsed / 60, 2)})
    train_minutes = (time.time() - t_train) / 60

    model.eval()
    models.save_checkpoint(model, out, dtype=torch.float16)
    reloaded = models.load_checkpoint(out)
    heldout_list = heldout_ids.astype(np.int64).tolist()
    ppl_full = models.evaluate_perplexity(reloaded, heldout_list, chunk_len=256)
    ppl_2k = models.evaluate_perplexity(reloaded, heldout_list[:2048], chunk_len=256)
    log = {
        "command": "python -m models.train_reference " + " ".join(argv if argv is not None else sys.argv[1:]),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "config": config.to_dict(),
        "num_parameters": sum(p_.numel() for p_ in model.parameters()),
        "train_files": len(train_texts),
        "heldout_files": len(heldout_texts),
        "train_stream_tokens": int(len(train_ids)),
        "heldout_tokens": int(len(heldout_ids)),
        "steps": step,
        "batch_size": bs,
        "seq_len": seq,
        "tokens_seen": tokens,
        "final_train_loss_ema": round(ema, 4) if ema is not None else None,
        "heldout_perplexity": round(ppl_full, 3),
        "heldout_perplexity_first_2048_tokens": round(ppl_2k, 3),
        "unigram_perplexity": round(unigram_ppl, 3),
        "eval_protocol": "fp16 weights reloaded to fp32; non-overlapping 256-token chunks",
        "train_minutes": round(train_minutes, 2),
        "wall_minutes_total": round((time.time() - t_start) / 60, 2),
        "history": history,
    }
    (out / "train_log.json").write_text(json.dumps(log, indent=2) + "\n")
    print(json.dumps({k: v for k, v in log.items() if k != "history"}, indent=2), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
