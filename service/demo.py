"""``make demo``: the main job end to end on the embedded defaults.

1. start a local optimizer registry (``mnemosyne registry serve`` on a free port, data in ``runs/demo``);
2. meta-train a Mnemosyne optimizer with the ``quick`` config on an embedded local Ray cluster
   (``--backend ray``; ``--backend local`` with ``MNEMOSYNE_DEMO_BACKEND=local``), publishing to the registry;
3. compare, on a held-out digits MLP, its fresh θ, the briefly trained θ, the shipped ``default``
   (told the horizon and not) and its fresh θ, Adam(1e-3), tuned Adam and tuned cosine Adam on one table
   and one PNG (``runs/demo/eval``), say in a line what meta-training bought and in a sentence what each
   curve is (:mod:`service.demo_report`);
4. load the optimizer back through the registry (``grpc://…/demo@latest``), check it is bit-identical to
   the file the trainer wrote, and train a digits MLP with it for a few steps;
5. close with one line computed from step 3's measurements: which optimizer to use, and when to pass
   ``total_steps`` (:func:`service.demo_report.recommendation`).

Each step prints a heading and a sentence saying what it does.

Run it with ``python -m service.demo [--out DIR]``; it stops the registry it started (by pid) on exit.
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from service.cli import main as cli_main

LISTEN_RE = re.compile(r"listening on (grpcs?://\S+)")


def start_registry(data_dir: Path, log_path: Path) -> tuple[subprocess.Popen, str]:
    """Start ``mnemosyne registry serve`` on port 0 and return (process, grpc://host:port)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "registry", "serve", "--data", str(data_dir),
             "--host", "127.0.0.1", "--port", "0"],
            stdout=subprocess.PIPE, stderr=log, text=True,
        )
    deadline = time.monotonic() + 60
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            if proc.poll() is not None:
                raise RuntimeError(f"registry exited with {proc.returncode}; see {log_path}")
            continue
        match = LISTEN_RE.search(line)
        if match:
            return proc, match.group(1)
    proc.kill()
    raise RuntimeError(f"registry did not start within 60 s; see {log_path}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # graceful: the server drains and exits
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()


def step(title: str, what: str) -> None:
    """A step's heading and one sentence saying what it does."""
    print(f"\n=== {title} ===\n{what}", flush=True)


def run_cli(argv: list[str]) -> None:
    print("$ mnemosyne " + " ".join(argv), flush=True)
    code = cli_main(argv)
    if code:
        raise SystemExit(f"demo: `mnemosyne {' '.join(argv)}` failed with exit code {code}")


def train_with_loaded(uri: str, steps: int = 100) -> tuple[float, float]:
    """Train the digits MLP with the optimizer fetched from the registry; return (first, last) loss."""
    import jax
    import optax

    import mnemosyne_core as mn

    theta, config, _ = mn.load(uri)
    build = mn.mnemosyne if isinstance(config, mn.MnemosyneConfig) else mn.lstm_optimizer
    tx = build(theta, config)
    task = mn.make_task(mn.TaskSpec("digits_mlp", {"hidden": [64], "activation": "relu", "batch_size": 128}))
    params = task.init(jax.random.key(0))
    state = tx.init(params)

    @jax.jit
    def train_step(params, state, key):
        batch = task.sample_batch(key)
        loss, grads = jax.value_and_grad(task.loss)(params, batch)
        updates, state = tx.update(grads, state, params, loss=loss)
        return optax.apply_updates(params, updates), state, loss

    losses = []
    for key in jax.random.split(jax.random.key(1), steps):
        params, state, loss = train_step(params, state, key)
        losses.append(float(loss))
    return losses[0], losses[-1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    parser.add_argument("--backend", default=os.environ.get("MNEMOSYNE_DEMO_BACKEND", "ray"),
                        choices=("ray", "local"))
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if args.backend == "ray" and "RAY_TMPDIR" not in os.environ:
        # Unix socket paths are length-limited: keep Ray's session folder short.
        os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="mnray")

    step("1/4 Start a local optimizer registry",
         "A gRPC server that stores optimizer versions: step 2 publishes to it, step 4 loads back from it.")
    registry_proc, registry = start_registry(out / "registry", out / "registry.log")
    print(f"registry at {registry}")
    try:
        step(f"2/4 Meta-train an optimizer (config quick, backend {args.backend}) and publish it",
             "Evolution strategies tune the learned optimizer's θ on small digits MLPs; this is a short run "
             "(configs/quick.toml), far shorter than the one that produced the shipped `default`.")
        meta_dir = out / "meta"
        train_args = ["meta-train", "--config", "quick", "--out", str(meta_dir), "--seed", "0",
                      "--backend", args.backend, "--publish", f"{registry}/demo"]
        if args.backend == "ray":
            train_args += ["--workers", "2"]
        run_cli(train_args)

        step("3/4 Compare the optimizers on a network no meta-training saw",
             "Each optimizer trains a digits MLP (width 40, elu) for 1x and 2x the horizon; the table gives "
             "the mean training loss over the last 10 % of the steps (lower is better).")
        import mnemosyne_core as mn
        from service.demo_report import compare, recommendation

        theta, config, _ = mn.load(meta_dir / "optimizer.msgpack")
        results, lines = compare(theta, config, out_dir=out / "eval")
        print("\n".join(lines), flush=True)

        step("4/4 Load the optimizer back from the registry and train with it",
             "What a training job does: fetch a version by URI (sha256-verified) and use it as an optax optimizer.")
        uri = f"{registry}/demo@latest"
        run_cli(["registry", "pull", "demo@latest", "-o", str(out / "pulled.msgpack"), "--registry", registry])
        same = (out / "pulled.msgpack").read_bytes() == (meta_dir / "optimizer.msgpack").read_bytes()
        print(f"pulled artifact identical to the trained one: {same}")
        if not same:
            raise SystemExit("demo: the registry returned a different artifact")
        first, last = train_with_loaded(uri)
        print(f"digits MLP trained with {uri}: loss {first:.3f} -> {last:.3f} in 100 steps")
    finally:
        stop(registry_proc)
    print(f"\ndemo finished; outputs in {out}/")
    print(f"\n=== What to use ===\n{recommendation(results)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
