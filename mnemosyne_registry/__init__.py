"""Registry client: publish, fetch and hot-swap optimizers served over gRPC.

Only imported on demand (``mnemosyne_core.load("grpc://...")`` or an explicit
import), so ``import mnemosyne_core`` never pulls in gRPC. Names resolve
lazily: parsing URIs and the error classes need no gRPC either.

>>> from mnemosyne_registry import parse_uri
>>> parse_uri("grpc://127.0.0.1:50051/mnemosyne@best").alias
'best'

Loading by URI (the token, when the server wants one, comes from
``MNEMOSYNE_REGISTRY_TOKEN``)::

    theta, config, metadata = load_uri("grpc://127.0.0.1:50051/mnemosyne-digits@best")

Hot-swapping a newer version into a running jitted loop (no recompilation:
θ lives in the optimizer state, so only array values change)::

    import threading
    from mnemosyne_registry import RegistryClient, swap_theta

    client = RegistryClient("grpc://127.0.0.1:50051")
    theta, config, _ = client.fetch_theta("mnemosyne-digits", "production")
    tx = mnemosyne(theta, config)
    opt_state = tx.init(params)
    step = jax.jit(train_step)                  # train_step(params, opt_state, batch)

    pending = []                                # filled by the watcher thread
    def follow():
        for event in client.watch("mnemosyne-digits", "production"):
            if not event.deleted:
                pending.append(client.fetch_theta("mnemosyne-digits", event.version, like=opt_state)[0])
    threading.Thread(target=follow, daemon=True).start()

    for batch in batches:
        if pending:
            opt_state = swap_theta(opt_state, pending.pop())   # version k+1, same compiled step
        params, opt_state = step(params, opt_state, batch)

``fetch_theta(..., like=opt_state)`` refuses (``IncompatibleVersionError``) a
version whose θ tree, shapes or dtypes differ, before anything is swapped.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "RegistryClient": ".client",
    "AliasWatch": ".client",
    "verify": ".artifacts",
    "RegistryClientError": ".errors",
    "IntegrityError": ".errors",
    "IncompatibleVersionError": ".errors",
    "InvalidURIError": ".errors",
    "RegistryURI": ".uri",
    "parse_uri": ".uri",
    "parse_ref": ".uri",
    "swap_theta": ".hotswap",
    "find_theta": ".hotswap",
    "check_swappable": ".hotswap",
}
__all__ = [
    "AliasWatch", "IncompatibleVersionError", "IntegrityError", "InvalidURIError", "RegistryClient",
    "RegistryClientError", "RegistryURI", "check_swappable", "find_theta", "load_uri", "parse_ref",
    "parse_uri", "swap_theta", "verify",
]


def load_uri(uri: str, *, token: str | None = None, tls_ca: Any = None, like: Any = None):
    """Load ``grpc://HOST:PORT/NAME@ALIAS`` (or ``:VERSION``) -> ``(theta, config, metadata)``.

    Downloads the artifact, verifies its sha256 and its compatibility record,
    and returns exactly what ``mnemosyne_core.checkpoint.load(path)`` returns.
    ``like`` (a running optimizer state or θ) additionally refuses a version
    that would not hot-swap into it.
    """
    from .client import RegistryClient
    from .uri import parse_uri

    parsed = parse_uri(uri)
    with RegistryClient(f"{parsed.scheme}://{parsed.target}", token=token, tls_ca=tls_ca) as client:
        return client.fetch_theta(parsed.name, parsed.version or parsed.alias, like=like)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value
