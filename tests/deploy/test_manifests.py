"""The deployment files, checked offline: every Kubernetes manifest (and the GPU overlay as
kustomize renders it) against the Kubernetes API schemas that `kubernetes-validate` ships,
the ConfigMap's TOML and the pod's flags through the server's own config loader, the
Secret's tokens through the server's token store, and the Dockerfile's commands through
the real argument parsers."""

from __future__ import annotations

import argparse
import copy
import json
import re
import shlex
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from retd.client.cli import build_parser
from retd.server.config import DEFAULT_PORT, ServerConfig, add_arguments, load_config
from retd.server.security import TokenStore

REPO = Path(__file__).resolve().parents[2]
KUBE = REPO / "deploy" / "kubernetes"
BASE = KUBE / "base"
GPU = KUBE / "overlays" / "gpu"
#: The first release with GA gRPC probes, and the newest the package has schemas for.
VERSIONS = ("1.27", kubernetes_validate.utils.latest_version())


def load(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def kustomization(folder: Path) -> dict[str, Any]:
    (doc,) = load(folder / "kustomization.yaml")
    assert doc["kind"] == "Kustomization"
    return doc


def base_resources() -> dict[tuple[str, str], dict[str, Any]]:
    """The base's manifests by (kind, name), read through its kustomization's resources."""
    docs = {}
    for name in kustomization(BASE)["resources"]:
        path = BASE / name
        assert path.is_file(), f"kustomization.yaml lists {name}, which does not exist"
        for doc in load(path):
            docs[(doc["kind"], doc["metadata"]["name"])] = doc
    return docs


def merge(base: Any, patch: Any) -> Any:
    """A strategic merge patch as kustomize applies this overlay's: maps merge, lists of
    named maps (containers) merge by name, other lists are replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = dict(base)
        for key, value in patch.items():
            merged[key] = merge(base[key], value) if key in base else copy.deepcopy(value)
        return merged
    if (
        isinstance(base, list)
        and isinstance(patch, list)
        and all(isinstance(i, dict) and "name" in i for i in base + patch)
    ):
        by_name = {item["name"]: item for item in base}
        merged_list = [merge(by_name.get(item["name"], {}), item) for item in patch]
        patched = {item["name"] for item in patch}
        return [item for item in base if item["name"] not in patched] + merged_list
    return copy.deepcopy(patch)


def gpu_deployment() -> dict[str, Any]:
    overlay = kustomization(GPU)
    assert [str((GPU / r).resolve()) for r in overlay["resources"]] == [str(BASE.resolve())]
    (patch_entry,) = overlay["patches"]
    target = patch_entry["target"]
    base = base_resources()
    assert (target["kind"], target["name"]) in base, f"the GPU patch targets {target}"
    (patch,) = load(GPU / patch_entry["path"])
    assert (patch["kind"], patch["metadata"]["name"]) == (target["kind"], target["name"])
    base_names = {c["name"] for c in pod_spec(base[("Deployment", "retd")])["containers"]}
    assert {c["name"] for c in pod_spec(patch)["containers"]} <= base_names
    return merge(base[("Deployment", "retd")], patch)


def pod_spec(deployment: dict[str, Any]) -> dict[str, Any]:
    return deployment["spec"]["template"]["spec"]


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (only,) = pod_spec(deployment)["containers"]
    return only


def server_config(tmp_path: Path, checkpoint: Path, args: list[str]) -> ServerConfig:
    """What `retd serve --host 0.0.0.0 ARGS` (the image's entrypoint) would run with; the
    ConfigMap's retd.toml stands where the pod mounts it, and the test checkpoint stands in
    for the image's baked-in one."""
    toml = configmap_toml()
    mounted = tmp_path / "retd.toml"
    mounted.write_text(toml)
    args = [str(mounted) if a == "/etc/retd/config/retd.toml" else a for a in args]
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    parsed = parser.parse_args(["--host", "0.0.0.0", *args, "--checkpoint", str(checkpoint)])
    return load_config(parsed, {})


def configmap_toml() -> str:
    return str(base_resources()[("ConfigMap", "retd-config")]["data"]["retd.toml"])


# ---- schemas --------------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_is_valid_kubernetes(version: str) -> None:
    docs = list(base_resources().values()) + [gpu_deployment()]
    assert {kind for kind, _ in base_resources()} == {
        "ConfigMap",
        "Deployment",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "Secret",
        "Service",
    }
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


def test_the_validator_can_fail() -> None:
    deployment = copy.deepcopy(base_resources()[("Deployment", "retd")])
    container(deployment)["readinessProbe"]["grpc"]["port"] = "grpc"  # must be an integer
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, VERSIONS[-1], strict=True)
    container(deployment).pop("readinessProbe")
    container(deployment)["readinessProbes"] = {}  # strict: unknown fields are errors
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, VERSIONS[-1], strict=True)


