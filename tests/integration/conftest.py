"""Real services for integration tests, started here and stopped by PID (127.0.0.1 only)."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {timeout} s")


def _stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def s3_endpoint():
    """A moto S3 server (server mode, a real HTTP endpoint) and credentials for it."""
    moto = Path(sys.executable).with_name("moto_server")
    if not moto.exists():
        found = shutil.which("moto_server")
        if found is None:
            pytest.fail("moto_server not found: install the test extras (pip install -e '.[test]')")
        moto = Path(found)
    port = free_port()
    proc = subprocess.Popen([str(moto), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_port(port, proc, "moto_server")
        url = f"http://127.0.0.1:{port}"
        old = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
        os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"] = "testing", "testing"
        yield url
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    finally:
        _stop(proc)


@pytest.fixture
def s3_options(s3_endpoint):
    """fsspec storage options for the moto endpoint (no region: bucket creation fails with one)."""
    return {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": s3_endpoint}}


RAY_TEST_ENV = {"RAY_AUTH_MODE": "disabled", "AWS_ACCESS_KEY_ID": "AKIASCOPETESTKEY0001",
                "AWS_SECRET_ACCESS_KEY": "scope-test-secret-value-42"}


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A real Ray head (`ray start --head --block`, its own process group, 127.0.0.1) with the job
    API on a free dashboard port; stopped by process group with SIGKILL after a grace period.
    Jobs submitted to it see RAY_TEST_ENV (moto accepts any credentials: these are unique
    strings a test can look for in logs and files)."""
    ray_bin = Path(sys.executable).with_name("ray")
    temp = Path(f"/tmp/ray-{os.getpid()}-{free_port()}")   # short: Ray's unix socket paths are limited
    gcs, dashboard = free_port(), free_port()
    env = {**os.environ, **RAY_TEST_ENV}
    env.pop("RAY_ADDRESS", None)
    log = open(tmp_path_factory.mktemp("ray") / "head.log", "w")
    proc = subprocess.Popen([str(ray_bin), "start", "--head", "--block", f"--port={gcs}",
                             "--node-ip-address=127.0.0.1", "--num-cpus=4", "--include-dashboard=true",
                             "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                             f"--temp-dir={temp}", "--disable-usage-stats"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_port(dashboard, proc, "ray dashboard", timeout=90.0)
        yield {"address": f"http://127.0.0.1:{dashboard}", "env": env, "ray": str(ray_bin)}
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(5)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


# ----------------------------------------------------------------------------- Ray jobs

JOB_TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def submit_job(head: dict, prefix: str, module: str, *args: str) -> str:
    """`ray job submit --no-wait -- python -m MODULE ARGS` to the test head; returns its id."""
    import uuid

    job = f"{prefix}-{uuid.uuid4().hex[:10]}"
    subprocess.run([head["ray"], "job", "submit", "--address", head["address"], "--submission-id", job,
                    "--no-wait", "--", sys.executable, "-m", module, *args],
                   env=head["env"], check=True, capture_output=True, timeout=120)
    return job


def job_client(head: dict):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(head["address"])


def job_status(head: dict, job: str) -> str:
    return str(job_client(head).get_job_status(job)).split(".")[-1]


def wait_job(head: dict, job: str, timeout: float = 400.0) -> str:
    """The job's terminal status (SUCCEEDED, FAILED, STOPPED); fails with its logs on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = job_status(head, job)
        if status in JOB_TERMINAL:
            return status
        time.sleep(0.5)
    raise AssertionError(f"job {job} did not finish within {timeout} s:\n"
                         f"{job_client(head).get_job_logs(job)[-3000:]}")
