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
    shutil.copytree(ROOT / "mnemosyne_core" / "registry_client", tmp_path / "mnemosyne_core" / "registry_client",
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
    grpc_module = (tmp_path / "mnemosyne_core" / "registry_client" / "registry_pb2_grpc.py").read_text()
    assert "from . import registry_pb2 as" in grpc_module and "from mnemosyne.registry" not in grpc_module
