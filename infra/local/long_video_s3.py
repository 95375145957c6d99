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
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from services import local_cluster, submit  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=None)
    parser.add_argument("--duration-s", type=float, default=None)
    parser.add_argument("--accel", default="scope")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--backend", default="local", choices=["local", "ray"])
    parser.add_argument("--stages", type=int, default=1)
    parser.add_argument("--prompt", default="a red circle moves right")
    args = parser.parse_args()
    if (args.frames is None) == (args.duration_s is None):
        parser.error("give one of --frames and --duration-s")
    work = Path(tempfile.mkdtemp(prefix="scope-lv-"))
    with local_cluster(work, buckets=("videos",)) as cluster:
        spec = {"prompt": args.prompt, "accel": args.accel, "out": "s3://videos/long", "backend": args.backend,
                "stages": args.stages, "storage_options": {"client_kwargs": {"endpoint_url": cluster["endpoint"]}}}
        spec.update({"frames": args.frames} if args.frames else {"duration_s": args.duration_s})
        if args.steps:
            spec["steps"] = args.steps
        (work / "spec.yaml").write_text(yaml.safe_dump(spec))
        code, output, wall = submit(cluster, ["-m", "jobs.long_video", "--spec", str(work / "spec.yaml")],
                                    work / "job.log")
        if code != 0:
            print(output[-4000:], file=sys.stderr)
            return code
        fs = cluster["fs"]
        stats = json.loads(fs.cat_file("videos/long/stats.json"))
        progress = [line for line in output.splitlines() if "frames/s" in line]
        print(json.dumps({"submit_wall_s": round(wall, 1), "job_wall_s": round(stats["wall_s"], 1),
                          "frames": stats["frames"], "video_s": stats["duration_s"], "fps_video": stats["fps"],
                          "frames_per_s": round(stats["frames"] / stats["wall_s"], 2),
                          "driver_peak_rss_mb": round(stats["peak_rss_mb"], 1),
                          "segment_files": len(fs.ls("videos/long/segments")),
                          "video_bytes": fs.info("videos/long/video.mp4")["size"],
                          "block_eval_fraction": round(stats["block_eval_fraction"], 3),
                          "backend": args.backend, "stages": args.stages, "accel": stats["accel"],
                          "steps": stats["schedule"]["num_steps"], "last_progress_line": progress[-1:],
                          "job_log": str(work / "job.log")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
