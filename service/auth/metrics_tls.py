"""TLS or mutual TLS for the Prometheus /metrics endpoint, as ``start_http_server`` takes it."""

from __future__ import annotations

from typing import Any

from evalstream.service.auth.config import SecurityConfig, SecurityConfigError, read_file


def metrics_tls_options(settings: object) -> dict[str, Any]:
    """Keyword arguments for ``prometheus_client.start_http_server`` to serve /metrics over (m)TLS.

    Empty when ``metrics_tls_cert_file`` is unset (plain HTTP, typically on an
    address only the scraper can reach).
    """
    cfg = SecurityConfig.from_settings(settings)
    if cfg.metrics_tls_cert_file is None and cfg.metrics_tls_key_file is None:
        if cfg.metrics_tls_client_ca_file is not None:
            raise SecurityConfigError(
                "metrics_tls_client_ca_file needs metrics_tls_cert_file and metrics_tls_key_file"
            )
        return {}
    if cfg.metrics_tls_cert_file is None or cfg.metrics_tls_key_file is None:
        raise SecurityConfigError("metrics TLS needs both metrics_tls_cert_file and metrics_tls_key_file")
    for name in ("metrics_tls_cert_file", "metrics_tls_key_file", "metrics_tls_client_ca_file"):
        path = getattr(cfg, name)
        if path is not None:
            read_file(path, name)  # fail at startup with the setting's name, not deep inside ssl
    options: dict[str, Any] = {
        "certfile": str(cfg.metrics_tls_cert_file),
        "keyfile": str(cfg.metrics_tls_key_file),
    }
    if cfg.metrics_tls_client_ca_file is not None:
        options["client_cafile"] = str(cfg.metrics_tls_client_ca_file)
        options["client_auth_required"] = True
    return options
