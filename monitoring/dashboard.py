"""The operator dashboard, defined once: its panels -> Grafana JSON, and -> a PNG from a live
Prometheus (matplotlib; for docs and for machines without a Grafana server).

    python -m monitoring.dashboard json                       # rewrite dashboards/scope-video.json
    python -m monitoring.dashboard render --prometheus http://127.0.0.1:9090 \\
        --minutes 15 --out docs/dashboard.png                 # what an operator sees, as a picture

Every query reads `ray_scope_*` series (monitoring/metrics.py), recording rules
(monitoring/recording_rules.yml) or Prometheus's own `ALERTS`; a unit test checks each name.
"""
from __future__ import annotations

import argparse
import json
import math
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DASHBOARD_JSON = HERE / "dashboards" / "scope-video.json"
UID = "scope-video"


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str


@dataclass(frozen=True)
class Panel:
    title: str
    queries: tuple[Query, ...]
    unit: str = "short"            # Grafana unit id: short, s, bytes, percentunit
    description: str = ""


PANELS: tuple[Panel, ...] = (
    Panel("Frames/s per GPU (by worker)",
          (Query("scope:frames_per_gpu:rate1m", "{{job_kind}} {{NodeAddress}} {{WorkerId}}"),),
          description="Frames/s of each process running the segment loop, divided by the GPUs its videos "
                      "use (CPU workers count as one)."),
    Panel("Frames/s by job kind", (Query("scope:frames_generated:rate1m", "{{job_kind}} {{model}}"),)),
    Panel("SCOPE mode mix", (Query("scope:chunk_modes:ratio_rate5m", "{{mode}} ({{method}}, {{model}})"),),
          unit="percentunit",
          description="Share of chunk calls per mode (recompute / cache / predict / skip), per method and model; "
                      "the modes of one method add up to 100 %."),
    Panel("Block evaluations saved",
          (Query("scope:block_evals_saved:ratio_rate5m", "{{method}} {{model}} ({{job_kind}})"),),
          unit="percentunit", description="1 - run / full-compute block evaluations."),
    Panel("Work per second",
          (Query("sum by (job_kind) (rate(ray_scope_model_calls_total[1m]))", "model calls {{job_kind}}"),
           Query("sum by (job_kind) (rate(ray_scope_chunk_calls_total[1m]))", "chunk calls {{job_kind}}"),
           Query("sum by (job_kind) (rate(ray_scope_block_evals_run_total[1m]))", "block evals run {{job_kind}}"),
           Query("sum by (job_kind) (rate(ray_scope_block_evals_saved_total[1m]))",
                 "block evals saved {{job_kind}}"),
           Query("sum by (stage) (rate(ray_scope_stage_calls_total[1m]))", "stage {{stage}} calls")),
          description="Transformer calls, chunk calls and block evaluations (run / saved) per second; "
                      "calls per pipeline stage."),
    Panel("Denoising step latency",
          (Query("scope:denoising_step_seconds:p50_5m", "p50 {{job_kind}}"),
           Query("scope:denoising_step_seconds:p95_5m", "p95 {{job_kind}}")), unit="s"),
    Panel("Job progress", (Query("scope:job_progress:ratio", "{{job_kind}} {{job_id}}"),), unit="percentunit"),
    Panel("Seconds since a job's last progress",
          (Query("scope:job_last_progress:age_seconds", "{{job_kind}} {{job_id}}"),), unit="s",
          description="Time since the job's last finished segment / row; ScopeJobStalled pages above 15 min."),
    Panel("Queue depth and requests in flight",
          (Query("sum by (job_kind, job_id) (ray_scope_queue_depth)", "queued {{job_kind}} {{job_id}}"),
           Query("sum by (job_kind) (ray_scope_requests_in_flight)", "in flight {{job_kind}}"))),
    Panel("Accelerator cache per rank",
          (Query("max by (NodeAddress, job_kind, stage, sp_rank) (ray_scope_accel_cache_bytes)",
                 "{{job_kind}} stage {{stage}}.{{sp_rank}} {{NodeAddress}}"),), unit="bytes",
          description="Residual history, K/V and indicator inputs one rank holds at segment ends."),
    Panel("Stage busy fraction",
          (Query("scope:stage_busy:ratio_rate1m", "stage {{stage}}.{{sp_rank}} {{NodeAddress}}"),),
          unit="percentunit"),
    Panel("Videos and segments finished",
          (Query("sum by (job_kind) (ray_scope_videos_finished_total)", "videos {{job_kind}}"),
           Query("sum by (job_kind) (ray_scope_segments_finished_total)", "segments {{job_kind}}"))),
    Panel("Dataset rows failed by reason", (Query("scope:rows_failed:sum", "{{reason}}"),)),
    Panel("Dataset rows failed, last 15 min", (Query("scope:rows_failed:ratio15m", "failed fraction"),),
          unit="percentunit", description="ScopeRowErrorRate warns above 10 % (and 3 rows)."),
    Panel("Worker restarts, last 15 min", (Query("scope:worker_restarts:increase15m", "{{kind}}"),)),
    Panel("Alerts firing",
          (Query('sum by (alertname, job_kind) (ALERTS{alertstate="firing", alertname=~"Scope.*"})',
                 "{{alertname}} {{job_kind}}"),)),
)


# ------------------------------------------------------------------------------------ Grafana

