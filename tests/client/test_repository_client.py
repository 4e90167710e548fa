"""Model versions from the client's side, against real daemons serving a model repository
(`retd serve --model-repo DIR`): `version=` on every call, the admin calls (list, load,
unload) of Client and AsyncClient, their typed errors, and `retd repo` / `--version`."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path

import pytest

from retd.client import (
    AsyncClient,
    Client,
    FailedPreconditionError,
    InvalidArgumentError,
    ModelState,
    ModelVersionStatus,
    NotFoundError,
    PermissionDeniedError,
    RepositoryListing,
    UnauthenticatedError,
)
from retd.client._balancing import ADMIN_SERVICE, service_config
from tests.client.conftest import embeddings
from tests.conftest import RunningServer, start_server

TOKEN = "admin-s3cret"
N = 8  # bytes per decoding call: enough to tell two versions apart
E = embeddings(2, seed=3)


@dataclass
class Repo:
    server: RunningServer
    path: Path

    @property
    def address(self) -> str:
        return self.server.address

    def client(self, **kwargs) -> Client:
        return Client(self.address, timeout=60, token=TOKEN, **kwargs)


def make_repository(root: Path) -> Path:
    """ret/1 and ret/2 (different weights), and broken/1 whose card names no known kind."""
    from retd.model.checkpoint import init_checkpoint

    repo = root / "repo"
    init_checkpoint(repo / "ret" / "1", seed=1)
    init_checkpoint(repo / "ret" / "2", seed=2)
    (repo / "broken" / "1").mkdir(parents=True)
    (repo / "broken" / "1" / "card.json").write_text(json.dumps({"kind": "nope"}))
    return repo


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Repo]:
    """One daemon serving the repository; its admin service wants TOKEN (`--admin-tokens`),
    its Decoder is open. Each test leaves it as it found it: ret 2 serving, ret 1 on disk."""
    root = tmp_path_factory.mktemp("repository")
    path = make_repository(root)
    tokens = root / "admin-tokens.txt"
    tokens.write_text(f"# admin\n{TOKEN}\n")
    server = start_server(root, ["--model-repo", str(path), "--admin-tokens", str(tokens)])
    yield Repo(server, path)
    assert server.stop() == 0, server.log()


def cli(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The `retd` console script (or `python -m retd.client.cli`) in a subprocess."""
    script = shutil.which("retd", path=os.path.dirname(sys.executable))
    command = [script] if script else [sys.executable, "-m", "retd.client.cli"]
    return subprocess.run(
        [*command, *argv],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "RETD_TOKEN": "", **(env or {})},
    )


# --- requests and answers carry the version ------------------------------------------------


def test_list_shows_every_version_and_its_state(repo):
    with repo.client() as client:
        listing = client.list_versions()
        assert isinstance(listing, RepositoryListing)
        assert listing.repository == str(repo.path) and listing.default_model == "ret"
        assert listing.models == ["broken", "ret"] and listing.serving == {"ret": 2}
        rows = {(row.name, row.version): row for row in listing}
        assert set(rows) == {("broken", 1), ("ret", 1), ("ret", 2)}
        assert rows["ret", 1] == ModelVersionStatus(
            "ret", 1, ModelState.AVAILABLE, kind="ret", path=str(repo.path / "ret" / "1")
        )
        served = rows["ret", 2]
        assert served.ready and served.serving and served.kind == "ret"
        assert served.active_calls == 0
        broken = rows["broken", 1]
        assert broken.failed and not broken.serving and broken.reason
        only = client.list_versions("ret")
        assert [(row.name, row.version) for row in only] == [("ret", 1), ("ret", 2)]
        assert only.of("ret") == listing.of("ret") and client.list_versions("nope").versions == []


def test_version_routes_every_call_and_answers_carry_it(repo):
    with repo.client() as client:
        loaded = client.load_model("ret", 1)
        try:
            assert (loaded.name, loaded.version, loaded.state) == ("ret", 1, ModelState.READY)
            assert not loaded.serving  # the newest loaded version (2) keeps the unnamed calls
            assert client.list_versions("ret").serving == {"ret": 2}
            one = [client.decode(e, model="ret", version=1, max_new_tokens=N) for e in E]
            two = [client.decode(e, model="ret", version=2, max_new_tokens=N) for e in E]
            assert [r.version for r in one] == [1, 1] and [r.version for r in two] == [2, 2]
            assert [r.text for r in one] != [r.text for r in two]  # other weights
            default = client.decode(E[0], max_new_tokens=N)
            assert (default.model, default.version, default.text) == ("ret", 2, two[0].text)
            assert client.decode(E[0], model="ret", max_new_tokens=N).version == 2

            sampled = client.generate(E[0], model="ret", version=1, max_new_tokens=N, seed=4)
            assert sampled.version == 1
            chunks = list(
                client.generate_stream(E[0], model="ret", version=1, max_new_tokens=N, seed=4)
            )
            assert chunks[-1].is_last and chunks[-1].version == 1
            assert "".join(c.text for c in chunks) == sampled.text
            batch = client.decode_batch(E, model="ret", version=1, max_new_tokens=N)
            assert [item.unwrap().version for item in batch] == [1, 1]
            assert [item.unwrap().text for item in batch] == [r.text for r in one]
            streamed = client.decode_stream(
                [("a", E[0]), ("b", E[1])], model="ret", version=1, max_new_tokens=N
            )
            answers = {item.id: item.unwrap() for item in streamed}
            assert {k: (r.version, r.text) for k, r in answers.items()} == {
                "a": (1, one[0].text),
                "b": (1, one[1].text),
            }

            info = client.model_info("ret", version=1)
            assert (info.name, info.repository_version, info.serving) == ("ret", 1, False)
            newest = client.model_info()
            assert (newest.repository_version, newest.serving) == (2, True)
            assert info.checkpoint_sha256 != newest.checkpoint_sha256
        finally:
            released = client.unload_model("ret", 1)
        assert [(r.name, r.version, r.state) for r in released] == [
            ("ret", 1, ModelState.AVAILABLE)
        ]
        with pytest.raises(NotFoundError, match=r"loaded versions: \[2\]"):
            client.decode(E[0], model="ret", version=1, max_new_tokens=N)
        assert client.list_versions("ret").of("ret")[0].state is ModelState.AVAILABLE


