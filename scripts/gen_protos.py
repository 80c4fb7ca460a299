#!/usr/bin/env python3
"""Regenerate the registry's Python gRPC code from ``protos/``.

``protos/mnemosyne/registry/v1/registry.proto`` is compiled with the pinned
``grpcio-tools`` into ``mnemosyne_core/registry_client/`` (``registry_pb2.py``,
``registry_pb2.pyi``, ``registry_pb2_grpc.py``). The generated gRPC module
imports its messages by the proto's package path
(``from mnemosyne.registry.v1 import registry_pb2``), which is not a Python
package here, so that one import is rewritten to a relative import. The
rewrite is a fixed string substitution, so the output is deterministic and
``--check`` can compare bytes.

Usage::

    python scripts/gen_protos.py           # write the generated files
    python scripts/gen_protos.py --check   # exit 1 if committed files drift

Exit codes: 0 ok, 1 drift (``--check``), 2 generation failed.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PROTO = "mnemosyne/registry/v1/registry.proto"
OUT_DIR = ROOT / "mnemosyne_core" / "registry_client"
GENERATED = ("registry_pb2.py", "registry_pb2.pyi", "registry_pb2_grpc.py")
ABSOLUTE_IMPORT = "from mnemosyne.registry.v1 import registry_pb2 as"
RELATIVE_IMPORT = "from . import registry_pb2 as"
LINT_HEADER = b"# ruff: noqa\n"


def generate() -> dict[str, bytes]:
    """Compile the proto into a temporary directory; return {file name: bytes}."""
    from grpc_tools import protoc  # dev dependency only

    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            PROTO,
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {PROTO}")
        out_dir = Path(tmp) / Path(PROTO).parent
        files = {name: (out_dir / name).read_bytes() for name in GENERATED}
    grpc_code = files["registry_pb2_grpc.py"].decode()
    if ABSOLUTE_IMPORT not in grpc_code:
        raise RuntimeError("generated gRPC module no longer has the expected import; update gen_protos.py")
    files["registry_pb2_grpc.py"] = grpc_code.replace(ABSOLUTE_IMPORT, RELATIVE_IMPORT).encode()
    # Generated code follows protoc's style, not ours: keep linters off it.
    return {name: LINT_HEADER + data for name, data in files.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if committed code differs")
    args = parser.parse_args(argv)
    try:
        files = generate()
    except Exception as exc:  # noqa: BLE001 - one readable line for make/CI
        print(f"gen_protos: error: {exc}", file=sys.stderr)
        return 2
    if args.check:
        drifted = [n for n, data in files.items() if not (OUT_DIR / n).exists() or (OUT_DIR / n).read_bytes() != data]
        if drifted:
            print(
                f"gen_protos: generated code is out of date: {', '.join(drifted)}; run `make protos`",
                file=sys.stderr,
            )
            return 1
        print("gen_protos: generated code is up to date")
        return 0
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        path = OUT_DIR / name
        if not path.exists() or path.read_bytes() != data:
            path.write_bytes(data)
            print(f"gen_protos: wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
