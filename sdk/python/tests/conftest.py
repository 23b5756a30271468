"""A real `hearth serve` on loopback for the tests, with its own data
directory and a known admin token. The binary is `HEARTH_BIN`, else the
debug build under `CARGO_TARGET_DIR` (or the checkout's `target/`)."""

from __future__ import annotations

import os
import queue
import subprocess
import threading
from pathlib import Path
from typing import Iterator

import pytest

from hearth_client import Client

ROOT = Path(__file__).resolve().parents[3]
TOKEN = "hth_python_sdk_tests"


def hearth_bin() -> str:
    if os.environ.get("HEARTH_BIN"):
        return os.environ["HEARTH_BIN"]
    target = Path(os.environ.get("CARGO_TARGET_DIR") or ROOT / "target")
    binary = target / "debug" / "hearth"
    if not binary.exists():
        raise RuntimeError(f"{binary} is missing: run `cargo build -p hearth-server` (or set HEARTH_BIN)")
    return str(binary)


class Server:
    def __init__(self, data_dir: Path, *args: str):
        self.log = (data_dir / "server.log").open("ab")
        env = dict(os.environ, HEARTH_ADMIN_TOKEN=TOKEN, HEARTH_LOG="info")
        self.process = subprocess.Popen(
            [hearth_bin(), "serve", "--listen", "127.0.0.1:0", "--data-dir", str(data_dir), *args],
            stdout=subprocess.PIPE,
            stderr=self.log,
            env=env,
        )
        lines: "queue.Queue[str]" = queue.Queue()

        def read() -> None:
            assert self.process.stdout is not None
            for line in self.process.stdout:
                lines.put(line.decode())

        threading.Thread(target=read, daemon=True).start()
        while True:
            try:
                line = lines.get(timeout=60)
            except queue.Empty:
                self.stop()
                raise RuntimeError(f"hearth serve did not start; see {data_dir / 'server.log'}")
            if line.startswith("hearth listening on "):
                self.url = line.removeprefix("hearth listening on ").strip()
                return

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()
        self.log.close()


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    data = tmp_path_factory.mktemp("hearth")
    running = Server(data, "--max-body-bytes", "4096")
    yield running
    running.stop()


@pytest.fixture()
def client(server: Server) -> Iterator[Client]:
    with Client(url=server.url, token=TOKEN) as hearth:
        yield hearth
