"""Local services for the one-box demos: a moto S3 server and a `ray start --head` cluster on
127.0.0.1, each in its own process group, stopped by that group (never by process name)."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

BIN = Path(sys.executable).parent
ENV = {"RAY_AUTH_MODE": "disabled", "AWS_ACCESS_KEY_ID": "local-demo", "AWS_SECRET_ACCESS_KEY": "local-demo-secret"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(ready: Callable[[], bool], proc: subprocess.Popen, what: str, timeout: float) -> None:
    """Poll `ready()` (an OSError counts as not yet) until true; fail if `proc` exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            if ready():
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{what} was not ready within {timeout} s")


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.create_connection((host, port), timeout=0.5):
        return True


def wait_port(port: int, proc: subprocess.Popen, what: str, timeout: float) -> None:
    wait_ready(lambda: port_open(port), proc, f"{what} on 127.0.0.1:{port}", timeout)


def stop(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    """SIGTERM to the process group started with `proc`, SIGKILL after a grace period."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 30.0)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(wait_s)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


@contextmanager
def local_cluster(work: Path, buckets: tuple[str, ...], num_cpus: int = 4) -> Iterator[dict]:
    """moto S3 (with `buckets` created) + a Ray head; yields endpoint, dashboard address, env, fs."""
    env = {**os.environ, **ENV}
    env.pop("RAY_ADDRESS", None)
    s3_port, gcs, dash = free_port(), free_port(), free_port()
    temp = f"/tmp/ray-demo-{os.getpid()}"
    moto = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(s3_port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    head = None
    try:
        wait_port(s3_port, moto, "moto_server", 30)
        endpoint = f"http://127.0.0.1:{s3_port}"
        import s3fs

        fs = s3fs.S3FileSystem(key=ENV["AWS_ACCESS_KEY_ID"], secret=ENV["AWS_SECRET_ACCESS_KEY"],
                               client_kwargs={"endpoint_url": endpoint})
        for bucket in buckets:
            fs.mkdir(bucket)
        head = subprocess.Popen([str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}",
                                 "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}",
                                 "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                                 f"--dashboard-port={dash}", f"--temp-dir={temp}", "--disable-usage-stats"],
                                env=env, stdout=open(work / "head.log", "w"), stderr=subprocess.STDOUT,
                                start_new_session=True)
        wait_port(dash, head, "ray dashboard", 120)
        yield {"endpoint": endpoint, "address": f"http://127.0.0.1:{dash}", "env": env, "fs": fs}
    finally:
        if head is not None:
            stop(head)
        stop(moto)
        shutil.rmtree(temp, ignore_errors=True)


def submit(cluster: dict, entrypoint: list[str], log: Path) -> tuple[int, str, float]:
    """`ray job submit` (waits for the end); returns (exit code, its output, wall seconds)."""
    started = time.perf_counter()
    done = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", cluster["address"], "--",
                           sys.executable, *entrypoint], env=cluster["env"], capture_output=True, text=True)
    output = done.stdout + done.stderr
    log.write_text(output)
    return done.returncode, output, time.perf_counter() - started
