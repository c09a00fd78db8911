"""toolkit: export PyTorch transformers to ONNX, rewrite them onto fused custom
operators (softmax–top-k, quantized KV-cache attention, low-rank projections) and
prove numerical parity with the original model.

Heavy dependencies (torch, onnxruntime, transformers) are imported lazily, so
``import toolkit`` and ``toolkit --help`` stay instant.
"""

__version__ = "0.1.0"


def load(directory, providers=None, threads=None, session_options=None, require_parity=False):
    """Open a ``toolkit convert`` bundle in ONNX Runtime after checking its manifest.

    See :func:`toolkit.bundle.load`.
    """
    from toolkit.bundle import load as _load

    return _load(directory, providers=providers, threads=threads, session_options=session_options,
                 require_parity=require_parity)