def test_every_yaml_file_is_used() -> None:
    listed = {BASE / name for name in kustomization(BASE)["resources"]}
    listed |= {GPU / p["path"] for p in kustomization(GPU)["patches"]}
    files = {p for p in KUBE.rglob("*.yaml") if p.name != "kustomization.yaml"}
    assert files == listed


# ---- the pod and the daemon agree -------------------------------------------------------------


def test_probes_use_the_grpc_health_port(tmp_path: Path, checkpoint: Path) -> None:
    deployment = base_resources()[("Deployment", "retd")]
    retd = container(deployment)
    config = server_config(tmp_path, checkpoint, retd["args"])
    ports = {p["name"]: p["containerPort"] for p in retd["ports"]}
    assert ports["grpc"] == config.port == DEFAULT_PORT
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert retd[probe]["grpc"] == {"port": config.port}, probe  # "" = the whole server
    # The startup probe waits long enough for a model to load and warm up (tests allow 120 s).
    startup = retd["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120


def test_termination_grace_covers_prestop_and_the_drain(tmp_path: Path, checkpoint: Path) -> None:
    for deployment in (base_resources()[("Deployment", "retd")], gpu_deployment()):
        retd = container(deployment)
        config = server_config(tmp_path, checkpoint, retd["args"])
        assert config.grace_period == ServerConfig().grace_period  # the server's default
        command = retd["lifecycle"]["preStop"]["exec"]["command"]
        assert command[0] == "sleep"
        pre_stop = float(command[1])
        assert pre_stop > 0
        # SIGTERM comes after preStop; the drain takes up to grace_period, then the listener
        # closes (0.5 s) and the workers stop: a margin of 5 s at least.
        grace = pod_spec(deployment)["terminationGracePeriodSeconds"]
        assert grace >= pre_stop + config.grace_period + 5


def test_configmap_toml_loads_with_the_server_config(tmp_path: Path, checkpoint: Path) -> None:
    docs = base_resources()
    deployment = docs[("Deployment", "retd")]
    retd = container(deployment)
    config = server_config(tmp_path, checkpoint, retd["args"])
    assert config.host == "0.0.0.0" and config.telemetry.metrics_host == "0.0.0.0"
    # Prometheus scrapes the daemon's metrics port.
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    ports = {p["name"]: p["containerPort"] for p in retd["ports"]}
    assert annotations["prometheus.io/scrape"] == "true"
    assert (
        int(annotations["prometheus.io/port"]) == config.telemetry.metrics_port == ports["metrics"]
    )
    assert annotations["prometheus.io/path"] == "/metrics"
    # torch threads stay below the CPU limit (the event loop keeps a core).
    assert 0 < config.torch_threads < int(retd["resources"]["limits"]["cpu"])
    # The files the config names are where the pod mounts them.
    mounts = {m["name"]: m["mountPath"] for m in retd["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec(deployment)["volumes"]}
    assert retd["args"] == ["--config", f"{mounts['config']}/retd.toml"]
    assert volumes["config"]["configMap"]["name"] == "retd-config"
    assert volumes["secrets"]["secret"]["secretName"] == "retd-secrets"
    secret = docs[("Secret", "retd-secrets")]["stringData"]
    assert config.auth_tokens == Path(mounts["secrets"]) / "tokens.txt"
    assert config.auth_tokens.name in secret
    commented = re.findall(r'^# (tls_\w+) = "(.+)"$', configmap_toml(), re.MULTILINE)
    assert commented, "the TLS settings to uncomment"
    for _, path in commented:
        assert Path(path).parent == Path(mounts["secrets"]) and Path(path).name in secret


def test_placeholder_token_loads_and_matches_no_token(tmp_path: Path) -> None:
    secret = base_resources()[("Secret", "retd-secrets")]["stringData"]
    assert "PLACEHOLDER" in secret["tokens.txt"]
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(secret["tokens.txt"])
    store = TokenStore(tokens)  # the server's own loader: it would start with this file
    assert len(store) == 1
    for guess in ("", "PLACEHOLDER", "0" * 64, "sha256:" + "0" * 64):
        assert not store.accepts(f"Bearer {guess}")


def test_services_hpa_and_pdb_select_the_pods() -> None:
    docs = base_resources()
    deployment = docs[("Deployment", "retd")]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert "replicas" not in deployment["spec"]  # the HPA owns the count
    grpc_port = {p["name"]: p["containerPort"] for p in container(deployment)["ports"]}["grpc"]
    headless = docs[("Service", "retd-headless")]["spec"]
    cluster = docs[("Service", "retd")]["spec"]
    assert headless["clusterIP"] == "None" and cluster["type"] == "ClusterIP"
    for spec in (headless, cluster):
        assert spec["selector"].items() <= labels.items()
        (grpc,) = [p for p in spec["ports"] if p["name"] == "grpc"]
        assert grpc["port"] == grpc_port and grpc["targetPort"] == "grpc"
    hpa = docs[("HorizontalPodAutoscaler", "retd")]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "retd"}
    assert 2 <= hpa["minReplicas"] < hpa["maxReplicas"]
    assert container(deployment)["resources"]["requests"]["cpu"]  # utilisation needs requests
    assert "retd_queue_depth" in (BASE / "hpa.yaml").read_text()  # the better signal, noted
    pdb = docs[("PodDisruptionBudget", "retd")]["spec"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["maxUnavailable"] < hpa["minReplicas"]


def test_gpu_overlay_asks_for_a_gpu_and_runs_on_cuda(tmp_path: Path, checkpoint: Path) -> None:
    deployment = gpu_deployment()
    retd = container(deployment)
    assert retd["resources"]["limits"]["nvidia.com/gpu"] == 1
    config = server_config(tmp_path, checkpoint, retd["args"])
    assert config.model_defaults.device == "cuda" and config.models[0].settings.device == "cuda"
    # The rest of the base pod is kept: probes, mounts, the preStop sleep.
    base = container(base_resources()[("Deployment", "retd")])
    for key in ("startupProbe", "readinessProbe", "livenessProbe", "volumeMounts", "lifecycle"):
        assert retd[key] == base[key], key
    image = kustomization(GPU)["images"][0]
    assert image["name"] == retd["image"] and image["newTag"].endswith("-cuda")


# ---- the image --------------------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            instructions.append((word.upper(), rest.strip()))
    return instructions


def exec_form(arguments: str) -> list[str]:
    value = json.loads(arguments)
    assert isinstance(value, list)
    return [str(v) for v in value]


def test_dockerfile_copies_what_exists_and_is_not_ignored() -> None:
    ignored = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    stages = [args for word, args in dockerfile() if word == "FROM"]
    assert len(stages) == 2, "build and runtime stages"
    copied = []
    for word, args in dockerfile():
        if word == "COPY" and not args.startswith("--from"):
            copied += shlex.split(args)[:-1]
    for source in copied:
        assert (REPO / source).exists(), source
        assert not any(Path(source).match(pattern) for pattern in ignored), source
    needed = {"pyproject.toml", "README.md", "constraints.txt", "protos", "client", "server"}
    assert needed | {"model"} <= set(copied)
    for path in (".venv", "build", ".git", "tests"):
        assert path in ignored


def test_dockerfile_runs_retd_as_a_non_root_user(checkpoint: Path) -> None:
    instructions = dict(dockerfile())  # the last of each instruction: the runtime stage's
    user = instructions["USER"].split(":")[0]
    assert user.isdigit() and int(user) != 0
    deployment = base_resources()[("Deployment", "retd")]
    assert pod_spec(deployment)["securityContext"]["runAsUser"] == int(user)
    assert {int(p) for p in instructions["EXPOSE"].split()} == {
        DEFAULT_PORT,
        ServerConfig().telemetry.metrics_port,
    }
    entrypoint = exec_form(instructions["ENTRYPOINT"])
    assert entrypoint == ["retd", "serve", "--host", "0.0.0.0"]
    check = instructions["HEALTHCHECK"].split(" CMD ", 1)[1]
    command = exec_form(check)
    assert command[0] == "retd"
    args = build_parser().parse_args(command[1:])  # the client CLI's own parser
    assert args.command == "health" and args.target == f"127.0.0.1:{DEFAULT_PORT}"
    # A CPU image by default (torch from the CPU wheel index), CUDA by build arg.
    assert "ARG VARIANT=cpu" in (REPO / "Dockerfile").read_text()
    runs = [args for word, args in dockerfile() if word == "RUN"]
    assert any("/whl/cpu" in run and "cuda)" in run for run in runs)
