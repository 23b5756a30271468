"""`embed` against all-MiniLM-L6-v2 computed outside Hearth: the same
weights in numpy (`minilm_reference`), tokenized by HuggingFace's reference
`tokenizers` package. Token ids must be identical and every embedding's
cosine to the reference at least 0.9999."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import minilm_reference as reference

SENTENCES = [
    "hello, world!",
    "A",
    "The quick brown fox jumps over the lazy dog.",
    "Serverless inference should start cold in milliseconds, not seconds.",
    "Embeddings map sentences to vectors; similar meanings land close together.",
    "naïve café façade — résumé of a crème brûlée",
    "ÜBER-GROSS STRASSE in München",
    "Tokyo 東京 and Beijing 北京 are capitals.",
    "emoji 🙂 and symbols ∑ ∫ √ are rare in the vocabulary",
    "numbers: 3.14159, 2,718, 1e-9 and 42",
    "   leading and trailing spaces   ",
    "tabs\tand\nnewlines\nin text",
    "UPPER lower MiXeD CaSe",
    "don't can't won't shouldn't",
    "https://example.com/path?query=1&other=two",
    "a " * 40,
    "Retrieval-augmented generation retrieves passages with a dense retriever " * 4,
    "word " * 200,
    " ".join(f"token{i}" for i in range(300)),
    "One more sentence, of ordinary length, to round out the set.",
    "Short.",
    "The model truncates long inputs at two hundred and fifty-six tokens. " * 20,
]


@pytest.fixture(scope="module")
def expected(minilm):
    tokenizer = reference.tokenizer(minilm / "tokenizer.json")
    weights = reference.load_safetensors(minilm / "model.safetensors")
    ids = [tokenizer.encode(text).ids for text in SENTENCES]
    return ids, [reference.embed(weights, sentence_ids) for sentence_ids in ids]


def embed(hearth, texts):
    answer = hearth.invoke("embed", json.dumps({"texts": texts, "return_token_ids": True}).encode())
    assert answer.status == 200, answer.body
    return json.loads(answer.body)


def check(body, texts, expected_ids, expected_vectors):
    assert body["model"] == "all-MiniLM-L6-v2"
    assert body["token_ids"] == expected_ids
    assert body["tokens"] == sum(len(ids) for ids in expected_ids)
    for text, got, want in zip(texts, body["embeddings"], expected_vectors):
        got = np.asarray(got, dtype=np.float64)
        assert got.shape == (384,)
        assert abs(np.linalg.norm(got) - 1.0) < 1e-4, text
        cosine = float(got @ want / np.linalg.norm(got) / np.linalg.norm(want))
        assert cosine >= 0.9999, f"{text[:40]!r}: cosine {cosine}"


def test_embeddings_match_the_reference_one_text_at_a_time(hearth, expected):
    ids, vectors = expected
    assert max(len(i) for i in ids) == reference.MAX_TOKENS, "one sentence is truncated"
    for n, text in enumerate(SENTENCES):
        check(embed(hearth, [text]), [text], [ids[n]], [vectors[n]])


def test_embeddings_match_the_reference_padded_together_and_concurrently(hearth, expected):
    ids, vectors = expected
    # All at once: padded to the longest's bucket in one model call.
    check(embed(hearth, SENTENCES), SENTENCES, ids, vectors)
    # Concurrent requests of two or three texts: the host joins calls of
    # the same padded length into shared runs; each gets its own rows.
    groups = [list(range(i, min(i + 3, len(SENTENCES)))) for i in range(0, len(SENTENCES), 3)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        bodies = list(pool.map(lambda g: embed(hearth, [SENTENCES[n] for n in g]), groups))
    for group, body in zip(groups, bodies):
        check(body, [SENTENCES[n] for n in group], [ids[n] for n in group], [vectors[n] for n in group])


def test_bad_requests_get_a_clear_error(hearth):
    for body, status, words in [
        (b"not json", 400, "expected"),
        (json.dumps({"texts": []}).encode(), 400, "1 to 64"),
        (json.dumps({"texts": ["x"] * 65}).encode(), 400, "1 to 64"),
        (json.dumps({"texts": [1]}).encode(), 400, "expected"),
        (json.dumps({"text": ["a"]}).encode(), 400, "unknown field"),
    ]:
        answer = hearth.invoke("embed", body)
        assert answer.status == status, answer.body
        assert words in json.loads(answer.body)["error"]
    assert hearth.invoke("embed", method="GET").status == 405
