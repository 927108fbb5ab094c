"""Full and read-only bearer tokens: parsed, held as digests, files re-read when they change.

Two token classes exist because the people who read results (dashboards, CI
gates running CompareModels) should not be able to write them: a leaked
read-only token cannot inject scores or finalize an evaluation early.

Tokens are held only as SHA-256 digests and compared with
``hmac.compare_digest`` against every configured digest without early exit, so
neither the response time nor the logs reveal which token (or how much of one)
matched. Token values are never logged. Token files are checked for changes at
most every few seconds (mounted secrets are rotated in place); a file that no
longer parses is logged and the previous tokens stay in force.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import threading
import time
from collections.abc import Mapping, Sequence
from enum import Enum
from pathlib import Path

from evalstream.service.auth.config import SecurityConfig, SecurityConfigError

log = logging.getLogger(__name__)

ENV_TOKENS = "EVALSTREAM_AUTH_TOKENS"
ENV_READ_ONLY_TOKENS = "EVALSTREAM_AUTH_READ_ONLY_TOKENS"

# RFC 6750 b64token; anything else cannot travel in an "authorization" header unchanged.
_TOKEN_SYNTAX = re.compile(r"^[A-Za-z0-9\-._~+/]+=*$")
# Short tokens are guessable; `openssl rand -hex 32` gives 64 characters.
MIN_TOKEN_LENGTH = 16
# How often a token file is checked for changes (mounted secrets are rotated in place).
_RELOAD_INTERVAL_S = 10.0


class Role(Enum):
    """What an authenticated caller may do."""

    FULL = "full"
    READ_ONLY = "read_only"


def parse_tokens(text: str, source: str, *, separators: str = r"\n") -> list[str]:
    """Tokens from a file's text (one a line) or an environment variable (commas or whitespace).

    Blank lines and ``#`` comments are ignored. Malformed or short tokens are an
    error naming the source and line, never echoing the token.
    """
    tokens: list[str] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        content = line.split("#", 1)[0]
        for token in re.split(separators, content):
            token = token.strip()
            if not token:
                continue
            if not _TOKEN_SYNTAX.match(token):
                raise SecurityConfigError(
                    f"{source} line {lineno}: a token may contain only letters, digits and -._~+/ "
                    "(trailing = allowed), one token a line"
                )
            if len(token) < MIN_TOKEN_LENGTH:
                raise SecurityConfigError(
                    f"{source} line {lineno}: token shorter than {MIN_TOKEN_LENGTH} characters; "
                    "generate one with `openssl rand -hex 32`"
                )
            tokens.append(token)
    return tokens


def _digest(token: str | bytes) -> bytes:
    # Equal-length digests make compare_digest's time independent of the presented token's length.
    return hashlib.sha256(token.encode() if isinstance(token, str) else token).digest()


class _TokenSource:
    """One class of tokens (full or read-only): a file, re-read when it changes, plus environment tokens."""

    def __init__(self, path: Path | None, env_text: str, env_name: str) -> None:
        self._path = path
        self._env_digests = [_digest(t) for t in parse_tokens(env_text, env_name, separators=r"[\s,]+")]
        self._file_digests: list[bytes] = []
        self._stamp: tuple[int, int] | None = None
        self._checked_at = 0.0
        self._lock = threading.Lock()
        if path is not None:
            self._load(initial=True)

    @property
    def configured(self) -> bool:
        return self._path is not None or bool(self._env_digests)

    def _read_file(self, path: Path) -> tuple[tuple[int, int], list[bytes]] | None:
        """(stamp, digests) of the token file, or None when it has not changed since the last read."""
        try:
            st = path.stat()
            stamp = (st.st_mtime_ns, st.st_size)
            if stamp == self._stamp:
                return None
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise SecurityConfigError(f"token file {path}: cannot read: {e.strerror or e}") from e
        except UnicodeDecodeError as e:
            raise SecurityConfigError(f"token file {path}: not UTF-8 text") from e
        return stamp, [_digest(t) for t in parse_tokens(text, f"token file {path}")]

    def _load(self, *, initial: bool) -> None:
        assert self._path is not None
        try:
            loaded = self._read_file(self._path)
        except SecurityConfigError as e:
            if initial:
                raise
            log.error("%s; keeping the previous tokens", e)
            return
        if loaded is None:
            return
        stamp, digests = loaded
        self._file_digests, self._stamp = digests, stamp
        if not initial:
            log.info("token file %s reloaded: %d tokens", self._path, len(digests))

    def digests(self) -> list[bytes]:
        """Current digests; re-stats the file at most every few seconds."""
        if self._path is not None:
            now = time.monotonic()
            if now - self._checked_at >= _RELOAD_INTERVAL_S:
                with self._lock:
                    if now - self._checked_at >= _RELOAD_INTERVAL_S:
                        self._checked_at = now
                        self._load(initial=self._stamp is None)
        return self._env_digests + self._file_digests


def _matches(presented: bytes, digests: Sequence[bytes]) -> bool:
    found = False
    for d in digests:  # no early exit: every configured token is compared
        found |= hmac.compare_digest(presented, d)
    return found


class TokenStore:
    """Full and read-only tokens; answers which role a presented token has."""

    def __init__(self, full: _TokenSource, read_only: _TokenSource) -> None:
        self._full = full
        self._read_only = read_only
        both = set(full.digests()) & set(read_only.digests())
        if both:
            raise SecurityConfigError(
                f"{len(both)} token(s) appear both as full and as read-only tokens; each token needs one role"
            )

    @classmethod
    def from_settings(cls, settings: object, environ: Mapping[str, str] | None = None) -> TokenStore | None:
        """The configured tokens, or None when token authentication is off."""
        cfg = SecurityConfig.from_settings(settings)
        env = os.environ if environ is None else environ
        full = _TokenSource(cfg.auth_tokens_file, env.get(ENV_TOKENS, ""), ENV_TOKENS)
        read_only = _TokenSource(
            cfg.auth_read_only_tokens_file, env.get(ENV_READ_ONLY_TOKENS, ""), ENV_READ_ONLY_TOKENS
        )
        if not full.configured and not read_only.configured:
            return None
        if not full.configured:
            log.warning("only read-only tokens are configured: no client can stream or finalize evaluations")
        return cls(full, read_only)

    def role(self, token: str) -> Role | None:
        presented = _digest(token)
        is_full = _matches(presented, self._full.digests())
        is_read_only = _matches(presented, self._read_only.digests())
        if is_full:
            return Role.FULL
        return Role.READ_ONLY if is_read_only else None
