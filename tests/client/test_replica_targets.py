"""How a client takes several replicas: the target forms it accepts (a list, commas,
dns:///), which calls it retries, and `retd --target a,b`."""

from __future__ import annotations

from typing import Any

import pytest

from retd.client._balancing import RETRIED_METHODS, TargetError, deterministic, resolve
from retd.client._requests import generate as generate_request
from tests.client.conftest import embeddings
from tests.conftest import RunningServer

E = embeddings(8, seed=21)


# ---- target forms ------------------------------------------------------------------------


def test_target_forms() -> None:
    single = resolve("127.0.0.1:50051")
    assert (single.target, single.balanced, single.options) == ("127.0.0.1:50051", False, ())
    assert not resolve(["localhost:1"]).balanced  # one address: gRPC's defaults, as before
    forms = [
        "127.0.0.1:1,127.0.0.1:2",
        " 127.0.0.1:1 , 127.0.0.1:2, ",
        ["127.0.0.1:1", "127.0.0.1:2"],
        ("127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:1"),  # the same address once
    ]
    for target in forms:
        many = resolve(target)
        assert many.target == "ipv4:127.0.0.1:1,127.0.0.1:2" and many.balanced, target
    assert resolve(["[::1]:1", "[::1]:2"]).target == "ipv6:[::1]:1,[::1]:2"
    assert resolve(["localhost:1", "127.0.0.1:2"]).target.startswith("ipv4:127.0.0.1:1,")
    assert resolve("dns:///retd-headless:50051").balanced
    assert resolve("ipv4:10.0.0.1:1,10.0.0.2:1").target == "ipv4:10.0.0.1:1,10.0.0.2:1"
    assert not resolve("ipv4:10.0.0.1:1").balanced
    config = dict(resolve("127.0.0.1:1,127.0.0.1:2").options)
    assert '"round_robin"' in config["grpc.service_config"]
    for method in RETRIED_METHODS:
        assert f'"method": "{method}"' in config["grpc.service_config"]
    assert '"Generate"' not in config["grpc.service_config"]  # the client decides per request
    assert "hedgingPolicy" not in config["grpc.service_config"]
    own = [("grpc.service_config", "{}")]
    assert not resolve("127.0.0.1:1,127.0.0.1:2", own).balanced  # the caller's policy wins
    for bad in (
        "",
        " , ",
        "127.0.0.1:1,127.0.0.1",
        "127.0.0.1:1,dns:///x:1",
        "127.0.0.1:1,[::1]:2",
    ):
        with pytest.raises(TargetError):
            resolve(bad)


def test_only_deterministic_generates_are_retried() -> None:
    def request(**kwargs: Any) -> Any:
        params = dict(model=None, max_new_tokens=8, temperature=None, top_k=None, top_p=None)
        params.update(seed=None, stop=None, encoding="raw")
        return generate_request(E[0], **{**params, **kwargs})

    assert deterministic(request(seed=0))
    assert deterministic(request(temperature=0.0))
    assert deterministic(request(temperature=0.9, seed=3))
    assert not deterministic(request())
    assert not deterministic(request(temperature=0.9, top_p=0.5))


def test_cli_target_takes_several_replicas(server: RunningServer) -> None:
    import io

    from retd.client.cli import main

    out = io.StringIO()
    assert main(["health", "--target", f"{server.address},{server.address}"], out=out) == 0
    assert out.getvalue() == "SERVING\n"
    assert main(["health", "--target", "127.0.0.1:1,nonsense"], out=io.StringIO()) == 2
