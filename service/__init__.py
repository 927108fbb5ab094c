"""The evalstream server: gRPC servicer, ingest, store, exporter; ``engine`` is the pure metric library."""
