"""A long video end to end on one machine, the way a cluster user runs it: a local Ray head
(`ray start --head`), an S3 API (moto's server mode) on 127.0.0.1, `ray job submit` of the
long-video job writing to s3://, then the job's stats read back from S3.

    .venv/bin/python infra/local/long_video_s3.py --duration-s 600 --accel scope
    .venv/bin/python infra/local/long_video_s3.py --frames 480 --backend ray --stages 2

Prints one JSON object (wall time of the submit, frames/s, the driver's peak RSS, the job's
stats) and stops everything it started, by process group (never by name).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

BIN = Path(sys.executable).parent
ENV = {"RAY_AUTH_MODE": "disabled", "AWS_ACCESS_KEY_ID": "local-demo", "AWS_SECRET_ACCESS_KEY": "local-demo-secret"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {timeout} s")


def stop(proc: subprocess.Popen) -> None:
    for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 30)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(grace)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=None)
    parser.add_argument("--duration-s", type=float, default=None)
    parser.add_argument("--accel", default="scope")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--backend", default="local", choices=["local", "ray"])
    parser.add_argument("--stages", type=int, default=1)
    parser.add_argument("--prompt", default="a red circle moves right")
    parser.add_argument("--num-cpus", type=int, default=4)
    args = parser.parse_args()
    if (args.frames is None) == (args.duration_s is None):
        parser.error("give one of --frames and --duration-s")

    env = {**os.environ, **ENV}
    env.pop("RAY_ADDRESS", None)
    work = Path(tempfile.mkdtemp(prefix="scope-lv-"))
    s3_port, gcs, dash = free_port(), free_port(), free_port()
    moto = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(s3_port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    head = None
    try:
        wait_port(s3_port, moto, "moto_server", 30)
        endpoint = f"http://127.0.0.1:{s3_port}"
        import s3fs

        fs = s3fs.S3FileSystem(key=ENV["AWS_ACCESS_KEY_ID"], secret=ENV["AWS_SECRET_ACCESS_KEY"],
                               client_kwargs={"endpoint_url": endpoint})
        fs.mkdir("videos")
        head = subprocess.Popen([str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}",
                                 "--node-ip-address=127.0.0.1", f"--num-cpus={args.num_cpus}",
                                 "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                                 f"--dashboard-port={dash}", f"--temp-dir=/tmp/ray-lv-{os.getpid()}",
                                 "--disable-usage-stats"], env=env, stdout=open(work / "head.log", "w"),
                                stderr=subprocess.STDOUT, start_new_session=True)
        wait_port(dash, head, "ray dashboard", 120)
        spec = {"prompt": args.prompt, "accel": args.accel, "out": "s3://videos/long", "backend": args.backend,
                "stages": args.stages, "storage_options": {"client_kwargs": {"endpoint_url": endpoint}}}
        spec.update({"frames": args.frames} if args.frames else {"duration_s": args.duration_s})
        if args.steps:
            spec["steps"] = args.steps
        (work / "spec.yaml").write_text(yaml.safe_dump(spec))
        started = time.perf_counter()
        submit = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{dash}", "--",
                                 sys.executable, "-m", "jobs.long_video", "--spec", str(work / "spec.yaml")],
                                env=env, capture_output=True, text=True)
        wall = time.perf_counter() - started
        (work / "job.log").write_text(submit.stdout + submit.stderr)
        if submit.returncode != 0:
            print(submit.stdout[-4000:], submit.stderr[-4000:], file=sys.stderr)
            return submit.returncode
        stats = json.loads(fs.cat_file("videos/long/stats.json"))
        segments = len(fs.ls("videos/long/segments"))
        progress = [line for line in submit.stdout.splitlines() if "frames/s" in line]
        print(json.dumps({"submit_wall_s": round(wall, 1), "job_wall_s": round(stats["wall_s"], 1),
                          "frames": stats["frames"], "video_s": stats["duration_s"], "fps_video": stats["fps"],
                          "frames_per_s": round(stats["frames"] / stats["wall_s"], 2),
                          "driver_peak_rss_mb": round(stats["peak_rss_mb"], 1), "segment_files": segments,
                          "video_bytes": fs.info("videos/long/video.mp4")["size"],
                          "block_eval_fraction": round(stats["block_eval_fraction"], 3),
                          "backend": args.backend, "stages": args.stages, "accel": stats["accel"],
                          "steps": stats["schedule"]["num_steps"], "last_progress_line": progress[-1:],
                          "job_log": str(work / "job.log")}, indent=1))
        return 0
    finally:
        if head is not None:
            stop(head)
        stop(moto)
        shutil.rmtree(f"/tmp/ray-lv-{os.getpid()}", ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
