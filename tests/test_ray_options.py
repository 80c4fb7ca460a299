"""Ray backend options without a cluster: CLI parsing of worker resources, actor options
(resources, restarts, the JAX environment of fractional-GPU workers), option validation."""
from __future__ import annotations

import argparse

import pytest

pytest.importorskip("ray")

from service.cli import CLIError, build_parser
from service.ray_backend import BackendOptions, actor_options, parse_worker_resources
from service.ray_scheduler import SchedulePolicy


def test_worker_resources_parse():
    assert parse_worker_resources('{"TPU": 4}') == {"TPU": 4.0}
    assert parse_worker_resources(None) == {} and parse_worker_resources("") == {}
    for bad in ('{"TPU": -1}', "[4]", "TPU=4", '{"TPU": "four"}', '{"GPU": 1}', '{"TPU": true}'):
        with pytest.raises(CLIError) as info:
            parse_worker_resources(bad)
        assert info.value.code == 2 and "\n" not in str(info.value)


def test_actor_options_for_cpu_gpu_and_tpu_workers():
    cpu = actor_options(BackendOptions(workers=2, worker_cpus=2))
    assert (cpu["num_cpus"], cpu["num_gpus"]) == (2, 0) and "resources" not in cpu
    assert cpu["runtime_env"]["env_vars"] == {"JAX_PLATFORMS": "cpu"}
    # The driver re-issues tickets itself; Ray restarts actors but never replays calls.
    assert cpu["max_task_retries"] == 0 and cpu["max_restarts"] > 0

    quarter = actor_options(BackendOptions(worker_gpus=0.25))["runtime_env"]["env_vars"]
    assert quarter == {"XLA_PYTHON_CLIENT_PREALLOCATE": "false", "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.225"}
    whole = actor_options(BackendOptions(worker_gpus=1))["runtime_env"]["env_vars"]
    assert whole == {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}

    tpu = actor_options(BackendOptions(worker_resources={"TPU": 4}))
    assert tpu["resources"] == {"TPU": 4} and "JAX_PLATFORMS" not in tpu["runtime_env"]["env_vars"]


def test_actor_options_forward_the_compilation_cache_only_when_asked(monkeypatch):
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/tmp/jaxcache")
    assert "JAX_COMPILATION_CACHE_DIR" not in actor_options(BackendOptions())["runtime_env"]["env_vars"]
    env = actor_options(BackendOptions(), forward_env=True)["runtime_env"]["env_vars"]
    assert env["JAX_COMPILATION_CACHE_DIR"] == "/tmp/jaxcache"


@pytest.mark.parametrize("kwargs", [{"workers": 0}, {"worker_gpus": 1.5}, {"worker_cpus": -1},
                                    {"min_fraction": 0.0}])
def test_bad_backend_options_are_cli_errors(kwargs):
    with pytest.raises(CLIError):
        BackendOptions(**kwargs)


def test_schedule_policy_validation():
    with pytest.raises(ValueError):
        SchedulePolicy(min_fraction=1.5)
    with pytest.raises(ValueError):
        SchedulePolicy(max_attempts=0)


def test_meta_train_parser_has_every_flag_make_ray_evaluator_reads():
    parser = build_parser()
    args = parser.parse_args(["meta-train", "--config", "quick", "--out", "x", "--backend", "ray",
                              "--workers", "3", "--address", "auto", "--worker-cpus", "2",
                              "--worker-gpus", "0.5", "--worker-resources", '{"TPU": 4}'])
    assert isinstance(args, argparse.Namespace)
    assert (args.workers, args.address, args.worker_cpus, args.worker_gpus) == (3, "auto", 2.0, 0.5)
    assert parse_worker_resources(args.worker_resources) == {"TPU": 4.0}


@pytest.mark.parametrize("name", ["service.ray_backend", "service.ray_scheduler", "service.ray_local",
                                  "workers.inner_loop", "workers.wire"])
def test_docstring_examples_run(name):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0


def test_ticket_batches_round_trip_compactly_and_reject_garbage():
    from mnemosyne_core.meta.protocol import ProtocolError, Ticket
    from mnemosyne_core.tasks import TaskSpec
    from workers.wire import pack_tickets, unpack_tickets

    a, b = TaskSpec("quadratic", {"dim": 4}), TaskSpec("digits_mlp", {"hidden": [32], "activation": "relu"})
    tickets = [Ticket(5, i, (a, b)[i % 2], 60, 20, start_step=20 * (i % 3), episode=4, run_key=(1, 2))
               for i in range(64)]
    blob = pack_tickets(tickets)
    assert unpack_tickets(blob) == tickets
    assert len(blob) <= 64 * 26 + 200  # 26 B per ticket + the two specs once
    assert unpack_tickets(pack_tickets([])) == []
    with pytest.raises(ValueError):
        pack_tickets([tickets[0], Ticket(5, 99, a, 60, 20, run_key=(3, 4))])
    for bad in (blob[:-1], blob + b"x", b"\x09" + blob[1:], b""):
        with pytest.raises(ProtocolError):
            unpack_tickets(bad)
