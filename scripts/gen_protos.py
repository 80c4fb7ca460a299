#!/usr/bin/env python3
"""Regenerate the registry's Python gRPC code from ``protos/``.

``protos/mnemosyne/registry/v1/registry.proto`` is compiled with the pinned
``grpcio-tools`` into ``mnemosyne_registry/`` (``registry_pb2.py``,
``registry_pb2.pyi``, ``registry_pb2_grpc.py``), and the standard
``protos/grpc/reflection/v1/reflection.proto`` into
``service/registry/reflection_v1/`` (:data:`TARGETS`). A generated gRPC module
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
import dataclasses
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
LINT_HEADER = b"# ruff: noqa\n"


@dataclasses.dataclass(frozen=True)
class Target:
    """One .proto compiled into one Python package directory."""

    proto: str       # path under protos/
    out_dir: Path    # where the generated modules go
    stem: str        # e.g. "registry" -> registry_pb2.py, registry_pb2.pyi, registry_pb2_grpc.py

    @property
    def generated(self) -> tuple[str, ...]:
        return (f"{self.stem}_pb2.py", f"{self.stem}_pb2.pyi", f"{self.stem}_pb2_grpc.py")


TARGETS = (
    Target("mnemosyne/registry/v1/registry.proto", ROOT / "mnemosyne_registry", "registry"),
    # grpcio-reflection implements only v1alpha; the server answers v1 with it (same messages).
    Target("grpc/reflection/v1/reflection.proto", ROOT / "service" / "registry" / "reflection_v1", "reflection"),
)
# protos/grpc/health/v1/health.proto is shipped for other languages only: Python uses
# grpcio-health-checking's code, and tests/test_registry_protos.py checks the two agree.


def _compile(target: Target) -> dict[str, bytes]:
    from grpc_tools import protoc  # dev dependency only

    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            target.proto,
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {target.proto}")
        out_dir = Path(tmp) / Path(target.proto).parent
        files = {name: (out_dir / name).read_bytes() for name in target.generated}
    # The gRPC module imports its messages by the proto's package path, which is not a
    # Python package here: rewrite that one import to a relative one.
    package = ".".join(Path(target.proto).parent.parts)
    absolute = f"from {package} import {target.stem}_pb2 as"
    grpc_name = f"{target.stem}_pb2_grpc.py"
    grpc_code = files[grpc_name].decode()
    if absolute not in grpc_code:
        raise RuntimeError(f"generated {grpc_name} no longer has the expected import; update gen_protos.py")
    files[grpc_name] = grpc_code.replace(absolute, f"from . import {target.stem}_pb2 as").encode()
    # Generated code follows protoc's style, not ours: keep linters off it.
    return {name: LINT_HEADER + data for name, data in files.items()}


def generate() -> dict[Path, bytes]:
    """Compile every target; return {output path: bytes}."""
    out: dict[Path, bytes] = {}
    for target in TARGETS:
        for name, data in _compile(target).items():
            out[target.out_dir / name] = data
    return out


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
        drifted = [str(p.relative_to(ROOT)) for p, data in files.items() if not p.exists() or p.read_bytes() != data]
        if drifted:
            print(
                f"gen_protos: generated code is out of date: {', '.join(drifted)}; run `make protos`",
                file=sys.stderr,
            )
            return 1
        print("gen_protos: generated code is up to date")
        return 0
    for path, data in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.read_bytes() != data:
            path.write_bytes(data)
            print(f"gen_protos: wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
