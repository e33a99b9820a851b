"""Issue 16, acceptance 1 (and items 1, 3, 5, 7): the cluster configs are valid as Ray and KubeRay read
them, refer to things that exist, and the RayService is generated from the Serve config."""

from __future__ import annotations

import ast
import copy
import importlib.metadata as metadata
import importlib.util
import re
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parent.parent
CLUSTER = REPO / "cluster"
KUBERAY = sorted(CLUSTER.glob("kuberay-*.yaml"))


def test_vm_cluster_config_passes_rays_own_validation():
    """What ``ray up`` does before it touches AWS: fill in the defaults, check the docker section,
    validate against Ray's cluster schema."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((CLUSTER / "vm-aws.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(config)))
    assert "REPLACE" not in (CLUSTER / "vm-aws.yaml").read_text()
    assert config["docker"]["image"].endswith("ovseg-ray:0.1.0") and config["setup_commands"] == []  # nothing per scale-up
    assert {".venv", "runs", ".git"} <= set(config["rsync_exclude"]) and config["rsync_filter"] == [".gitignore"]
    assert all("NLTK_DATA=" in command for command in config["head_start_ray_commands"][1:] + config["worker_start_ray_commands"][1:])
    assert "ray dashboard cluster/vm-aws.yaml" in (CLUSTER / "vm-aws.yaml").read_text()
    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu_worker"]["node_config_"] = {}
    with pytest.raises(Exception, match="node_config_"):
        validate_config(prepare_config(broken))


def _third_party_imports(package: Path) -> set[str]:
    """Top-level modules imported by the package's files that are neither Ray nor the standard library."""
    found = set()
    for path in package.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else [])
            found |= {name.split(".")[0] for name in names}
    return {name for name in found if name != "ray" and name not in sys.stdlib_module_names}


def _closure(requirements: list[str]) -> set[str]:
    """Every distribution that installing ``requirements`` brings, from the installed packages' metadata."""
    seen: set[str] = set()
    todo = [(Requirement(text), ()) for text in requirements]
    while todo:
        requirement, extras = todo.pop()
        if requirement.marker and not any(requirement.marker.evaluate({"extra": e}) for e in (extras or ("",))):
            continue
        name = re.sub(r"[-_.]+", "-", requirement.name).lower()
        key = (name, tuple(sorted(requirement.extras)))
        if key in seen:
            continue
        seen.add(key)
        todo += [(Requirement(text), tuple(requirement.extras)) for text in metadata.requires(name) or []]
    return {name for name, _ in seen}


def test_cluster_venv_brings_what_the_heads_autoscaler_imports():
    """Item 1: the head's autoscaler runs under the cluster's environment (this package's runtime
    dependencies plus the ``aws`` extra that cluster/Dockerfile installs, test extras excluded) and
    imports the AWS node provider's modules."""
    import ray.autoscaler._private.aws as aws

    provider = yaml.safe_load((CLUSTER / "vm-aws.yaml").read_text())["provider"]["type"]
    assert Path(aws.__file__).parent.name == provider
    needed = _third_party_imports(Path(aws.__file__).parent)
    assert {"boto3", "botocore"} <= needed
    distributions = metadata.packages_distributions()
    wanted = {re.sub(r"[-_.]+", "-", distributions[module][0]).lower() for module in needed}
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert '".[aws]"' in (CLUSTER / "Dockerfile").read_text()
    runtime = project["dependencies"] + project["optional-dependencies"]["aws"]
    missing = wanted - _closure(runtime)
    assert not missing, f"the cluster's environment lacks {missing}, which Ray's {provider} launcher imports"


def _strings(mapping: dict) -> bool:
    return isinstance(mapping, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in mapping.items())


def _check_pod_template(template: dict, where: str) -> None:
    containers = template["spec"]["containers"]
    assert containers and all(c.get("name") and c.get("image") for c in containers), where


def check_ray_cluster_spec(spec: dict, where: str) -> None:
    """The RayClusterSpec fields KubeRay's CRD requires, with their types (rayStartParams: strings only)."""
    assert isinstance(spec.get("rayVersion"), str), where
    head = spec["headGroupSpec"]
    assert _strings(head["rayStartParams"]), f"{where}: headGroupSpec.rayStartParams values must be strings"
    assert head["rayStartParams"].get("num-cpus") == "0", f"{where}: the head must not run work (item 7)"
    _check_pod_template(head["template"], f"{where}: headGroupSpec")
    for group in spec.get("workerGroupSpecs", []):
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", group["groupName"]), where
        assert all(isinstance(group[k], int) for k in ("replicas", "minReplicas", "maxReplicas")), where
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], where
        assert _strings(group["rayStartParams"]), f"{where}: {group['groupName']}.rayStartParams"
        _check_pod_template(group["template"], f"{where}: {group['groupName']}")


