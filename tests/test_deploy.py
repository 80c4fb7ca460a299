"""deploy/ must describe things that exist: every manifest parses, every ``mnemosyne`` command in
it parses with the real CLI parser and names a real config, every resource a command asks for is
advertised by some worker group, every file the Containerfile copies is in the repo, and every
JAX/XLA/Ray environment variable is one those libraries actually read."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import pathlib
import re
import shlex

import pytest

yaml = pytest.importorskip("yaml")

from service.cli import build_parser
from service.ray_backend import parse_worker_resources

REPO = pathlib.Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
MANIFESTS = sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))
K8S_RESOURCES = {"cpu", "memory", "ephemeral-storage", "nvidia.com/gpu", "google.com/tpu"}
IMAGE_REPO = "ghcr.io/mnemosyne-ml/mnemosyne"


def _docs(path: pathlib.Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _all_docs() -> list[tuple[pathlib.Path, dict]]:
    return [(p, d) for p in MANIFESTS for d in _docs(p)]


def _walk(node, key=None):
    """Yield (key, value) for every mapping entry, depth first."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield k, v
            yield from _walk(v, k)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v, key)


def _commands() -> list[tuple[pathlib.Path, str]]:
    """``mnemosyne meta-train …`` command lines in entry points, launcher commands and comments."""
    found = []
    for path in MANIFESTS + [DEPLOY / "Containerfile"]:
        text = path.read_text()
        # Comments and `ray exec "…"` strings may continue a command with a trailing backslash.
        joined = re.sub(r"\\\n\s*#?\s*", " ", text)
        joined = re.sub(r">-?\n((?:\s{4,}.*\n?)+)", lambda m: " ".join(m.group(1).split()) + "\n", joined)
        for match in re.finditer(r"mnemosyne meta-train[^\n]*", joined):
            line = match.group(0).strip()
            if line.endswith('"') and line.count('"') % 2:  # closes a quoted `ray exec "…"` string
                line = line[:-1]
            found.append((path, line))
    return found


def _advertised_resources() -> set[str]:
    """Custom resources and GPUs that some worker group or node type offers."""
    names: set[str] = set()
    for _, doc in _all_docs():
        for key, value in _walk(doc):
            if key == "rayStartParams" and isinstance(value, dict):
                if "resources" in value:
                    names |= set(json.loads(json.loads(value["resources"])))
                if float(value.get("num-gpus", 0)) > 0:
                    names.add("GPU")
            if key == "available_node_types":
                for node in value.values():
                    names |= set(node.get("resources", {}))
    return names


def test_every_manifest_parses():
    assert {p.name for p in MANIFESTS} >= {"raycluster.yaml", "rayjob.yaml", "cluster-launcher.yaml"}
    for path in MANIFESTS:
        assert _docs(path), f"{path} is empty"


def test_commands_parse_with_the_cli_and_name_existing_configs_and_resources():
    commands = _commands()
    assert len(commands) >= 4  # RayJobs (CPU, GPU, TPU), RayCluster usage, launcher usage
    parser = build_parser()
    advertised = _advertised_resources()
    backends = set()
    for path, line in commands:
        argv = shlex.split(line)[1:]
        try:
            args = parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"{path.name}: `{line}` does not parse with the mnemosyne CLI")
        assert (REPO / "configs" / f"{args.config}.toml").is_file(), f"{path.name}: no configs/{args.config}.toml"
        backends.add(args.backend)
        if args.backend == "ray":
            assert args.address == "auto", f"{path.name}: cluster drivers join the cluster they run in"
            missing = set(parse_worker_resources(args.worker_resources)) - advertised
            assert not missing, f"{path.name}: asks for {missing}, advertised: {advertised}"
            if args.worker_gpus:
                assert "GPU" in advertised
    assert backends == {"ray"}


