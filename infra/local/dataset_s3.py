"""A synthetic video dataset end to end on one machine: a local Ray head, an S3 API (moto) on
127.0.0.1, a manifest of N rows (held-out and training captions of the embedded model, plus a
few bad rows) on S3, `ray job submit` of the dataset job, then the metadata table read back:
videos/s, rows failed, duplicate ids.

    .venv/bin/python infra/local/dataset_s3.py --rows 500 --frames 16 --workers 2

Then submits the same job again (it must write nothing) and reports that too.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from services import local_cluster, submit  # noqa: E402

COLOURS = ["red", "green", "blue", "yellow", "magenta", "white"]
SHAPES = ["circle", "square", "triangle"]
MOTIONS = ["moves right", "moves left", "moves up", "moves down", "bounces", "stays still"]
BAD = [{"id": "bad-empty", "prompt": ""}, {"id": "bad-frames", "prompt": "a red circle bounces", "frames": -3},
       {"id": "bad-words", "prompt": "a dragon flies"}]


def manifest_rows(count: int) -> list[dict]:
    captions = [f"a {c} {s} {m}" for c in COLOURS for s in SHAPES for m in MOTIONS]
    return [{"id": f"video-{i:05d}", "prompt": captions[i % len(captions)]} for i in range(count)] + BAD


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=500)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--accel", default="scope")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=1)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="scope-ds-"))
    with local_cluster(work, buckets=("datasets",)) as cluster:
        fs = cluster["fs"]
        fs.pipe_file("datasets/manifest.jsonl", "\n".join(json.dumps(r) for r in manifest_rows(args.rows)).encode())
        base = {"frames": args.frames, "accel": args.accel,
                "storage_options": {"client_kwargs": {"endpoint_url": cluster["endpoint"]}}}
        if args.steps:
            base["steps"] = args.steps
        (work / "base.yaml").write_text(yaml.safe_dump(base))
        entry = ["-m", "jobs.dataset", "--manifest", "s3://datasets/manifest.jsonl", "--out", "s3://datasets/run",
                 "--spec", str(work / "base.yaml"), "--workers", str(args.workers),
                 "--batch-size", str(args.batch_size)]
        code, output, wall = submit(cluster, entry, work / "job.log")
        if code != 0:
            print(output[-4000:], file=sys.stderr)
            return code
        import pyarrow.parquet as pq

        table = pq.read_table(io.BytesIO(fs.cat_file("datasets/run/metadata.parquet"))).to_pylist()
        done = [r for r in table if r["status"] == "done"]
        counts = Counter(r["id"] for r in done)
        before = {p: i["ETag"] for p, i in fs.find("datasets/run", detail=True).items()}
        code2, output2, wall2 = submit(cluster, entry, work / "job2.log")
        after = {p: i["ETag"] for p, i in fs.find("datasets/run", detail=True).items()}
        summary = [json.loads(line.split("done: ", 1)[1]) for line in output.splitlines() if "dataset: done: " in line]
        print(json.dumps({"rows": len(table), "done": len(done), "failed": len(table) - len(done),
                          "duplicate_ids_done": sum(n - 1 for n in counts.values() if n > 1),
                          "videos": len(fs.ls("datasets/run/videos")), "submit_wall_s": round(wall, 1),
                          "job_wall_s": round(summary[0]["wall_s"], 1) if summary else None,
                          "videos_per_s": round(summary[0]["videos_per_s"], 3) if summary else None,
                          "resubmit_wall_s": round(wall2, 1), "resubmit_exit": code2,
                          "resubmit_wrote_objects": sorted(set(after.items()) ^ set(before.items()))[:5],
                          "frames": args.frames, "workers": args.workers, "batch_size": args.batch_size,
                          "accel": args.accel, "job_log": str(work / "job.log")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
