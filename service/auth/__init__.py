"""Transport security and bearer-token authorization for the gRPC port and /metrics.

Everything here is off unless configured, so the embedded quick start on loopback needs no
certificates or tokens. Turning it on is a matter of file paths in the settings (TLS, mutual TLS,
token files) or token environment variables; see docs/security.md. One module per concern:

- ``config``: the security settings (``SecurityConfig``) and their error (``SecurityConfigError``);
- ``tls``: the gRPC port's (mutual) TLS credentials, and the warning for an exposed plaintext port;
- ``metrics_tls``: the /metrics endpoint's (mutual) TLS;
- ``tokens``: full and read-only bearer tokens, held as digests, files re-read when they change;
- ``interceptor``: the server interceptor that admits, refuses or limits each call by its token.

Clients build their credentials with ``evalstream.client.transport``; nothing here is for them.
"""

from __future__ import annotations

import logging

from evalstream.service.auth.config import SecurityConfig, SecurityConfigError
from evalstream.service.auth.interceptor import (
    OPEN_METHOD_PREFIXES,
    READ_ONLY_METHODS,
    BearerTokenInterceptor,
    interceptors,
)
from evalstream.service.auth.metrics_tls import metrics_tls_options
from evalstream.service.auth.tls import is_loopback, server_credentials, warn_if_exposed
from evalstream.service.auth.tokens import (
    ENV_READ_ONLY_TOKENS,
    ENV_TOKENS,
    MIN_TOKEN_LENGTH,
    Role,
    TokenStore,
    parse_tokens,
)

# The parent of every auth module's logger: one name to filter or raise the level of.
log = logging.getLogger(__name__)

__all__ = [
    "ENV_READ_ONLY_TOKENS",
    "ENV_TOKENS",
    "MIN_TOKEN_LENGTH",
    "OPEN_METHOD_PREFIXES",
    "READ_ONLY_METHODS",
    "BearerTokenInterceptor",
    "Role",
    "SecurityConfig",
    "SecurityConfigError",
    "TokenStore",
    "interceptors",
    "is_loopback",
    "metrics_tls_options",
    "parse_tokens",
    "server_credentials",
    "warn_if_exposed",
]
