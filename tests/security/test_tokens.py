"""Token parsing, roles and file reloading, without a server."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from evalstream.service import auth
from evalstream.service.auth import tokens as auth_tokens
from evalstream.service.settings import Settings
from tests.security.conftest import FULL_TOKEN, READ_ONLY_TOKEN


def test_parse_ignores_blank_lines_and_comments() -> None:
    text = f"# header\n\n  {FULL_TOKEN}  \n{READ_ONLY_TOKEN} # trailing comment\n   # indented comment\n"
    assert auth.parse_tokens(text, "f") == [FULL_TOKEN, READ_ONLY_TOKEN]


def test_parse_env_accepts_commas_and_whitespace() -> None:
    text = f"{FULL_TOKEN}, {READ_ONLY_TOKEN}\n"
    assert auth.parse_tokens(text, "ENV", separators=r"[\s,]+") == [FULL_TOKEN, READ_ONLY_TOKEN]


def test_parse_rejects_short_token_without_echoing_it() -> None:
    with pytest.raises(auth.SecurityConfigError, match=r"f line 2: token shorter than 16") as info:
        auth.parse_tokens("# ok\nhunter2\n", "f")
    assert "hunter2" not in str(info.value)


def test_parse_rejects_two_tokens_on_one_file_line() -> None:
    with pytest.raises(auth.SecurityConfigError, match="one token a line"):
        auth.parse_tokens(f"{FULL_TOKEN} {READ_ONLY_TOKEN}\n", "f")


def test_roles_from_files_and_environment(token_files: tuple[Path, Path]) -> None:
    full, read_only = token_files
    env_token = "from-environment-0123456789abcdef"
    settings = Settings(auth_tokens_file=str(full), auth_read_only_tokens_file=str(read_only))
    store = auth.TokenStore.from_settings(settings, environ={auth.ENV_TOKENS: env_token})
    assert store is not None
    assert store.role(FULL_TOKEN) is auth.Role.FULL
    assert store.role(env_token) is auth.Role.FULL
    assert store.role(READ_ONLY_TOKEN) is auth.Role.READ_ONLY
    assert store.role(FULL_TOKEN[:-1]) is None
    assert store.role(FULL_TOKEN + "x") is None
    assert store.role("") is None


def test_environment_only_read_only_tokens() -> None:
    store = auth.TokenStore.from_settings(Settings(), environ={auth.ENV_READ_ONLY_TOKENS: READ_ONLY_TOKEN})
    assert store is not None
    assert store.role(READ_ONLY_TOKEN) is auth.Role.READ_ONLY
    assert store.role(FULL_TOKEN) is None


def test_off_when_nothing_configured() -> None:
    assert auth.TokenStore.from_settings(Settings(), environ={}) is None
    assert auth.interceptors(Settings(), environ={}) == []


def test_token_with_two_roles_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "t").write_text(FULL_TOKEN + "\n")
    with pytest.raises(auth.SecurityConfigError, match="both as full and as read-only"):
        auth.TokenStore.from_settings(
            Settings(auth_tokens_file=str(tmp_path / "t")), environ={auth.ENV_READ_ONLY_TOKENS: FULL_TOKEN}
        )


def test_missing_token_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(auth.SecurityConfigError, match="cannot read"):
        auth.interceptors(Settings(auth_tokens_file=str(tmp_path / "absent")), environ={})


def test_token_file_is_reloaded_when_it_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(auth_tokens, "_RELOAD_INTERVAL_S", 0.0)
    path = tmp_path / "tokens"
    path.write_text(FULL_TOKEN + "\n")
    store = auth.TokenStore.from_settings(Settings(auth_tokens_file=str(path)), environ={})
    assert store is not None and store.role(FULL_TOKEN) is auth.Role.FULL

    rotated = "rotated-token-0123456789abcdef0123"
    path.write_text(rotated + "\n")
    os.utime(path, ns=(1, 1))  # a different mtime even on coarse-grained filesystems
    assert store.role(rotated) is auth.Role.FULL
    assert store.role(FULL_TOKEN) is None

    # A broken rewrite keeps the previous tokens and logs why, without the file's contents.
    path.write_text("short\n")
    os.utime(path, ns=(2, 2))
    with caplog.at_level(logging.ERROR, logger=auth.log.name):
        assert store.role(rotated) is auth.Role.FULL
    assert "keeping the previous tokens" in caplog.text
    assert "short" not in caplog.text.replace("shorter", "")


def test_no_token_value_is_logged(token_files: tuple[Path, Path], caplog: pytest.LogCaptureFixture) -> None:
    full, read_only = token_files
    with caplog.at_level(logging.DEBUG):
        settings = Settings(auth_tokens_file=str(full), auth_read_only_tokens_file=str(read_only))
        auth.interceptors(settings, environ={})
        auth.warn_if_exposed(settings, "0.0.0.0:50051", environ={})
    assert FULL_TOKEN not in caplog.text and READ_ONLY_TOKEN not in caplog.text
    assert "clear text" in caplog.text


@pytest.mark.parametrize(
    ("address", "loopback"),
    [
        ("127.0.0.1:50051", True),
        ("localhost:50051", True),
        ("[::1]:50051", True),
        ("unix:/tmp/evalstream.sock", True),
        ("0.0.0.0:50051", False),
        ("[::]:50051", False),
        ("10.0.0.7:50051", False),
        ("evalstream.svc:50051", False),
    ],
)
def test_is_loopback(address: str, loopback: bool) -> None:
    assert auth.is_loopback(address) is loopback


def test_exposed_plaintext_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger=auth.log.name):
        auth.warn_if_exposed(Settings(), "127.0.0.1:50051", environ={})
        assert caplog.text == ""
        auth.warn_if_exposed(Settings(), "0.0.0.0:50051", environ={})
    assert "without TLS or bearer tokens" in caplog.text
