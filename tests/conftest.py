"""Generic test set-up shared by every test module (keep it small and generic).

* The JAX persistent compilation cache is on by default (``.cache/jax`` in the
  repository, overridable from the environment): CI has 2 cores and the same
  small programs are compiled by many tests and runs.
* 64-bit mode is off, as for users: tests check float32/bfloat16 behaviour.
"""
from __future__ import annotations

import os
import pathlib

_REPO = pathlib.Path(__file__).resolve().parents[1]

# Must be set before jax is imported anywhere (jax reads them at import).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(_REPO / ".cache" / "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
os.environ["JAX_ENABLE_X64"] = "0"

import jax

jax.config.update("jax_enable_x64", False)
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
