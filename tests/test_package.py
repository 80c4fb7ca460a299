"""Package-level guarantees: layering, the flat API, the console command."""
from __future__ import annotations

import json
import pkgutil
import subprocess
import sys

import mnemosyne_core
from service import cli

FORBIDDEN = ("ray", "grpc", "google", "mnemosyne_registry", "workers", "service")


def _core_modules() -> list[str]:
    names = ["mnemosyne_core"]
    for info in pkgutil.walk_packages(mnemosyne_core.__path__, "mnemosyne_core."):
        names.append(info.name)
    return names


def test_core_never_imports_ray_grpc_the_registry_client_workers_or_service():
    modules = _core_modules()
    code = (
        "import importlib, json, sys\n"
        f"mods = {modules!r}\n"
        "failed = {}\n"
        "for m in mods:\n"
        "    try:\n"
        "        importlib.import_module(m)\n"
        "    except ModuleNotFoundError as exc:\n"
        "        failed[m] = str(exc)\n"
        f"bad = sorted(k for k in sys.modules if k.split('.')[0] in {FORBIDDEN!r})\n"
        "print(json.dumps({'bad': bad, 'failed': failed}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["bad"] == [], f"mnemosyne_core pulled in {report['bad']}"
    # Optional extras (gymnax/brax) may be absent on minimal installs; core modules must not be.
    for module, err in report["failed"].items():
        assert "mnemosyne_core" not in err, f"{module}: {err}"


def test_flat_api_names_resolve():
    missing = []
    for name in mnemosyne_core.__all__:
        try:
            getattr(mnemosyne_core, name)
        except (AttributeError, ImportError) as exc:
            missing.append(f"{name}: {exc}")
    assert missing == []


def test_unknown_attribute_is_attribute_error():
    try:
        mnemosyne_core.no_such_name  # noqa: B018
    except AttributeError as exc:
        assert "no_such_name" in str(exc)
    else:  # pragma: no cover
        raise AssertionError("expected AttributeError")


def test_cli_help_lists_commands(capsys):
    parser = cli.build_parser()
    help_text = parser.format_help()
    assert "usage: mnemosyne" in help_text
    assert cli.main([]) == 0
    assert "COMMAND" in capsys.readouterr().out


def test_cli_unknown_command_exits_nonzero():
    proc = subprocess.run(
        [sys.executable, "-m", "service.cli", "no-such-command"], capture_output=True, text=True, check=False
    )
    assert proc.returncode != 0
    assert "invalid choice" in proc.stderr


def test_exported_functions_not_shadowed_by_submodules():
    import importlib

    importlib.import_module("mnemosyne_core.mnemosyne")
    import mnemosyne_core as mn

    assert callable(mn.mnemosyne) and not isinstance(mn.mnemosyne, type(mn))
    assert mn.mnemosyne.__name__ == "mnemosyne"


def test_shipped_optimizers_are_default_lstm_robotics_and_superseded_ones_load_by_path():
    import jax
    import numpy as np
    import pytest

    import mnemosyne_core as mn
    from mnemosyne_core.pretrained import (
        SUPERSEDED_DIR,
        PretrainedError,
        available,
        load_optimizer,
        pretrained_theta,
    )

    assert available() == ["default", "lstm", "robotics"]
    superseded = {p.stem: p for p in SUPERSEDED_DIR.glob("*.msgpack")}
    assert set(superseded) == {"default_v1", "default_ceiling"}
    for name, path in sorted(superseded.items()):
        with pytest.raises(PretrainedError, match="available: default, lstm, robotics"):
            pretrained_theta(name)  # not a shipped name any more ...
        theta, config, meta = load_optimizer(str(path))  # ... but loads by path
        assert meta["source"] == str(path) and meta["generation"] > 0
        theta_mn, config_mn, _ = mn.load(path)
        assert config_mn == config
        jax.tree.map(np.testing.assert_array_equal, theta_mn, theta)
        tx = mn.mnemosyne(theta, config)  # usable as an optimizer
        params = {"w": jax.numpy.ones(3)}
        updates, _ = tx.update(params, tx.init(params), params, loss=jax.numpy.float32(1.0), total_steps=10)
        assert np.isfinite(np.asarray(updates["w"])).all()


def test_superseded_configs_still_rebuild_their_superseded_optimizers():
    # configs/superseded/NAME.toml is what produced pretrained/superseded/NAME.msgpack (default_v1's
    # config is configs/default.toml at commit 1c51e63, so only default_ceiling has one here): same
    # architecture, budget and seed.
    from mnemosyne_core import checkpoint
    from mnemosyne_core.meta.config import CONFIG_DIR, load_config
    from mnemosyne_core.meta.evaluator import learned_optimizer
    from mnemosyne_core.pretrained import SUPERSEDED_DIR

    for name in ("default_ceiling",):
        _, config, meta = checkpoint.load(SUPERSEDED_DIR / f"{name}.msgpack")
        cfg = load_config(CONFIG_DIR / "superseded" / f"{name}.toml")
        assert config == learned_optimizer(cfg).config, name
        assert (meta["generation"], meta["seed"]) == (cfg.generations, cfg.seed), name
