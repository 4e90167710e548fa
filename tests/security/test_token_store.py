"""`TokenStore.accepts` and `TokenStore`'s file checks, property-based: no process."""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from retd.server.security import SecurityError, TokenStore

# --- TokenStore.accepts, property-based ----------------------------------------------------

# Characters a token line may hold: no whitespace or line breaks (str.splitlines and strip
# treat many code points as such), no surrogates (not UTF-8 encodable).
TOKEN_CHARS = st.characters(
    blacklist_categories=("Cc", "Cs", "Zs", "Zl", "Zp"),
    blacklist_characters="\x1c\x1d\x1e\x1f\x85",
)
TOKENS = st.text(TOKEN_CHARS, min_size=1, max_size=40).filter(
    lambda t: not t.startswith(("#", "sha256:"))
)


def store_of(plain: list[str], hashed: list[str]) -> TokenStore:
    lines = ["# tokens", *plain, ""]
    lines += [f"sha256:{hashlib.sha256(t.encode()).hexdigest()}" for t in hashed]
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "tokens.txt"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return TokenStore(path)


FIXED = store_of(["fixed-plain-token"], ["fixed-hashed-token"])


@given(st.text())
def test_random_authorization_values_are_refused(value: str) -> None:
    assume(value.strip() not in ("fixed-plain-token", "fixed-hashed-token"))
    for candidate in (value, f"Bearer {value}", f"bearer {value}", f"Bearer  {value} "):
        assert not FIXED.accepts(candidate), candidate
    assert FIXED.accepts("Bearer fixed-plain-token")  # the store does accept its own
    assert FIXED.accepts("Bearer fixed-hashed-token")


@settings(suppress_health_check=[HealthCheck.too_slow], max_examples=150)
@given(
    st.lists(TOKENS, min_size=1, max_size=5, unique=True),
    st.lists(TOKENS, min_size=0, max_size=5, unique=True),
    st.lists(TOKENS, min_size=1, max_size=10),
)
def test_only_exact_accepted_tokens_pass(
    plain: list[str], hashed: list[str], others: list[str]
) -> None:
    store = store_of(plain, hashed)
    accepted_tokens = set(plain) | set(hashed)
    assert len(store) == len(plain) + len(hashed)
    for token in accepted_tokens:
        assert store.accepts(f"Bearer {token}"), token
        assert not store.accepts(f"Basic {token}")
        assert not store.accepts(token)
        assert not store.accepts(f"Bearer {token}x")
        assert not store.accepts(f"Bearer x{token}")
        if len(token) > 1:
            assert not store.accepts(f"Bearer {token[:-1]}") or token[:-1] in accepted_tokens
    for other in others:
        assert store.accepts(f"Bearer {other}") == (other in accepted_tokens)


def test_token_store_rejects_bad_files(tmp_path: Path) -> None:
    path = tmp_path / "tokens.txt"
    for content in ("", "# nothing\n\n  \n", "sha256:12\n", f"ok\nsha256:{'g' * 64}\n"):
        path.write_text(content)
        with pytest.raises(SecurityError, match="auth_tokens"):
            TokenStore(path)
