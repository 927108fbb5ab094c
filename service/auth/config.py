"""The security settings, taken from whatever settings object the server uses, and their error."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path


class SecurityConfigError(ValueError):
    """The security settings are inconsistent or point at unusable files; raised at startup."""


@dataclass(frozen=True)
class SecurityConfig:
    """The security-related settings, read from whatever settings object the server uses.

    Empty strings count as unset so that environment variables can clear a value
    set in a config file.
    """

    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = None
    auth_tokens_file: Path | None = None
    auth_read_only_tokens_file: Path | None = None
    metrics_tls_cert_file: Path | None = None
    metrics_tls_key_file: Path | None = None
    metrics_tls_client_ca_file: Path | None = None

    @classmethod
    def from_settings(cls, settings: object) -> SecurityConfig:
        """Take the fields this package knows from ``settings``; missing attributes mean unset."""
        if isinstance(settings, SecurityConfig):
            return settings
        values: dict[str, Path | None] = {}
        for f in fields(cls):
            raw = getattr(settings, f.name, None)
            values[f.name] = Path(os.fspath(raw)).expanduser() if raw not in (None, "") else None
        return cls(**values)

    @property
    def tls(self) -> bool:
        return self.tls_cert_file is not None


def read_file(path: Path, setting: str) -> bytes:
    """A configured file's bytes; an unreadable one is an error naming its setting, at startup."""
    try:
        return path.read_bytes()
    except OSError as e:
        raise SecurityConfigError(f"{setting}: cannot read {path}: {e.strerror or e}") from e
