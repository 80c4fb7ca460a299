"""gRPC optimizer registry server.

Layers, one concept per module:

- :mod:`~service.registry.errors` — domain errors (no gRPC);
- :mod:`~service.registry.blobs` — content-addressed artifact files (sha256, temp + fsync + rename);
- :mod:`~service.registry.schema` — tables and records;
- :mod:`~service.registry.storage` — metadata transactions in SQLAlchemy (SQLite WAL or PostgreSQL);
- :mod:`~service.registry.handlers` — the plain-Python operations (publish, fetch, aliases, watch);
- :mod:`~service.registry.servicer` — thin gRPC servicer + the error→status table;
- :mod:`~service.registry.auth` — bearer-token interceptor;
- :mod:`~service.registry.server` — ``create_server(...) -> (server, port)``, TLS, health,
  reflection, graceful SIGTERM stop.

Quick start (in-process, port 0)::

    from service.registry.server import create_server
    server, port = create_server("/tmp/registry-data", host="127.0.0.1", port=0)
    server.start()
    ...
    server.stop(grace=1).wait()
"""
