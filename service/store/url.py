"""Which store a server opens, from the ``store_url`` setting.

Empty (the default) or ``sqlite:///DIR`` is the embedded SQLite store: one
process, files under ``data_dir`` (or DIR). ``postgresql://USER@HOST:PORT/DB``
(libpq's URL, ``postgres://`` too) is the shared store that lets several
stateless replicas serve the same evaluations. The scheme is checked when the
settings load, so a typo fails at start with the choices named, not at the
first write.
"""

from __future__ import annotations

from pathlib import Path

from evalstream.service.store.base import Store, StorePolicy

SQLITE = "sqlite"
POSTGRESQL = "postgresql"
SCHEMES = {"sqlite": SQLITE, "postgresql": POSTGRESQL, "postgres": POSTGRESQL}


def store_kind(url: str) -> str:
    """``sqlite`` or ``postgresql`` for a store URL; ValueError naming the accepted forms otherwise."""
    if not url:
        return SQLITE
    scheme, sep, _ = url.partition(":")
    if not sep or scheme.lower() not in SCHEMES:
        raise ValueError(
            f"store_url {url!r} is not a store URL: use sqlite:///DIR (the embedded default; empty means "
            "data_dir) or postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE for replicas sharing PostgreSQL"
        )
    return SCHEMES[scheme.lower()]


def sqlite_dir(url: str, data_dir: str) -> Path:
    """The SQLite store's directory: ``sqlite:///var/lib/x`` is /var/lib/x (an empty host, then the
    path), ``sqlite:rel/dir`` a relative one; an empty URL is data_dir."""
    if not url:
        return Path(data_dir)
    rest = url.partition(":")[2]
    if rest.startswith("//"):
        rest = rest[2:]
    if rest.startswith("//"):
        rest = "/" + rest.lstrip("/")
    return Path(rest or data_dir)


def redacted(url: str) -> str:
    """The URL without its password, for logs."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if not sep or not at or ":" not in userinfo:
        return url
    return f"{scheme}://{userinfo.split(':', 1)[0]}:***@{host}"


def open_store(
    url: str, data_dir: str, synchronous: str, policy: StorePolicy, claim_s: float, shard_lease_s: float = 5.0
) -> Store:
    """Open (and migrate) the store ``url`` names (``claim_s``: a PostgreSQL finalizer claim's life;
    ``shard_lease_s``: a PostgreSQL stream's hold on its rank)."""
    if store_kind(url) == POSTGRESQL:
        from evalstream.service.store.postgres import PostgresStore  # psycopg only when used

        return PostgresStore(url, policy=policy, claim_s=claim_s, shard_lease_s=shard_lease_s)
    from evalstream.service.store.sqlite import SqliteStore

    return SqliteStore(sqlite_dir(url, data_dir), synchronous, policy=policy)
