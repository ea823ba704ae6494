"""Every metric the Grafana dashboard and the Prometheus alert rules name is one a real server exports.

A live server (tiny-sdxl) is scraped over its socket; every PromQL expression in every dashboard
panel, dashboard variable and alert rule is reduced to the metric names it selects, and each name
must appear in the scrape (a labelled metric with no samples yet still has its ``# HELP`` line;
a histogram's ``_bucket``/``_sum``/``_count`` series count as the histogram).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "observability" / "dashboards" / "imagegate.json"
RULES = ROOT / "observability" / "alerts" / "imagegate.rules.yaml"

_KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
             "bool", "offset", "inf", "nan", "atan2"}
_TOKEN = re.compile(r"""
    (?P<number>\d+(?:\.\d+)?(?:[eE][+-]?\d+)?(?:(?:ms|s|m|h|d|w|y)(?:\d+(?:ms|s|m|h|d|w|y))*)?)
  | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)(?P<call>\s*\()?
""", re.VERBOSE)


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression (or a Grafana label_values() query) selects."""
    expr = re.sub(r"label_values\(\s*([^,()]+?)\s*(?:,[^()]*)?\)", r"\1", expr)
    expr = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    expr = re.sub(r"\{[^{}]*\}", " ", expr)          # label matchers
    expr = re.sub(r"\[[^\[\]]*\]", " ", expr)        # ranges and subqueries
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", " ", expr)
    names = set()
    for m in _TOKEN.finditer(expr):
        ident = m.group("ident")
        if ident and not m.group("call") and ident not in _KEYWORDS:
            names.add(ident)
    return names


def _dashboard_queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for p in items:
            yield p
            yield from panels(p.get("panels", []))

    for panel in panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            yield f"panel {panel['title']!r} {target['refId']}", target["expr"]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]
            yield f"variable {var['name']}", query["query"] if isinstance(query, dict) else query


def _rule_queries(rules: dict[str, Any]) -> Iterator[tuple[str, str]]:
    for group in rules["groups"]:
        for rule in group["rules"]:
            yield f"rule {rule.get('alert') or rule.get('record')}", rule["expr"]


def exported(metrics_text: str) -> tuple[set[str], set[str]]:
    """(every family name with a # HELP line, the histogram ones among them)."""
    helps = set(re.findall(r"^# HELP (\S+) ", metrics_text, re.MULTILINE))
    histograms = set(re.findall(r"^# TYPE (\S+) histogram$", metrics_text, re.MULTILINE))
    return helps, histograms


def missing(names: set[str], helps: set[str], histograms: set[str]) -> set[str]:
    """The names that are neither an exported family nor a histogram's series."""
    def known(name: str) -> bool:
        if name in helps:
            return True
        base, _, suffix = name.rpartition("_")
        return suffix in ("bucket", "sum", "count") and base in histograms
    return {n for n in names if not known(n)}


@pytest.fixture(scope="module")
def scrape(server) -> str:
    response = httpx.get(server.url + "/metrics", timeout=60)
    assert response.status_code == 200, response.text
    return response.text


@pytest.fixture(scope="module")
def queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    rules = yaml.safe_load(RULES.read_text())
    return [*_dashboard_queries(dashboard), *_rule_queries(rules)]


def test_extractor_reads_promql():
    expr = ('histogram_quantile(0.99, sum by (le, dialect) (rate(imagegate_x_bucket{kind="generate", '
            'job=~"$job"}[$__rate_interval]))) / on(job) group_left() imagegate_y > 1e3 and imagegate_z offset 5m')
    assert metric_names(expr) == {"imagegate_x_bucket", "imagegate_y", "imagegate_z"}
    assert metric_names('label_values(imagegate_build_info{job=~"$job"}, instance)') == {"imagegate_build_info"}
    assert missing({"imagegate_nope", "imagegate_errors_total"}, {"imagegate_errors_total"}, set()) == {"imagegate_nope"}


def test_every_queried_metric_is_exported(scrape, queries):
    helps, histograms = exported(scrape)
    assert "imagegate_queue_images" in helps and "imagegate_request_duration_seconds" in histograms
    problems = {}
    for where, expr in queries:
        names = metric_names(expr)
        assert names, f"{where}: no metric found in {expr!r}"
        foreign = {n for n in names if not n.startswith("imagegate_")}
        lost = missing(names, helps, histograms)
        if foreign or lost:
            problems[where] = sorted(foreign | lost)
    assert problems == {}, f"queries name metrics the server does not export: {problems}"


def test_the_job_gauge_has_samples_for_every_async_dialect(scrape):
    """A family with a HELP line but no samples leaves its panel empty for good."""
    samples = dict(re.findall(r'^imagegate_jobs\{dialect="(\w+)",status="(\w+)"\} ', scrape,
                              re.MULTILINE))
    assert {"runpod", "dashscope", "alibaba", "modelslab"} <= set(samples), sorted(samples)


def test_dashboard_covers_what_operators_look_at(queries):
    dash = [e for w, e in queries if not w.startswith("rule")]
    used = set().union(*(metric_names(e) for e in dash))
    for base in ("imagegate_http_requests_total", "imagegate_errors_total", "imagegate_queue_images",
                 "imagegate_queue_requests", "imagegate_queue_wait_seconds_bucket",
                 "imagegate_batch_images_bucket", "imagegate_batch_duration_seconds_bucket",
                 "imagegate_denoise_step_seconds_bucket", "imagegate_images_generated_total",
                 "imagegate_encode_seconds_bucket", "imagegate_gpu_memory_bytes",
                 "imagegate_compiles_total", "imagegate_ready", "imagegate_started"):
        assert base in used, f"no dashboard panel queries {base}"
    latency = [e for e in dash if "imagegate_request_duration_seconds_bucket" in e]
    for kind in ("generate", "poll"):
        assert any(f'kind="{kind}"' in e and "dialect" in e for e in latency), f"no per-dialect {kind} latency"
    assert any("0.5" in e for e in latency) and any("0.99" in e for e in latency)
    assert any("by (dialect, cause)" in e for e in dash if "imagegate_errors_total" in e)


def test_rules_alert_on_saturation_errors_readiness_and_request_compiles():
    rules = {r["alert"]: r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    exprs = " ".join(r["expr"] for r in rules.values())
    assert 'imagegate_compiles_total{reason="request"}' in exprs
    assert 'cause="overload"' in exprs and "imagegate_queue_wait_seconds_bucket" in exprs
    assert "imagegate_ready" in exprs
    assert any("imagegate_errors_total" in r["expr"] and "imagegate_http_requests_total" in r["expr"]
               for r in rules.values()), "no error-rate alert"
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), name
        assert rule["annotations"]["summary"], name
