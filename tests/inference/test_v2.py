"""The Open Inference Protocol (v2), driven by `tritonclient[http]`, a
client Hearth did not write: health, metadata, readiness, and inference on
classify's MLP and on the embedding model, whose outputs must match what the
functions' own `/fn` routes answer; Triton's metric names in `/metrics`,
agreeing with Hearth's own counters and usage records."""

from __future__ import annotations

import json
import re
from urllib.parse import urlparse

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

import minilm_reference as reference

MLP = "classify.mnist-mlp"
MINILM = "embed.minilm"


@pytest.fixture(scope="module")
def tc(inference_server):
    client = triton.InferenceServerClient(urlparse(inference_server.url).netloc)
    yield client
    client.close()


def test_health_and_metadata(tc, auth):
    assert tc.is_server_live()
    assert tc.is_server_ready()
    assert "binary_tensor_data" in tc.get_server_metadata()["extensions"]
    assert tc.is_model_ready(MLP, headers=auth())
    assert tc.is_model_ready(MINILM, model_version="2", headers=auth()) is False, "no version 2"
    mlp = tc.get_model_metadata(MLP, headers=auth())
    assert mlp["name"] == MLP and mlp["versions"] == ["1"]
    assert mlp["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 784]}]
    assert mlp["outputs"] == [{"name": "output", "datatype": "FP32", "shape": [-1, 10]}]
    minilm = tc.get_model_metadata(MINILM, model_version="1", headers=auth())
    assert [(i["name"], i["datatype"], i["shape"]) for i in minilm["inputs"]] == [
        ("input_ids", "INT64", [-1, -1]),
        ("attention_mask", "INT64", [-1, -1]),
    ]
    assert minilm["outputs"] == [{"name": "embeddings", "datatype": "FP32", "shape": [-1, 384]}]


def mlp_rows(n):
    return np.random.default_rng(7).random((n, 784), dtype=np.float32)


@pytest.mark.parametrize("binary", [True, False])
def test_mlp_inference_matches_the_function(tc, hearth, auth, binary):
    rows = mlp_rows(3)
    tensor = triton.InferInput("input", list(rows.shape), "FP32")
    tensor.set_data_from_numpy(rows, binary_data=binary)
    wanted = [triton.InferRequestedOutput("output", binary_data=binary)]
    result = tc.infer(MLP, [tensor], outputs=wanted, headers=auth())
    scores = result.as_numpy("output")
    assert scores.shape == (3, 10)
    assert result.get_response()["model_version"] == "1"
    for row, probabilities in zip(rows, scores):
        answer = hearth.invoke("classify", json.dumps({"input": row.tolist()}).encode())
        assert answer.status == 200
        top = json.loads(answer.body)["top"]
        assert [c["class"] for c in top] == list(np.argsort(-probabilities)[:5])
        for c in top:
            assert abs(c["score"] - probabilities[c["class"]]) < 1e-6


def test_embedding_inference_matches_the_function(tc, hearth, auth, minilm):
    texts = ["hello, world!", "Embeddings map sentences to vectors."]
    tokenizer = reference.tokenizer(minilm / "tokenizer.json")
    ids = [tokenizer.encode(t).ids for t in texts]
    length = max(len(i) for i in ids)
    input_ids = np.zeros((len(texts), length), dtype=np.int64)
    mask = np.zeros((len(texts), length), dtype=np.int64)
    for row, sequence in enumerate(ids):
        input_ids[row, : len(sequence)] = sequence
        mask[row, : len(sequence)] = 1
    inputs = []
    for name, array in (("input_ids", input_ids), ("attention_mask", mask)):
        tensor = triton.InferInput(name, list(array.shape), "INT64")
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    got = tc.infer(MINILM, inputs, headers=auth()).as_numpy("embeddings")
    answer = hearth.invoke("embed", json.dumps({"texts": texts}).encode())
    want = np.asarray(json.loads(answer.body)["embeddings"], dtype=np.float32)
    assert got.shape == want.shape == (2, 384)
    assert np.abs(got - want).max() < 1e-5


def test_errors_are_precise(tc, inference_server, auth):
    tensor = triton.InferInput("input", [1, 3], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 3), dtype=np.float32))
    with pytest.raises(InferenceServerException) as wrong_shape:
        tc.infer(MLP, [tensor], headers=auth())
    assert wrong_shape.value.status() == "400"
    assert "expected shape" in wrong_shape.value.message()
    with pytest.raises(InferenceServerException) as unknown:
        tc.get_model_metadata("classify.nope", headers=auth())
    assert unknown.value.status() == "404"
    with pytest.raises(InferenceServerException) as anonymous:
        tc.get_model_metadata(MLP)
    assert anonymous.value.status() == "401"
    # A model the manifest does not serve is not reachable, and says why.
    answer = httpx.get(f"{inference_server.url}/v2/models/embed.tokenizer", headers=auth())
    assert answer.status_code == 404
    assert answer.headers["content-type"].startswith("application/problem+json")


