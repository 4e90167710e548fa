"""The committed generated code of protos/ is what `make proto` produces from the .proto files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PROTOS = ("protos/retd/v1/decoder.proto", "protos/retd/v1/repository.proto")
GENERATED = tuple(
    f"{name}{suffix}"
    for name in ("decoder", "repository")
    for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
)


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("proto")
    subprocess.run(
        [
            sys.executable, "-m", "grpc_tools.protoc", "-I", "protos", f"--python_out={out}",
            f"--pyi_out={out}", f"--grpc_python_out={out}", *PROTOS,
        ],
        check=True, cwd=REPO,
    )  # fmt: skip
    return out / "retd" / "v1"


@pytest.mark.parametrize("name", GENERATED)
def test_committed_generated_code_is_fresh(regenerated: Path, name: str) -> None:
    fresh = (regenerated / name).read_bytes()
    committed = (REPO / "protos" / "retd" / "v1" / name).read_bytes()
    assert committed == fresh, (
        f"protos/retd/v1/{name} is stale: it differs from what protoc generates from "
        f"{' and '.join(PROTOS)}; run `make proto` and commit the result"
    )