def test_a_version_not_loaded_is_not_found_and_names_the_loaded_ones(repo):
    with repo.client() as client:
        with pytest.raises(NotFoundError) as caught:
            client.decode(E[0], model="ret", version=7)
        assert "version 7" in caught.value.details and "[2]" in caught.value.details
        with pytest.raises(NotFoundError, match=r"\[2\]"):
            client.model_info("ret", version=1)  # on disk, not loaded
        with pytest.raises(NotFoundError, match=r"\[2\]"):
            client.decode_batch(E, model="ret", version=3)  # the whole call fails
        stream = client.generate_stream(E[0], model="ret", version=9)
        with pytest.raises(NotFoundError, match=r"\[2\]"):
            next(stream)
        items = list(client.decode_stream([E[0]], model="ret", version=9))
        assert len(items) == 1 and isinstance(items[0].error, NotFoundError)


def test_bad_versions_are_refused_before_any_call(repo):
    with repo.client() as client:
        for bad in (-1, 2**64, 1.5, True, "2"):
            with pytest.raises(InvalidArgumentError, match="version"):
                client.decode(E[0], version=bad)  # type: ignore[arg-type]
        with pytest.raises(InvalidArgumentError, match="version"):
            client.decode_stream([E[0]], version=-1)  # at once, not on iteration
        with pytest.raises(InvalidArgumentError, match="version"):
            client.load_model("ret", -2)
        with pytest.raises(InvalidArgumentError, match="model"):
            client.load_model(None)  # type: ignore[arg-type]


# --- the admin calls' errors ---------------------------------------------------------------


def test_load_and_unload_errors_are_typed(repo):
    with repo.client() as client:
        with pytest.raises(FailedPreconditionError) as caught:
            client.load_model("broken", 1)
        assert caught.value.code_name == "FAILED_PRECONDITION"
        assert "'broken' version 1 failed to load" in caught.value.details
        broken = client.list_versions("broken").of("broken")
        assert [row.state for row in broken] == [ModelState.FAILED]
        with pytest.raises(NotFoundError, match=r"versions there: \[1, 2\]"):
            client.load_model("ret", 9)
        with pytest.raises(NotFoundError, match="nope"):
            client.load_model("nope")
        with pytest.raises(NotFoundError, match="no loaded version 1"):
            client.unload_model("ret", 1)
        with pytest.raises(InvalidArgumentError, match="model: empty"):
            client.load_model("")
        assert client.list_versions().serving == {"ret": 2}  # nothing changed


def test_admin_calls_need_the_admin_token(repo):
    for kwargs in ({}, {"token": "wrong"}):
        with Client(repo.address, timeout=30, **kwargs) as client:
            for call in (
                client.list_versions,
                lambda: client.load_model("ret", 1),
                lambda: client.unload_model("nope"),
            ):
                with pytest.raises(UnauthenticatedError, match="Bearer"):
                    call()
            assert client.decode(E[0], max_new_tokens=N).version == 2  # the Decoder is open
    assert asyncio.run(_async_list(repo.address, token="wrong")) == "UNAUTHENTICATED"


async def _async_list(address: str, **kwargs) -> str:
    async with AsyncClient(address, timeout=30, **kwargs) as client:
        try:
            await client.list_versions()
        except (UnauthenticatedError, PermissionDeniedError) as err:
            return err.code_name
    return "OK"