def metric(text, name, model):
    pattern = rf'^{name}{{model="{re.escape(model)}",tenant="default",version="1"}} (\S+)$'
    found = re.search(pattern, text, re.MULTILINE)
    assert found, f"{name} for {model} not in /metrics"
    return float(found.group(1))


def test_triton_metrics_agree_with_hearths_own(tc, hearth, inference_server, auth):
    before_records = {r["id"] for r in hearth.usage()}
    rows = mlp_rows(4)
    for n in (1, 3):
        tensor = triton.InferInput("input", [n, 784], "FP32")
        tensor.set_data_from_numpy(rows[:n])
        tc.infer(MLP, [tensor], headers=auth())
    bad = triton.InferInput("input", [1, 3], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 3), dtype=np.float32))
    with pytest.raises(InferenceServerException):
        tc.infer(MLP, [bad], headers=auth())
    text = httpx.get(f"{inference_server.url}/metrics", headers=auth()).text
    records = [r for r in hearth.usage() if r["function"] == "classify"]
    new = [r for r in records if r["id"] not in before_records]
    # Each direct call left one record of its own, its compute billed.
    direct = [r for r in new if r["status"] == 200]
    assert len(direct) == 2 and all(r["inference_calls"] == 1 and r["compute_ms"] > 0 for r in direct)
    assert [r["outcome"] for r in new if r["status"] == 400] == ["bad_request"]
    # Every classify call this session (guest or direct), against the
    # model's Triton counters.
    calls = sum(r["inference_calls"] for r in records)
    assert metric(text, "nv_inference_request_success", MLP) == calls
    assert metric(text, "nv_inference_request_failure", MLP) >= 1
    rows_served = metric(text, "nv_inference_count", MLP)
    assert rows_served >= 4 + calls - 2, "the direct calls' 1 and 3 rows, at least one per other call"
    both = (MLP, MINILM)
    compute_us = sum(metric(text, "nv_inference_compute_infer_duration_us", m) for m in both)
    answered = sum(metric(text, "nv_inference_request_success", m) for m in both)
    own = re.search(r'^hearth_inference_compute_time_seconds_total\{kind="cpu".*\} (\S+)$', text, re.MULTILINE)
    assert own, "hearth's own compute counter"
    # The same compute: Triton's counter rounds each call down to the
    # microsecond.
    assert 0 <= float(own.group(1)) * 1e6 - compute_us <= answered + 1
    # A joined run counts once; queueing is part of a request's time.
    assert 1 <= metric(text, "nv_inference_exec_count", MLP) <= calls
    assert metric(text, "nv_inference_request_duration_us", MLP) >= metric(text, "nv_inference_queue_duration_us", MLP)


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_requests_are_read(tc, auth, algorithm):
    rows = mlp_rows(2)
    tensor = triton.InferInput("input", list(rows.shape), "FP32")
    tensor.set_data_from_numpy(rows)
    plain = tc.infer(MLP, [tensor], headers=auth()).as_numpy("output")
    compressed = tc.infer(MLP, [tensor], headers=auth(), request_compression_algorithm=algorithm)
    assert np.array_equal(compressed.as_numpy("output"), plain)


def test_an_unknown_content_encoding_is_refused_with_a_problem(inference_server, auth):
    answer = httpx.post(
        f"{inference_server.url}/v2/models/{MLP}/infer",
        headers={**auth(), "Content-Encoding": "br", "Content-Type": "application/json"},
        content=b"\x0b\x02\x80{}\x03",
    )
    assert answer.status_code == 415
    assert answer.headers["content-type"].startswith("application/problem+json")
    problem = answer.json()
    assert "br" in problem["detail"] and "gzip" in problem["detail"], problem
    assert problem["error"] == problem["detail"]
