"""The thin client never needs torch, nor the server or model packages."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["torch"] = None  # any `import torch` now raises ImportError
    import numpy as np
    import retd.client
    from retd.client import AsyncClient, Client, cli
    from retd.client.convert import to_embedding

    assert to_embedding(np.zeros(768)).raw.shape == [768]
    with Client("127.0.0.1:1", timeout=0.5) as client:
        try:
            client.health()
        except retd.client.UnavailableError:
            pass
    parser = cli.build_parser()
    assert parser.parse_args(["decode", "[1.0]"]).embedding == "[1.0]"
    assert sys.modules["torch"] is None
    loaded = sorted(m for m in sys.modules if m.startswith(("retd.server", "retd.model")))
    assert not loaded, loaded
    print("ok")
    """
)


def test_client_imports_and_works_without_torch():
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_server_command_without_server_deps_says_what_to_install():
    script = textwrap.dedent(
        """
        import sys
        sys.modules["torch"] = None
        sys.modules["retd.server.cli"] = None
        from retd.client.cli import main
        sys.exit(main(["serve", "--help"]))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    assert "retd[server]" in done.stderr and "`make venv`" in done.stderr
    assert "pip install" not in done.stderr  # retd is not on the package index


def test_decode_text_without_the_encoder_names_the_make_target():
    """`retd decode --text` with no encoder installed says to run `make encoder`, never a
    `pip install 'retd[encoder]'` (retd is not on the package index)."""
    script = textwrap.dedent(
        """
        import sys
        sys.modules["retd.model.encoder"] = None
        from retd.client.cli import main
        sys.exit(main(["decode", "--text", "A cat sat on the mat."]))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    assert "run `make encoder`" in done.stderr and "pip install" not in done.stderr


def test_the_encoder_without_transformers_names_the_make_target(tmp_path):
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["transformers"] = None
        from retd.model.encoder import EncoderError, SentenceEncoder
        try:
            SentenceEncoder({str(tmp_path)!r})
        except EncoderError as err:
            print(err)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "run `make encoder`" in done.stdout and "pip install" not in done.stdout
