"""The Python client against a real `hearth serve`: every call goes over
HTTP to the server the fixture started."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from hearth_client import Client, HearthError

from conftest import ROOT


@pytest.fixture(scope="module")
def echo(server) -> str:
    """`functions/echo`, deployed from its directory (its `build` runs)."""
    # The build writes where the manifest expects it (functions/target),
    # not into a shared CARGO_TARGET_DIR.
    saved = os.environ.pop("CARGO_TARGET_DIR", None)
    try:
        with Client(url=server.url, token="hth_python_sdk_tests") as hearth:
            version = hearth.deploy(ROOT / "functions" / "echo", progress=True)
    finally:
        if saved is not None:
            os.environ["CARGO_TARGET_DIR"] = saved
    assert version["name"] == "echo"
    return "echo"


def test_invoke_sync_and_async(client: Client, echo: str) -> None:
    answer = client.invoke(echo, data=b"hello", path="/greet?x=1", headers={"x-test": "yes"})
    assert answer.status == 200
    body = json.loads(answer.body)
    assert (body["body"], body["path"], body["query"]) == ("hello", "/greet", "x=1")
    assert body["headers"]["x-test"] == ["yes"]
    assert answer.invocation_id

    job = client.invoke_async(echo, data=b"later", path="/job")
    assert job.state in ("queued", "running", "succeeded")
    done = client.result(echo, job.id, timeout=60)
    assert done.state == "succeeded", done
    assert done.response is not None and done.response.status == 200
    assert json.loads(done.response.body)["body"] == "later"


def test_list_show_and_delete(client: Client, echo: str, tmp_path: Path) -> None:
    project = tmp_path / "other"
    project.mkdir()
    component = ROOT / "functions" / "target" / "wasm32-wasip2" / "release" / "echo.wasm"
    (project / "hearth.toml").write_text(f'name = "other"\ncomponent = "{component}"\n')
    client.deploy(project)
    assert {"echo", "other"} <= {f["name"] for f in client.functions()}
    assert client.function("other")["function"]["name"] == "other"
    client.delete("other")
    assert "other" not in {f["name"] for f in client.functions()}
    with pytest.raises(HearthError) as missing:
        client.function("other")
    assert missing.value.status == 404


def test_tokens_create_use_and_revoke(client: Client, server, echo: str) -> None:
    created = client.tokens.create("invoker", expires="1h")
    secret = created["token"]
    assert secret and created["role"] == "invoker"
    assert created["id"] in {t["id"] for t in client.tokens.list()}
    with Client(url=server.url, token=secret) as invoker:
        assert invoker.invoke(echo, data=b"x").status == 200
        client.tokens.revoke(created["id"])
        with pytest.raises(HearthError) as refused:
            invoker.invoke(echo, data=b"x")
    assert refused.value.status == 401
    assert refused.value.problem["status"] == 401


def test_usage_lists_every_invocation_once_and_resumes(client: Client, echo: str) -> None:
    ids = [client.invoke(echo, data=str(i).encode(), path=f"/usage/{i}").invocation_id for i in range(25)]
    records = client.usage(function=echo)
    seen = [record["id"] for record in records]
    assert len(seen) == len(set(seen)), "no record twice"
    assert set(ids) <= set(seen)
    cursor = records.cursor
    assert cursor is not None
    # Following from the cursor: only what came after.
    later = client.invoke(echo, data=b"after").invocation_id
    newer = [record["id"] for record in client.usage(function=echo, after=cursor)]
    assert newer == [later]
    totals = client.usage_summary(function=echo)
    assert sum(row["invocations"] for row in totals) >= 26


def test_errors_carry_the_problem(client: Client, server, echo: str) -> None:
    with pytest.raises(HearthError) as missing:
        client.invoke("no-such-function")
    assert missing.value.status == 404
    assert missing.value.problem["title"]

    with Client(url=server.url, token="hth_not_a_token") as stranger:
        with pytest.raises(HearthError) as unauthorized:
            stranger.functions()
    assert unauthorized.value.status == 401
    assert unauthorized.value.problem["type"].endswith("unauthorized"), unauthorized.value.problem

    with pytest.raises(HearthError) as too_large:
        client.invoke(echo, data=b"x" * 5000)
    assert too_large.value.status == 413
    assert "4096" in too_large.value.problem["detail"]


def test_status(client: Client, echo: str) -> None:
    status = client.status()
    assert any(device["id"] == "cpu" for device in status["devices"])
    assert echo in {f["name"] for f in status["functions"]}


def test_versions_aliases_and_rollback(client: Client, tmp_path: Path) -> None:
    component = ROOT / "functions" / "target" / "wasm32-wasip2" / "release" / "echo.wasm"
    project = tmp_path / "rollout"
    project.mkdir()
    (project / "hearth.toml").write_text(f'name = "rollout"\ncomponent = "{component}"\n')
    client.deploy(project)
    client.deploy(project)
    assert [v["version"] for v in client.versions("rollout")] == [1, 2]

    client.set_alias("rollout", "prod", version=1)
    assert client.invoke("rollout@prod").headers["x-hearth-version"] == "1"
    assert client.invoke("rollout@2").headers["x-hearth-version"] == "2"
    client.set_alias("rollout", "prod", split={1: 50, 2: 50})
    assert [r["version"] for r in client.aliases("rollout")[1]["routes"]] == [1, 2]
    back = client.rollback("rollout", "prod")
    assert back["routes"] == [{"version": 1, "weight": 1}]
    assert len(client.alias_history("rollout", "prod")) == 3

    with pytest.raises(HearthError) as in_use:
        client.delete("rollout", version=1)
    assert in_use.value.status == 409
    client.unset_alias("rollout", "prod")
    client.delete("rollout", version=1)
    assert [v["version"] for v in client.versions("rollout")] == [2]
    client.delete("rollout")
