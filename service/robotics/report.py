"""Outputs of a policy-training run: Orbax policy checkpoint, summary.json, PNG.

Example:
    >>> import tempfile, pathlib
    >>> from service.robotics.train import EvalPoint
    >>> out = pathlib.Path(tempfile.mkdtemp())
    >>> points = [EvalPoint(0, 0, 10.0, float("nan")), EvalPoint(5, 640, 30.0, 0.1)]
    >>> summary = write_summary(out, env="gymnax_cartpole", optimizer={"spec": "adam:1e-3"},
    ...                         seed=0, history=points, diverged=False)
    >>> summary["final_return"], summary["env_steps"]
    (30.0, 640)
"""
from __future__ import annotations

import json
import math
import pathlib
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from service.robotics.train import EvalPoint


def save_policy(out_dir: pathlib.Path, params: Any) -> pathlib.Path:
    """Save the policy parameters with Orbax under ``out_dir/policy``."""
    import orbax.checkpoint as ocp

    path = (out_dir / "policy").resolve()
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, jax.tree.map(np.asarray, params), force=True)
    checkpointer.wait_until_finished()
    return path


def load_policy(path: pathlib.Path, like: Any) -> Any:
    """Restore parameters saved by :func:`save_policy` into the structure of ``like``."""
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer().restore(pathlib.Path(path).resolve(), jax.tree.map(np.asarray, like))


def _num(x: float) -> float | None:
    return x if math.isfinite(x) else None  # JSON has no NaN


def write_summary(out_dir: pathlib.Path, *, env: str, optimizer: dict[str, Any], seed: int,
                  history: Sequence[EvalPoint], diverged: bool, extra: dict[str, Any] | None = None
                  ) -> dict[str, Any]:
    finite = [p for p in history if math.isfinite(p.episode_return)]
    summary = {
        "env": env,
        "optimizer": optimizer,
        "seed": seed,
        "updates": history[-1].update,
        "env_steps": history[-1].env_steps,
        "final_return": _num(finite[-1].episode_return) if finite else None,
        "best_return": max(p.episode_return for p in finite) if finite else None,
        "diverged": diverged,
        "returns": [{"update": p.update, "env_steps": p.env_steps, "return": _num(p.episode_return),
                     "train_loss": _num(p.train_loss)} for p in history],
        **(extra or {}),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def plot_returns(path: pathlib.Path, curves: dict[str, Sequence[EvalPoint]], title: str) -> pathlib.Path:
    """One line per label: greedy episode return against environment steps."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for label, points in curves.items():
        ax.plot([p.env_steps for p in points], [p.episode_return for p in points], marker=".", label=label)
    ax.set_xlabel("environment steps")
    ax.set_ylabel("episode return (greedy policy)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