def test_kubernetes_objects_reference_what_exists():
    docs = _all_docs()
    by_kind: dict[str, set[str]] = {}
    for _, doc in docs:
        if "kind" in doc:
            by_kind.setdefault(doc["kind"], set()).add(doc["metadata"]["name"])
    ray_version = importlib.metadata.version("ray")
    for path, doc in docs:
        if doc.get("kind") == "PersistentVolumeClaim":
            continue  # its `resources` are storage, not container resources
        for key, value in _walk(doc):
            if key == "rayVersion":
                assert value == ray_version, f"{path.name}: rayVersion {value} ≠ locked ray {ray_version}"
            if key == "clusterSelector":
                assert value["ray.io/cluster"] in by_kind.get("RayCluster", set())
            if key == "persistentVolumeClaim":
                assert value["claimName"] in by_kind.get("PersistentVolumeClaim", set())
            if key == "resources" and isinstance(value, dict) and ("requests" in value or "limits" in value):
                for part in ("requests", "limits"):
                    unknown = set(value.get(part, {})) - K8S_RESOURCES
                    assert not unknown, f"{path.name}: unknown Kubernetes resources {unknown}"
                for accel in ("nvidia.com/gpu", "google.com/tpu"):  # extended resources: request == limit
                    assert value.get("requests", {}).get(accel) == value.get("limits", {}).get(accel)
            if key == "image":
                repo, _, tag = value.partition(":")
                assert repo == IMAGE_REPO and re.fullmatch(r"\d+\.\d+\.\d+(-gpu|-tpu)?", tag), value


def test_accelerator_groups_use_matching_images_and_resources():
    [cluster] = [d for _, d in _all_docs() if d.get("kind") == "RayCluster"]
    groups = {g["groupName"]: g for g in cluster["spec"]["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "gpu", "tpu"}
    for name, accel, suffix in (("gpu", "nvidia.com/gpu", "-gpu"), ("tpu", "google.com/tpu", "-tpu")):
        [container] = groups[name]["template"]["spec"]["containers"]
        assert container["image"].endswith(suffix)
        assert accel in container["resources"]["limits"]
    [cpu] = groups["cpu"]["template"]["spec"]["containers"]
    assert {e["name"]: e["value"] for e in cpu["env"]}["JAX_PLATFORMS"] == "cpu"


def test_environment_variables_are_read_by_jax_or_ray():
    import jax

    site = pathlib.Path(importlib.util.find_spec("jax").origin).parents[1]
    ray_auth = (site / "ray/_private/authentication/authentication_token_setup.py").read_text()
    xla_client = (site / "jaxlib/xla_client.py").read_text()
    names = set()
    for path in MANIFESTS + [DEPLOY / "Containerfile"]:
        names |= set(re.findall(r"\b((?:JAX|XLA|RAY)_[A-Z0-9_]+)\b", path.read_text()))
    names -= {"JAX_ACCELERATOR", "RAY_HEAD_IP"}  # our build arg; the launcher's own substitution
    assert "JAX_PLATFORMS" in names and "RAY_AUTH_MODE" in names
    for name in names:
        if name.startswith("JAX_"):
            assert name.lower() in jax.config.values, f"{name} is not a JAX config option"
        elif name.startswith("XLA_"):
            assert name in xla_client, f"{name} is not read by jaxlib"
        else:
            assert name in ray_auth, f"{name} is not read by Ray"


def test_containerfile_installs_from_the_lock_and_copies_existing_paths():
    text = (DEPLOY / "Containerfile").read_text()
    assert "uv sync --frozen" in text and "pip install -r" not in text
    for line in re.findall(r"^COPY (.+)$", text, re.MULTILINE):
        *sources, _dest = line.split()
        for src in sources:
            assert (REPO / src).exists(), f"Containerfile copies missing {src}"
    extras = importlib.metadata.metadata("jax").get_all("Provides-Extra")
    for accel in re.findall(r'JAX_ACCELERATOR" = "(\w+)"', text):
        assert accel in extras, f"jax has no [{accel}] extra"
    # The packages the image ships must include everything `[tool.hatch]` builds.
    assert all(f"COPY {pkg} " in text for pkg in ("mnemosyne_core", "workers", "service", "configs"))


def test_cluster_launcher_is_consistent():
    [launcher] = _docs(DEPLOY / "cluster-launcher.yaml")
    types = launcher["available_node_types"]
    assert launcher["head_node_type"] in types
    assert sum(t.get("max_workers", 0) for t in types.values()) <= launcher["max_workers"]
    images = [launcher["docker"]["image"]] + [t.get("docker", {}).get("worker_image") for t in types.values()]
    for image in filter(None, images):
        assert image.partition(":")[0] == IMAGE_REPO