def test_admin_is_closed_on_a_network_address_without_tokens(tmp_path, repo):
    """Bound to 0.0.0.0 with no token configured, nobody may load or unload (a later
    --host wins over start_server's 127.0.0.1); the Decoder still answers."""
    server = start_server(
        tmp_path, ["--model-repo", str(repo.path), "--repo-models", "ret", "--host", "0.0.0.0"]
    )
    try:
        address = f"127.0.0.1:{server.port}"
        with Client(address, timeout=30) as client:
            with pytest.raises(PermissionDeniedError, match="--admin-tokens"):
                client.list_versions()
            with pytest.raises(PermissionDeniedError):
                client.load_model("ret", 1)
            token_holder = Client(address, timeout=30, token=TOKEN)  # no token opens it
            with token_holder, pytest.raises(PermissionDeniedError):
                token_holder.unload_model("ret")
            assert client.decode(E[0], max_new_tokens=N).version == 2
        assert asyncio.run(_async_list(address)) == "PERMISSION_DENIED"
        done = cli("repo", "list", "--target", address)
        assert done.returncode == 2 and done.stderr.startswith("error: PERMISSION_DENIED")
    finally:
        assert server.stop() == 0, server.log()


def test_list_is_retried_across_replicas_load_and_unload_never():
    config = json.loads(service_config())
    (retried,) = config["methodConfig"]
    admin = [n["method"] for n in retried["name"] if n["service"] == ADMIN_SERVICE]
    assert ADMIN_SERVICE == "retd.v1.ModelRepository" and admin == ["List"]


# --- AsyncClient ---------------------------------------------------------------------------


def test_async_client_versions_and_admin_round_trip(repo):
    async def main() -> None:
        async with AsyncClient(repo.address, timeout=60, token=TOKEN) as client:
            listing = await client.list_versions("ret")
            assert listing.serving == {"ret": 2}
            status = await client.load_model("ret", 1)
            try:
                assert (status.version, status.state, status.serving) == (1, "ready", False)
                result = await client.decode(E[0], model="ret", version=1, max_new_tokens=N)
                assert result.version == 1
                generated = await client.generate(
                    E[0], model="ret", version=1, max_new_tokens=N, seed=1
                )
                assert generated.version == 1
                async with aclosing(
                    client.generate_stream(E[0], model="ret", version=1, max_new_tokens=N)
                ) as stream:
                    chunks = [chunk async for chunk in stream]
                assert chunks[-1].version == 1
                batch = await client.decode_batch(E, model="ret", version=1, max_new_tokens=N)
                assert {item.unwrap().version for item in batch} == {1}
                async with aclosing(
                    client.decode_stream(E, model="ret", version=1, max_new_tokens=N)
                ) as answers:
                    assert {item.unwrap().version async for item in answers} == {1}
                info = await client.model_info("ret", version=1)
                assert (info.repository_version, info.serving) == (1, False)
                with pytest.raises(NotFoundError, match=r"\[1, 2\]"):
                    await client.decode(E[0], model="ret", version=5)
                with pytest.raises(FailedPreconditionError, match="failed to load"):
                    await client.load_model("broken")
            finally:
                released = await client.unload_model("ret", 1)
            assert [(r.version, r.state) for r in released] == [(1, ModelState.AVAILABLE)]
            assert (await client.list_versions()).serving == {"ret": 2}

    asyncio.run(main())


# --- the command line ----------------------------------------------------------------------


def test_cli_repo_commands_and_version_option(repo, tmp_path):
    env = {"RETD_TARGET": repo.address, "RETD_TOKEN": TOKEN}
    done = cli("repo", "list", env=env)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"repository: {repo.path}" and lines[1] == "default model: ret"
    assert lines[2].split() == ["MODEL", "VERSION", "STATE", "KIND", "CALLS", "PATH", "/", "REASON"]
    rows = [line.split() for line in lines[3:]]
    assert [row[:3] for row in rows if row[0] != "*"] == [
        ["broken", "1", "failed"],
        ["ret", "1", "available"],
    ]
    assert [row[:4] for row in rows if row[0] == "*"] == [["*", "ret", "2", "ready"]]

    done = cli("repo", "load", "ret", "--version", "1", env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("loaded ret version 1: ready (")
    try:
        embedding = tmp_path / "e.json"
        embedding.write_text(json.dumps(E[0].tolist()))
        argv = ["decode", str(embedding), "--model", "ret", "--version", "1", "--json"]
        done = cli(*argv, "--max-new-tokens", str(N), env=env)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["version"] == 1
        done = cli("info", "--model", "ret", "--version", "1", "--json", env=env)
        info = json.loads(done.stdout)
        assert (info["repository_version"], info["serving"]) == (1, False)
        done = cli("repo", "list", "ret", "--json", env=env)
        listing = json.loads(done.stdout)
        assert listing["default_model"] == "ret"
        assert [(r["version"], r["state"], r["serving"]) for r in listing["versions"]] == [
            (1, "ready", False),
            (2, "ready", True),
        ]
    finally:
        done = cli("repo", "unload", "ret", "--version", "1", env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("unloaded ret version 1 (")

    done = cli("repo", "load", "broken", env=env)
    assert done.returncode == 2
    assert done.stderr.startswith("error: FAILED_PRECONDITION: model 'broken' version 1")
    done = cli("repo", "list", "--target", repo.address)  # no token
    assert done.returncode == 2 and done.stderr.startswith("error: UNAUTHENTICATED")
