"""The evalstream server: gRPC servicer, ingest, store, exporter; ``engine`` is the pure metric library."""

if __name__ != "evalstream.service":  # pragma: no cover - only a wrong sys.path gets here
    raise ImportError(
        f"this folder is the package evalstream.service; import it by that name, not as {__name__!r} "
        "(install the project with `pip install -e .`, or run `make test`)"
    )