def _check_entrypoint(entrypoint: str, where: str) -> None:
    """The job's script and config exist in the repository, and the config loads with its command's model
    and writes only where a Ray job may (no relative output)."""
    from ovseg_ray.config import load_config
    from ovseg_ray.evaluation.batch_segment import SegmentBatchConfig
    from ovseg_ray.evaluation.benchmark import EvalConfig
    from ovseg_ray.mining.config import MiningConfig
    from ovseg_ray.training.clip_config import TrainClipConfig

    models = {"mine_pairs.py": (MiningConfig, "output"), "train_clip.py": (TrainClipConfig, "run.storage_path"),
              "evaluate.py": (EvalConfig, "out"), "segment_batch.py": (SegmentBatchConfig, "out")}
    words = entrypoint.split()
    assert words[0] == "python" and words[2] == "--config", where
    script, config = (REPO / Path(word).relative_to("/home/ray/ovseg-ray") for word in (words[1], words[3]))
    assert script.exists() and config.exists(), where
    model, output = models[script.name]
    value = load_config(model, config)
    for part in output.split("."):
        value = getattr(value, part)
    assert value.startswith("s3://"), f"{where}: {output} {value!r} would be refused inside a Ray job"


@pytest.mark.parametrize("path", KUBERAY, ids=[p.name for p in KUBERAY])
def test_kuberay_manifests_have_the_fields_kuberay_requires(path):
    """No installable package ships KubeRay's CRD schemas: the fields its API reference requires are checked."""
    manifest = yaml.safe_load(path.read_text())
    assert manifest["apiVersion"] == "ray.io/v1", path.name
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", manifest["metadata"]["name"]), path.name
    spec, kind = manifest["spec"], manifest["kind"]
    if kind == "RayCluster":
        check_ray_cluster_spec(spec, path.name)
    elif kind == "RayJob":
        assert isinstance(spec["entrypoint"], str) and spec.get("submissionMode", "K8sJobMode") in (
            "K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"), path.name
        assert _strings(spec["clusterSelector"]) or "rayClusterSpec" in spec, path.name
        assert isinstance(spec.get("activeDeadlineSeconds", 1), int) and spec.get("activeDeadlineSeconds", 1) > 0
        if "runtimeEnvYAML" in spec:
            assert isinstance(spec["runtimeEnvYAML"], str) and isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict)
        _check_entrypoint(spec["entrypoint"], path.name)
    elif kind == "RayService":
        from ray.serve.schema import ServeDeploySchema

        assert isinstance(spec["serveConfigV2"], str), path.name
        ServeDeploySchema.model_validate(yaml.safe_load(spec["serveConfigV2"]))
        check_ray_cluster_spec(spec["rayClusterConfig"], path.name)
    else:
        pytest.fail(f"{path.name}: unexpected kind {kind}")
    assert {yaml.safe_load(p.read_text())["kind"] for p in KUBERAY} == {"RayCluster", "RayJob", "RayService"}
    jobs = {yaml.safe_load(p.read_text())["spec"]["entrypoint"].split()[1].rsplit("/", 1)[1] for p in KUBERAY
            if yaml.safe_load(p.read_text())["kind"] == "RayJob"}
    assert jobs == {"mine_pairs.py", "train_clip.py", "evaluate.py", "segment_batch.py"}  # item 5


def test_rayservice_is_generated_from_the_serve_config_and_the_cluster_spec():
    """Item 5 / acceptance 4: one source; the committed manifest is what the generator writes."""
    spec = importlib.util.spec_from_file_location("render_rayservice", CLUSTER / "render_rayservice.py")
    render = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render)
    assert (CLUSTER / "kuberay-service.yaml").read_text() == render.render(), \
        "cluster/kuberay-service.yaml is out of date: run python cluster/render_rayservice.py"
    service = yaml.safe_load((CLUSTER / "kuberay-service.yaml").read_text())["spec"]
    assert service["serveConfigV2"] == (CLUSTER / "serve_config.yaml").read_text()
    assert service["rayClusterConfig"] == yaml.safe_load((CLUSTER / "kuberay-cluster.yaml").read_text())["spec"]


def _ignored(patterns: list[str], path: str) -> bool:
    from fnmatch import fnmatch

    parts = Path(path).parts
    return any(fnmatch(path, p) or any(fnmatch(part, p.removeprefix("**/")) for part in parts) for p in patterns)


def test_docker_build_context_leaves_out_the_venv_and_runs_but_keeps_what_the_image_copies():
    """Item 7: ``.dockerignore`` keeps a checkout's .venv and runs/ out of the build context."""
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for path in (".venv/lib/python3.11/site-packages/torch/__init__.py", "runs/demo/pairs/x.parquet",
                 "ovseg_ray/__pycache__/config.cpython-311.pyc", ".git/HEAD"):
        assert _ignored(patterns, path), path
    sources = [word for line in (CLUSTER / "Dockerfile").read_text().splitlines() if line.startswith("COPY")
               for word in line.split()[1:-1] if not word.startswith("--")]
    assert sources
    for source in sources:
        assert (REPO / source).exists() and not _ignored(patterns, source), source


def test_readme_cluster_commands_name_files_that_exist_and_start_ray_with_nltk_data():
    """Items 3 and 5: the README's configs exist; its ``ray start --head`` line sets NLTK_DATA."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Running on a cluster"):readme.index("## Conventions")]
    configs = set(re.findall(r"--config (\S+\.yaml)", section)) | set(re.findall(r"`(cluster/[\w.-]+)`", section))
    assert {"cluster/train_clip.yaml", "cluster/eval.yaml"} <= configs
    for config in configs:
        assert (REPO / config).exists(), config
    starts = [line for line in section.splitlines() if "ray start --head" in line]
    assert starts and all("NLTK_DATA=" in line for line in starts)
    assert "forwarded" not in (CLUSTER / "mining.yaml").read_text().split("images:")[0].replace("Nothing of the submitting shell is forwarded", "")
