"""The shipped Prometheus files and the dashboard: every query reads series that exist (a metric of
monitoring/metrics.py, a recording rule, or Prometheus's own), every metric is shown or used,
`promtool check config`, `promtool check rules` and `promtool test rules` pass, and the
dashboard JSON in the repository is the one the code defines."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from monitoring import metrics as M
from monitoring.dashboard import DASHBOARD_JSON, PANELS, grafana_dashboard

MONITORING = Path(M.__file__).resolve().parent
PROMETHEUS_OWN = {"ALERTS", "ALERTS_FOR_STATE", "up"}
RAY_LABELS = {"NodeAddress", "WorkerId", "SessionName", "Component", "Version", "instance", "job", "le",
              "alertname", "alertstate"}
PROMQL_WORDS = {
    "sum", "max", "min", "avg", "count", "by", "without", "on", "ignoring", "group_left", "group_right",
    "and", "or", "unless", "offset", "rate", "increase", "irate", "delta", "time", "vector", "clamp_min",
    "clamp_max", "histogram_quantile", "max_over_time", "min_over_time", "avg_over_time", "abs", "bool",
    "humanize", "humanizeDuration", "humanizePercentage", "topk", "bottomk", "absent", "changes", "resets",
    "inf", "nan"}


def _rules(name: str) -> list[dict]:
    return [r for g in yaml.safe_load((MONITORING / name).read_text())["groups"] for r in g["rules"]]


RECORDED = {r["record"] for r in _rules("recording_rules.yml")}
ALERTS = _rules("alert_rules.yml")


def series_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (label matchers, grouping clauses, ranges,
    durations, strings and numbers removed)."""
    text = re.sub(r'"[^"]*"', "", expr)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = re.sub(r"\boffset\s+\d+[smhdwy]", "", text)
    tokens = re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", text)
    return {t for t in tokens if t not in PROMQL_WORDS and not re.fullmatch(r"\d+[smhdwy]", t)}


def grouping_labels(expr: str) -> set[str]:
    found = set()
    for clause in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", expr):
        found |= {x.strip() for x in clause.split(",") if x.strip()}
    return found


def test_the_expression_parser_finds_names_not_labels():
    expr = ('sum by (job_kind, le) (rate(ray_scope_denoising_step_seconds_bucket{mode="x"}[5m])) '
            '/ on (NodeAddress) group_left max by (WorkerId) (scope:a:b offset 15m) > 900')
    assert series_names(expr) == {"ray_scope_denoising_step_seconds_bucket", "scope:a:b"}
    assert grouping_labels(expr) == {"job_kind", "le", "NodeAddress", "WorkerId"}


def _exprs() -> list[tuple[str, str]]:
    found = [(f"record {r['record']}", r["expr"]) for r in _rules("recording_rules.yml")]
    found += [(f"alert {r['alert']}", r["expr"]) for r in ALERTS]
    found += [(f"panel {p.title!r}", q.expr) for p in PANELS for q in p.queries]
    return found


def test_every_query_reads_series_that_exist_and_labels_they_have():
    known = M.exported_series() | RECORDED | PROMETHEUS_OWN
    labels = {label for m in M.METRICS for label in m.labels} | RAY_LABELS
    for where, expr in _exprs():
        missing = series_names(expr) - known
        assert not missing, f"{where} reads {sorted(missing)}, which no metric or rule defines"
        assert grouping_labels(expr) <= labels, f"{where} groups by unknown labels {grouping_labels(expr) - labels}"
        assert series_names(expr), f"{where} reads nothing"


def test_every_metric_is_shown_or_used_and_rules_are_named_by_convention():
    read = set().union(*(series_names(e) for _, e in _exprs()))
    for m in M.METRICS:
        assert read & set(m.series_names()), f"{m.series} is exported but no rule or panel reads it"
    for name in RECORDED:
        assert re.fullmatch(r"scope:[a-z0-9_]+:[a-z0-9_]+", name), f"{name}: level:metric:operations"
        assert name in read, f"recording rule {name} is read by no panel, rule or alert"
    for panel in PANELS:
        assert any(read_name in RECORDED or read_name.startswith("ray_scope_") or read_name in PROMETHEUS_OWN
                   for q in panel.queries for read_name in series_names(q.expr))


def test_every_alert_has_a_severity_summary_and_a_unit_test():
    tests = (MONITORING / "alert_rules_test.yml").read_text()
    for rule in ALERTS:
        assert rule["labels"]["severity"] in ("page", "warning"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
        assert f"alertname: {rule['alert']}" in tests, f"{rule['alert']} has no promtool unit test"


def test_the_dashboard_json_in_the_repository_is_the_defined_one():
    shipped = json.loads(DASHBOARD_JSON.read_text())
    assert shipped == grafana_dashboard(), "run: python -m monitoring.dashboard json"
    ids = [p["id"] for p in shipped["panels"]]
    assert len(ids) == len(set(ids)) == len(PANELS)
    cells = set()
    for panel in shipped["panels"]:
        g = panel["gridPos"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, f"panel {panel['title']!r} overlaps another"
        cells |= mine
        assert g["x"] + g["w"] <= 24
        assert panel["targets"] and all(t["expr"] and t["datasource"]["uid"] == "${datasource}"
                                        for t in panel["targets"])
    assert shipped["templating"]["list"][0]["type"] == "datasource"


def test_the_scrape_config_uses_rays_service_discovery_and_the_shipped_rules():
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    for name in config["rule_files"]:
        assert (MONITORING / name).is_file(), name
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "ray" and job["file_sd_configs"][0]["files"] == [
        "/tmp/ray/prom_metrics_service_discovery.json"]
    alerts = "\n".join(r["expr"] for r in ALERTS)
    assert f'up{{job="{job["job_name"]}"}}' in alerts


# ------------------------------------------------------------------------------------ promtool

def _promtool() -> str:
    found = shutil.which("promtool") or ("/usr/bin/promtool" if Path("/usr/bin/promtool").exists() else None)
    if found is None:
        pytest.fail("promtool not found: run .ci/services.sh install (Debian's prometheus package)")
    return found


def _run(*args: str) -> str:
    done = subprocess.run([_promtool(), *args], cwd=MONITORING, capture_output=True, text=True, timeout=120)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"promtool {' '.join(args)} failed:\n{output}"
    return output


def test_promtool_checks_the_config_and_the_rules():
    assert "SUCCESS" in _run("check", "config", "prometheus.yml")
    output = _run("check", "rules", "recording_rules.yml", "alert_rules.yml")
    assert f"{len(RECORDED)} rules found" in output and f"{len(ALERTS)} rules found" in output


def test_promtool_unit_tests_the_alerts():
    assert "SUCCESS" in _run("test", "rules", "alert_rules_test.yml")
