"""The committed generated code matches the proto (the same check CI runs)."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gen_protos.py"


def test_generated_code_is_up_to_date():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--check"], check=False, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr


def test_check_detects_drift(tmp_path):
    # Run the script from a copy of the tree whose proto gained a field: --check must fail.
    (tmp_path / "scripts").mkdir()
    shutil.copy(SCRIPT, tmp_path / "scripts")
    shutil.copytree(ROOT / "protos", tmp_path / "protos")
    shutil.copytree(ROOT / "mnemosyne_registry", tmp_path / "mnemosyne_registry",
                    ignore=shutil.ignore_patterns("__pycache__"))
    proto = tmp_path / "protos" / "mnemosyne" / "registry" / "v1" / "registry.proto"
    proto.write_text(proto.read_text().replace("message DeleteAliasResponse {}",
                                               "message DeleteAliasResponse { bool existed = 1; }"))
    check = [sys.executable, str(tmp_path / "scripts" / "gen_protos.py"), "--check"]
    proc = subprocess.run(check, check=False, capture_output=True, text=True)
    assert proc.returncode == 1 and "out of date" in proc.stderr and "registry_pb2.py" in proc.stderr
    # Regenerating fixes it, and the gRPC module's import is rewritten to a relative one.
    subprocess.run([sys.executable, str(tmp_path / "scripts" / "gen_protos.py")], check=True, capture_output=True)
    assert subprocess.run(check, check=False, capture_output=True).returncode == 0
    grpc_module = (tmp_path / "mnemosyne_registry" / "registry_pb2_grpc.py").read_text()
    assert "from . import registry_pb2 as" in grpc_module and "from mnemosyne.registry" not in grpc_module


def _compiled(proto: str):
    """FileDescriptorProto of one of our .proto files, compiled with protoc here."""
    from google.protobuf import descriptor_pb2
    from grpc_tools import protoc

    out = ROOT / ".cache" / f"{Path(proto).stem}.desc"
    out.parent.mkdir(exist_ok=True)
    assert protoc.main(["protoc", f"-I{ROOT / 'protos'}", f"--descriptor_set_out={out}", proto]) == 0
    return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]


def _shape(fd):
    """Package, messages (fields by number) and methods: what must match on the wire."""
    def fields(m):
        return {f.number: (f.name, f.type, f.label, f.type_name.rsplit(".", 1)[-1]) for f in m.field}
    messages = {m.name: (fields(m), {n.name: fields(n) for n in m.nested_type},
                         {e.name: [(v.name, v.number) for v in e.value] for e in m.enum_type}) for m in fd.message_type}
    methods = {(s.name, m.name): (m.input_type.rsplit(".", 1)[-1], m.output_type.rsplit(".", 1)[-1],
                                  m.client_streaming, m.server_streaming) for s in fd.service for m in s.method}
    return fd.package, messages, methods


def test_shipped_health_proto_is_the_one_grpc_serves():
    from google.protobuf import descriptor_pb2
    from grpc_health.v1 import health_pb2

    theirs = descriptor_pb2.FileDescriptorProto()
    health_pb2.DESCRIPTOR.CopyToProto(theirs)
    assert _shape(_compiled("grpc/health/v1/health.proto")) == _shape(theirs)


def test_reflection_v1_proto_matches_v1alpha_field_for_field():
    from google.protobuf import descriptor_pb2
    from grpc_reflection.v1alpha import reflection_pb2

    alpha = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(alpha)
    package, messages, methods = _shape(_compiled("grpc/reflection/v1/reflection.proto"))
    assert package == "grpc.reflection.v1" and alpha.package == "grpc.reflection.v1alpha"
    assert (messages, methods) == _shape(alpha)[1:]  # so v1alpha's code answers v1 calls
