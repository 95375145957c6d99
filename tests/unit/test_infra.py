"""infra/ against the code: every file parses (the cluster launcher config against Ray's own
schema), and images, Ray versions, ports, metric endpoints, job entry points and job specs agree
with the project and with each other."""
from __future__ import annotations

import copy
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import ray
import torch
import yaml

from monitoring import metrics as M

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
KUBE = INFRA / "kuberay"


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            found.append((word.upper(), rest.strip()))
    return found


def _args() -> dict[str, str]:
    return dict(rest.split("=", 1) for word, rest in _dockerfile() if word == "ARG" and "=" in rest)


def _yaml(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _one(path: Path, kind: str) -> dict:
    (doc,) = [d for d in _yaml(path) if d["kind"] == kind]
    return doc


IMAGE_TAG = "ghcr.io/scope-video/scope-video-gpu:0.1.0"
SERVICE_PORTS = {"gcs-server": M.GCS_PORT, "dashboard": M.DASHBOARD_PORT, "client": M.CLIENT_PORT,
                 "metrics": M.METRICS_EXPORT_PORT}


# ------------------------------------------------------------------------------------ image

def test_the_image_installs_cuda_torch_ray_the_project_and_ffmpeg():
    steps = _dockerfile()
    args = _args()
    assert steps[0][0] == "FROM" and "python:3.11" in steps[0][1], "Python 3.11, as pyproject requires"
    assert args["RAY_VERSION"] == ray.__version__, "the image's Ray is the one the project is tested with"
    assert args["TORCH_VERSION"] == torch.__version__.split("+")[0]
    assert re.search(r"/whl/cu\d+$", args["TORCH_INDEX_URL"]), "a CUDA build of torch"
    runs = " ".join(rest for word, rest in steps if word == "RUN")
    assert "ffmpeg" in runs and "prometheus" in runs
    assert 'pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"' in runs
    assert 'pip install "ray[default,data]==${RAY_VERSION}" .' in runs, "the project, with Ray's job API and agent"
    torch_at = runs.index("torch==${TORCH_VERSION}")
    assert torch_at < runs.index("ray[default,data]"), "CUDA torch before the project (which asks torch>=2.4)"
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    copied = {rest.split()[0] for word, rest in steps if word == "COPY"}
    assert packages <= copied, f"packages not copied into the image: {packages - copied}"
    assert "pyproject.toml" in " ".join(copied)
    exposed = {int(p) for word, rest in steps if word == "EXPOSE" for p in rest.split()}
    assert exposed == set(SERVICE_PORTS.values())
    assert ("USER", "ray") in steps


def test_the_package_ships_the_monitoring_files_the_clusters_start_prometheus_with():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["monitoring"]
    shipped = {p.relative_to(ROOT / "monitoring").as_posix() for pattern in patterns
               for p in (ROOT / "monitoring").glob(pattern)}
    assert {"prometheus.yml", "recording_rules.yml", "alert_rules.yml", "alert_rules_test.yml",
            "dashboards/scope-video.json"} <= shipped


# ------------------------------------------------------------------------------------ cluster launcher

def test_the_cluster_launcher_config_passes_rays_schema_and_exports_metrics_everywhere():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((INFRA / "ray" / "cluster.yaml").read_text())
    validate_config(config)
    validate_config(prepare_config(copy.deepcopy(config)))            # with Ray's defaults filled in
    assert config["docker"]["image"] == IMAGE_TAG
    head = " ".join(config["head_start_ray_commands"])
    worker = " ".join(config["worker_start_ray_commands"])
    for flag in (f"--port={M.GCS_PORT}", f"--dashboard-port={M.DASHBOARD_PORT}",
                 f"--ray-client-server-port={M.CLIENT_PORT}", f"--metrics-export-port={M.METRICS_EXPORT_PORT}"):
        assert flag in head, flag
    assert f"--metrics-export-port={M.METRICS_EXPORT_PORT}" in worker and f":{M.GCS_PORT}" in worker
    assert "prometheus --config.file=$MON/prometheus.yml" in head and "import os, monitoring" in head
    gpu = config["available_node_types"]["gpu_worker"]
    assert gpu["max_workers"] > 1 and config["head_node_type"] == "head"


# ------------------------------------------------------------------------------------ KubeRay

def test_the_raycluster_runs_the_image_and_exposes_metrics_on_every_pod():
    cluster = _one(KUBE / "raycluster.yaml", "RayCluster")
    assert cluster["apiVersion"] == "ray.io/v1"
    assert cluster["spec"]["rayVersion"] == _args()["RAY_VERSION"]
    groups = [cluster["spec"]["headGroupSpec"], *cluster["spec"]["workerGroupSpecs"]]
    for group in groups:
        assert group["rayStartParams"]["metrics-export-port"] == str(M.METRICS_EXPORT_PORT)
        for container in group["template"]["spec"]["containers"]:
            assert container["image"] == IMAGE_TAG
            ports = {p["name"]: p["containerPort"] for p in container["ports"]}
            assert ports["metrics"] == M.METRICS_EXPORT_PORT
    head_ports = {p["name"]: p["containerPort"] for p in groups[0]["template"]["spec"]["containers"][0]["ports"]}
    assert head_ports == SERVICE_PORTS
    for worker in groups[1:]:
        limits = worker["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1 and worker["maxReplicas"] > 1


def _spec_mount() -> tuple[str, dict[str, str]]:
    cluster = _one(KUBE / "raycluster.yaml", "RayCluster")
    pod = cluster["spec"]["headGroupSpec"]["template"]["spec"]
    (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "job-specs"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == "job-specs"]
    config_map = _one(KUBE / "job-specs.yaml", "ConfigMap")
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    return mount["mountPath"], config_map["data"]


@pytest.mark.parametrize("manifest,module", [("rayjob-long-video.yaml", "jobs.long_video"),
                                             ("rayjob-dataset.yaml", "jobs.dataset")])
def test_rayjobs_run_real_entry_points_with_valid_specs_on_the_cluster(manifest, module, tmp_path):
    import importlib

    job = _one(KUBE / manifest, "RayJob")
    cluster = _one(KUBE / "raycluster.yaml", "RayCluster")
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", module], argv
    args = importlib.import_module(module).build_parser().parse_args(argv[3:])   # the job's own flags
    mount, specs = _spec_mount()
    assert args.spec.startswith(mount + "/"), f"--spec {args.spec} is not on the head pod's spec mount {mount}"
    local = tmp_path / Path(args.spec).name
    local.write_text(specs[Path(args.spec).name])
    if module == "jobs.long_video":
        from jobs.long_video import check_long_video
        from jobs.spec import JobSpec

        spec = JobSpec.from_yaml(str(local))
        check_long_video(spec)
        assert spec.backend == "ray" and spec.stages > 1 and spec.out.startswith("s3://")
    else:
        from jobs.dataset import base_spec

        spec = base_spec(str(local), args.out, args.batch_size)
        assert spec.backend == "local" and spec.stages == 1 and args.workers > 1 and args.gpus_per_worker == 1


def test_the_kubernetes_monitoring_manifest_is_generated_from_the_monitoring_files(tmp_path):
    import subprocess

    from infra.kuberay.generate import OUT, render

    assert OUT.read_text() == render(), "run: .venv/bin/python infra/kuberay/generate.py"
    docs = {d["kind"]: d for d in _yaml(OUT)}
    monitor = docs["PodMonitor"]
    cluster = _one(KUBE / "raycluster.yaml", "RayCluster")
    assert monitor["spec"]["selector"]["matchLabels"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    assert {"targetLabel": "job", "replacement": "ray"} in endpoint["relabelings"]
    rules = tmp_path / "rules.yml"
    rules.write_text(yaml.safe_dump({"groups": docs["PrometheusRule"]["spec"]["groups"]}))
    promtool = "/usr/bin/promtool"
    if not Path(promtool).exists():
        pytest.fail("promtool not found: run .ci/services.sh install (Debian's prometheus package)")
    done = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert docs["ConfigMap"]["metadata"]["labels"]["grafana_dashboard"] == "1"


def test_the_local_prometheus_changes_only_what_a_one_box_run_needs(tmp_path):
    from infra.local.prometheus import MONITORING, local_config

    sd = tmp_path / "ray" / "prom_metrics_service_discovery.json"
    config = yaml.safe_load(local_config(tmp_path, sd, scrape_s=1, stall_after_s=6).read_text())
    shipped = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    assert config["rule_files"] == shipped["rule_files"]
    assert config["scrape_configs"][0]["file_sd_configs"][0]["files"] == [str(sd)]
    assert config["global"] == {"scrape_interval": "1s", "evaluation_interval": "1s"}
    shipped_rules = yaml.safe_load((MONITORING / "recording_rules.yml").read_text())
    assert yaml.safe_load((tmp_path / "recording_rules.yml").read_text()) == shipped_rules
    alerts = yaml.safe_load((tmp_path / "alert_rules.yml").read_text())
    stalled = [r for g in alerts["groups"] for r in g["rules"] if r.get("alert") == "ScopeJobStalled"][0]
    assert "(ray_scope_job_last_progress_timestamp_seconds) > 6" in stalled["expr"] and stalled["for"] == "0s"