def grafana_dashboard() -> dict[str, Any]:
    """The Grafana dashboard (importable: the Prometheus data source is a variable)."""
    source = {"type": "prometheus", "uid": "${datasource}"}
    panels = []
    for i, panel in enumerate(PANELS):
        targets = [{"refId": chr(ord("A") + j), "datasource": source, "expr": q.expr, "legendFormat": q.legend,
                    "range": True} for j, q in enumerate(panel.queries)]
        custom = {"drawStyle": "line", "lineInterpolation": "stepAfter", "lineWidth": 1, "fillOpacity": 0,
                  "spanNulls": False}
        panels.append({
            "id": i + 1, "type": "timeseries", "title": panel.title, "description": panel.description,
            "datasource": source, "gridPos": {"h": 8, "w": 8, "x": (i % 3) * 8, "y": (i // 3) * 8},
            "targets": targets,
            "fieldConfig": {"defaults": {"unit": panel.unit, "custom": custom}, "overrides": []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                        "tooltip": {"mode": "multi", "sort": "desc"}},
        })
    return {
        "uid": UID, "title": "SCOPE-Video: jobs, throughput, SCOPE modes", "tags": ["scope-video", "ray"],
        "timezone": "browser", "schemaVersion": 39, "version": 1, "editable": True, "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "templating": {"list": [{"name": "datasource", "label": "Prometheus", "type": "datasource",
                                 "query": "prometheus", "current": {}, "hide": 0}]},
        "annotations": {"list": []},
        "panels": panels,
    }


def write_json(path: Path = DASHBOARD_JSON) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(grafana_dashboard(), indent=1) + "\n")
    return path


# ------------------------------------------------------------------------------------ PNG

def query_range(prometheus: str, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
    """`/api/v1/query_range` -> its result list (matrix)."""
    params = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": step})
    with urllib.request.urlopen(f"{prometheus.rstrip('/')}/api/v1/query_range?{params}", timeout=30) as reply:
        body = json.loads(reply.read())
    if body.get("status") != "success":
        raise RuntimeError(f"query {expr!r} failed: {body.get('error')}")
    return body["data"]["result"]


def legend_of(template: str, labels: dict[str, str]) -> str:
    """A Grafana legend template filled in (WorkerId shortened to 8 characters)."""
    text = template
    for key, value in labels.items():
        text = text.replace("{{" + key + "}}", value[:8] if key == "WorkerId" else value)
    while "{{" in text:                       # labels the series does not have
        head, _, rest = text.partition("{{")
        text = head + rest.partition("}}")[2]
    return " ".join(text.split())


def render_png(prometheus: str, out: Path, start: float, end: float, step: float | None = None,
               title: str | None = None) -> dict[str, int]:
    """Every panel's series over [start, end] as one PNG; returns series count per panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    step = step or max(1.0, (end - start) / 300)
    cols = 4
    rows = math.ceil(len(PANELS) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.3 * rows), squeeze=False)
    counts: dict[str, int] = {}
    for ax, panel in zip(axes.flat, PANELS):
        found = 0
        for query in panel.queries:
            for series in query_range(prometheus, query.expr, start, end, step):
                points = [(float(t), float(v)) for t, v in series["values"] if v not in ("NaN", "+Inf", "-Inf")]
                if not points:
                    continue
                found += 1
                points = _with_gaps(points, step)
                when = [datetime.fromtimestamp(t) for t, _ in points]
                values = [v * (100.0 if panel.unit == "percentunit" else 1.0) for _, v in points]
                label = legend_of(query.legend, series["metric"])
                if panel.unit == "bytes":
                    values = [v / 2**20 for v in values]
                ax.step(when, values, where="post", label=label, linewidth=1.4)
        counts[panel.title] = found
        unit = {"percentunit": " (%)", "s": " (s)", "bytes": " (MiB)"}.get(panel.unit, "")
        ax.set_title(panel.title + unit, fontsize=10, loc="left")
        ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S"))
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if found:
            ax.legend(fontsize=6, loc="best")
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="grey")
    for ax in list(axes.flat)[:len(PANELS)]:
        ax.set_xlim(datetime.fromtimestamp(start), datetime.fromtimestamp(end))
    for ax in list(axes.flat)[len(PANELS):]:
        ax.set_visible(False)
    fig.suptitle(title or f"SCOPE-Video dashboard ({len(PANELS)} panels, Prometheus {prometheus})", fontsize=12)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return counts


def _with_gaps(points: list[tuple[float, float]], step: float) -> list[tuple[float, float]]:
    """A NaN point where the series has no samples for more than a step, so the plot breaks
    there (as Grafana does) instead of joining across the gap."""
    out = points[:1]
    for (t0, _), (t1, v1) in zip(points, points[1:]):
        if t1 - t0 > 1.5 * step:
            out.append((t0 + step, float("nan")))
        out.append((t1, v1))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m monitoring.dashboard", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("json", help=f"write {DASHBOARD_JSON.relative_to(HERE.parent)}")
    render = sub.add_parser("render", help="a PNG of every panel from a live Prometheus")
    render.add_argument("--prometheus", required=True)
    render.add_argument("--minutes", type=float, default=15.0)
    render.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.command == "json":
        print(write_json())
        return 0
    end = time.time()
    counts = render_png(args.prometheus, args.out, end - 60 * args.minutes, end)
    print(json.dumps(counts, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
