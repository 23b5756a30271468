"""`classify` in Python: an MLP over 784 floats (an MNIST-shaped image),
answered with the five most likely classes, through Hearth's wasi-nn host.

Request: `{"input": [784 numbers]}` as JSON, or `application/octet-stream` of
784 little-endian f32. Response: `{"top": [{"class": N, "score": P}, ...]}`,
highest score first; errors are `{"error": "..."}`, as `classify` answers.
"""

import json
import struct

from componentize_py_types import Err, Ok
from wit_world import exports
from wit_world.imports import graph, streams, tensor
from wit_world.imports.types import (
    Fields,
    IncomingRequest,
    Method_Post,
    OutgoingBody,
    OutgoingResponse,
    ResponseOutparam,
)

INPUTS = 784
TOP = 5
MODEL = "mnist-mlp"
# Loaded on the first call and kept while the instance lives.
_graph = None


class IncomingHandler(exports.IncomingHandler):
    def handle(self, request: IncomingRequest, response_out: ResponseOutparam) -> None:
        status, answer = classify(request)
        body = json.dumps(answer, separators=(",", ":")).encode()
        response = OutgoingResponse(Fields.from_list([("content-type", b"application/json")]))
        response.set_status_code(status)
        out = response.body()
        ResponseOutparam.set(response_out, Ok(response))
        with out.write() as stream:
            for at in range(0, len(body), 4096):
                stream.blocking_write_and_flush(body[at : at + 4096])
        OutgoingBody.finish(out, None)


def classify(request: IncomingRequest):
    if not isinstance(request.method(), Method_Post):
        return 405, error('POST a JSON {"input": [784 numbers]} or 784 little-endian f32')
    binary = any(
        name.lower() == "content-type" and value.startswith(b"application/octet-stream")
        for name, value in request.headers().entries()
    )
    body = read_body(request)
    if binary:
        if len(body) != INPUTS * 4:
            return 400, error(f"expected {INPUTS * 4} bytes ({INPUTS} little-endian f32), got {len(body)}")
        data = body
    else:
        try:
            values = json.loads(body)["input"]
            data = struct.pack(f"<{len(values)}f", *values)
        except (ValueError, KeyError, TypeError, struct.error) as err:
            return 400, error(f'expected {{"input": [{INPUTS} numbers]}}: {err}')
        if len(values) != INPUTS:
            return 400, error(f"expected {INPUTS} values, got {len(values)}")
    global _graph
    try:
        if _graph is None:
            _graph = graph.load_by_name(MODEL)
        context = _graph.init_execution_context()
        outputs = context.compute([("input", tensor.Tensor([1, INPUTS], tensor.TensorType.FP32, data))])
    except Err as err:
        return 500, error(f"inference failed: {err.value.data()}")
    scores_tensor = outputs[0][1]
    raw = scores_tensor.data()
    scores = struct.unpack(f"<{len(raw) // 4}f", raw)
    ranked = sorted(range(len(scores)), key=lambda c: (-scores[c], c))[:TOP]
    return 200, {"top": [{"class": c, "score": scores[c]} for c in ranked]}


def read_body(request: IncomingRequest) -> bytes:
    incoming = request.consume()
    chunks = []
    with incoming.stream() as stream:
        while True:
            try:
                chunks.append(stream.blocking_read(65536))
            except Err as err:
                if isinstance(err.value, streams.StreamError_Closed):
                    break
                raise
    return b"".join(chunks)


def error(message: str):
    return {"error": message}
