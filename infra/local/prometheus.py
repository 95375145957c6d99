"""One-box monitoring: a Ray head that exports metrics and a Prometheus server running the
shipped configuration (monitoring/prometheus.yml + its rules) against it, both on this machine,
each in its own process group and stopped by that group (never by process name).

    with ray_head_with_metrics(work) as head, prometheus(head, work) as prom:
        ...  # `ray job submit --address head["address"]`, then prom.query("...")

Only what a one-box run needs differs from the shipped files, and `local_config` says what:
the path of Ray's service discovery file (Ray writes it under its temp dir), shorter scrape and
evaluation intervals, and, when asked, a shorter stall threshold for `ScopeJobStalled`.
Prometheus listens on 127.0.0.1; Ray's metrics agent listens on the node's address (Ray
resolves 127.0.0.1 to it and binds the export port there; `ray start` has no option for that).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import yaml

from infra.local.services import free_port, port_open, stop, wait_ready

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "monitoring"
BIN = Path(sys.executable).parent
PROMETHEUS = os.environ.get("PROMETHEUS_BIN", "/usr/bin/prometheus")
SD_FILE = "prom_metrics_service_discovery.json"      # Ray's name, under its temp dir
STALL_EXPR = "(ray_scope_job_last_progress_timestamp_seconds) > 900"


# ------------------------------------------------------------------------------------ Ray

@contextmanager
def ray_head_with_metrics(work: Path, num_cpus: int = 4, report_interval_ms: int = 1000) -> Iterator[dict]:
    """`ray start --head --block --metrics-export-port=P` (job API on a free dashboard port).
    `report_interval_ms`: how often every process exports to the node's agent (Ray's default
    10000; tests use 1000). Yields address (job API), metrics_port, temp_dir, sd_file, env."""
    temp = Path(f"/tmp/ray-m-{os.getpid()}-{free_port()}")   # short: Ray's socket paths are limited
    gcs, dashboard, metrics, agent, client = (free_port() for _ in range(5))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_metrics_report_interval_ms": str(report_interval_ms)}
    env.pop("RAY_ADDRESS", None)
    log = open(work / "ray-head.log", "w")
    proc = subprocess.Popen([str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}",
                             "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}", "--include-dashboard=true",
                             "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                             f"--metrics-export-port={metrics}", f"--temp-dir={temp}", "--disable-usage-stats",
                             # fixed by default (52365, 10001): another Ray on this box would hold them
                             f"--dashboard-agent-listen-port={agent}", f"--ray-client-server-port={client}"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_ready(lambda: port_open(dashboard), proc, "ray dashboard", 120.0)
        wait_ready(lambda: (temp / SD_FILE).exists(), proc, "Ray's service discovery file", 60.0)
        wait_ready(lambda: port_open(metrics), proc, "Ray's metrics agent", 60.0)   # and the job agent with it
        yield {"address": f"http://127.0.0.1:{dashboard}", "metrics_port": metrics, "temp_dir": temp,
               "sd_file": temp / SD_FILE, "env": env, "ray": str(BIN / "ray"), "pid": proc.pid}
    finally:
        stop(proc)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


# ------------------------------------------------------------------------------------ Prometheus

def local_config(work: Path, sd_file: Path, *, scrape_s: float = 1.0, stall_after_s: float | None = None
                 ) -> Path:
    """The shipped configuration for this box, written under `work`: the service discovery
    file at Ray's temp dir, `scrape_s` intervals, and (optional) `ScopeJobStalled` after
    `stall_after_s` without progress and no `for` delay. Returns the config path."""
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    config["global"]["scrape_interval"] = config["global"]["evaluation_interval"] = f"{scrape_s:g}s"
    (job,) = config["scrape_configs"]
    job["file_sd_configs"][0]["files"] = [str(sd_file)]
    job["file_sd_configs"][0]["refresh_interval"] = "1s"
    shutil.copy(MONITORING / "recording_rules.yml", work / "recording_rules.yml")
    alerts = yaml.safe_load((MONITORING / "alert_rules.yml").read_text())
    if stall_after_s is not None:
        (rule,) = [r for g in alerts["groups"] for r in g["rules"] if r.get("alert") == "ScopeJobStalled"]
        if STALL_EXPR not in rule["expr"]:
            raise ValueError(f"ScopeJobStalled no longer reads {STALL_EXPR!r}; update local_config")
        rule["expr"] = rule["expr"].replace(STALL_EXPR, STALL_EXPR.replace("900", f"{stall_after_s:g}"))
        rule["for"] = "0s"
    (work / "alert_rules.yml").write_text(yaml.safe_dump(alerts, sort_keys=False))
    path = work / "prometheus.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


class PrometheusClient:
    """The HTTP API of one Prometheus server."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")

    def _get(self, path: str, **params: Any) -> Any:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=30) as reply:
            body = json.loads(reply.read())
        if body.get("status") != "success":
            raise RuntimeError(f"{path} {params}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        params = {"query": expr} if at is None else {"query": expr, "time": at}
        return self._get("/api/v1/query", **params)["result"]

    def value(self, expr: str, at: float | None = None) -> float | None:
        """The value of a query that gives one series (None when it gives none)."""
        result = self.query(expr, at)
        if not result:
            return None
        if len(result) > 1:
            raise AssertionError(f"{expr} gave {len(result)} series; expected one: {result}")
        return float(result[0]["value"][1])

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
        return self._get("/api/v1/query_range", query=expr, start=start, end=end, step=step)["result"]

    def alerts(self) -> list[dict[str, Any]]:
        return self._get("/api/v1/alerts")["alerts"]

    def targets(self) -> list[dict[str, Any]]:
        return self._get("/api/v1/targets")["activeTargets"]


@contextmanager
def prometheus(head: dict, work: Path, *, scrape_s: float = 1.0, stall_after_s: float | None = None
               ) -> Iterator[PrometheusClient]:
    """`prometheus` on 127.0.0.1:<free port> with `local_config`; stopped by process group."""
    if not Path(PROMETHEUS).exists():
        raise RuntimeError(f"{PROMETHEUS} not found: run .ci/services.sh install (Debian's prometheus package)")
    folder = work / "prometheus"
    folder.mkdir(parents=True, exist_ok=True)
    config = local_config(folder, head["sd_file"], scrape_s=scrape_s, stall_after_s=stall_after_s)
    port = free_port()
    log = open(folder / "prometheus.log", "w")
    proc = subprocess.Popen([PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={folder / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}", "--web.enable-lifecycle"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    client = PrometheusClient(f"http://127.0.0.1:{port}")
    try:
        def ready() -> bool:
            with urllib.request.urlopen(f"{client.url}/-/ready", timeout=2) as reply:
                return reply.status == 200
        wait_ready(ready, proc, "prometheus", 30.0)
        yield client
    finally:
        stop(proc)
        log.close()
