"""grafana/: the alert rules pass promtool and their unit tests; the dashboard is sound.

Every query must read only metrics documented in grafana/README.md and use template
variables only in forms that tests/dashboard_queries.py can substitute, so that a test
with a real Prometheus can run every query of the dashboard and the rules.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests import dashboard_queries as dq

PROMTOOL = Path("/usr/bin/promtool")
ROOT = dq.GRAFANA.parent
ALLOWED_VARIABLE_FORMS = {'"$site"', '"$repo"', '"$instance"'}
UNITS = {"s", "bytes", "Bps", "percentunit", "none", "short", "ops", "cps", "reqps"}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    if not (PROMTOOL.is_file() and os.access(PROMTOOL, os.X_OK)):
        pytest.fail(f"{PROMTOOL} is missing: install Debian's prometheus package "
                    "(apt-get install prometheus; .ci/setup does) to check grafana/")
    return subprocess.run([str(PROMTOOL), *args], capture_output=True, text=True,
                          timeout=120, check=False, cwd=ROOT)


@pytest.fixture(name="dashboard", scope="module")
def _dashboard() -> dict[str, Any]:
    return dq.load_dashboard()


@pytest.fixture(name="rules", scope="module")
def _rules() -> list[dict[str, Any]]:
    return dq.load_rules()


@pytest.fixture(name="alerts", scope="module")
def _alerts(rules: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {rule["alert"]: rule for rule in rules if "alert" in rule}


@pytest.fixture(name="documented", scope="module")
def _documented() -> dq.Documented:
    return dq.documented()


def queries_of(panel: dict[str, Any]) -> list[str]:
    return [target.get("expr", "") for target in panel.get("targets", [])]


def rows(dashboard: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """The panels under each row, by the row's title."""
    out: dict[str, list[dict[str, Any]]] = {}
    current: list[dict[str, Any]] = []
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            current = out.setdefault(panel["title"], [])
            current.extend(panel.get("panels", []))
        else:
            current.append(panel)
    return out


# --------------------------------------------------------------------------- rules

def test_promtool_checks_the_rules(rules: list[dict[str, Any]]) -> None:
    """promtool accepts alerts.yml, and finds as many rules as load_rules() reads."""
    result = promtool("check", "rules", "grafana/alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout, result.stdout


def test_promtool_rule_unit_tests_pass() -> None:
    result = promtool("test", "rules", "grafana/alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout and "FAILED" not in result.stdout + result.stderr


def test_a_missing_promtool_fails_clearly(monkeypatch: pytest.MonkeyPatch,
                                          tmp_path: Path) -> None:
    monkeypatch.setattr(f"{__name__}.PROMTOOL", tmp_path / "promtool")
    with pytest.raises(pytest.fail.Exception, match="promtool is missing: install"):
        promtool("--version")


@pytest.mark.parametrize(("alert", "old", "new"), [
    # failures older than 30 minutes count
    ("CvmfsMountFailing", '{result!="ok"} offset 30m', '{result!="ok"} offset 90m'),
    # hung repositories count as down too
    ("CvmfsRepositoryDown", 'cvmfs_mount_state{state!="hung"} == 1', "cvmfs_mount_state == 1"),
    # no warm-up
    ("CvmfsHitRatioCollapsing", "process_start_time_seconds > 3600",
     "process_start_time_seconds > 0"),
    # a counter reset taken for a rise
    ("CvmfsIOErrorsRising", "(increase(cvmfs_io_errors_total[10m])) > 0",
     "(delta(cvmfs_io_errors_total[10m])) != 0"),
    # a clean stop counts as down
    ("CvmfsdDown", 'max_over_time(cvmfsd_phase{phase=~"stopping|done"}[30m]) == 1',
     "vector(0) == 1"),
])
def test_the_rule_unit_tests_catch_a_broken_rule(tmp_path: Path, alert: str, old: str,
                                                 new: str) -> None:
    rules = dq.ALERTS.read_text()
    assert old in rules, old
    (tmp_path / "alerts.yml").write_text(rules.replace(old, new))
    (tmp_path / "alerts_test.yml").write_text(dq.ALERTS_TEST.read_text())
    result = promtool("test", "rules", str(tmp_path / "alerts_test.yml"))
    assert result.returncode != 0, result.stdout
    assert f"alertname: {alert}, time:" in result.stdout + result.stderr, result.stdout


def test_the_alerts_asked_for_exist(alerts: dict[str, dict[str, Any]]) -> None:
    assert set(alerts) >= {
        "CvmfsMountFailing", "CvmfsRepositoryDown", "CvmfsRepositoryHung",
        "CvmfsHitRatioCollapsing", "CvmfsIOErrorsRising", "CvmfsdDown"}


def test_every_alert_is_tested_firing_and_not_firing(
        alerts: dict[str, dict[str, Any]]) -> None:
    """Each alert has a unit test where it fires (labels and rendered annotations
    expected) and one where it is evaluated and must not fire."""
    tests = dq.load_yaml(dq.ALERTS_TEST.read_text())
    assert tests["rule_files"] == ["alerts.yml"]
    firing: set[str] = set()
    silent: set[str] = set()
    for case in (case for group in tests["tests"] for case in group["alert_rule_test"]):
        name = case["alertname"]
        assert name in alerts, f"alerts_test.yml tests an unknown alert {name!r}"
        if case["exp_alerts"]:
            firing.add(name)
            for expected in case["exp_alerts"]:
                assert expected["exp_labels"]["severity"] == alerts[name]["labels"]["severity"]
                assert set(expected["exp_annotations"]) == set(alerts[name]["annotations"])
        else:
            silent.add(name)
    assert set(alerts) - firing == set(), "alerts never tested firing"
    assert set(alerts) - silent == set(), "alerts never tested not firing"


def test_alert_rules_have_severity_summary_and_description(
        alerts: dict[str, dict[str, Any]]) -> None:
    for name, rule in alerts.items():
        assert re.fullmatch(r"Cvmfsd?[A-Z]\w+", name), name
        assert rule["labels"]["severity"] in ("critical", "warning"), name
        assert set(rule["annotations"]) == {"summary", "description"}, name
        assert re.fullmatch(r"\d+[mh]", rule["for"]), name
        # every label a template names is one the alert can have
        expr_labels = dq.selectors(rule["expr"]).labels | {"instance", "job"}
        for label in re.findall(r"\$labels\.(\w+)", str(rule["annotations"])):
            assert label in expr_labels, f"{name} annotations use $labels.{label}"


# --------------------------------------------------------------------------- dashboard

def test_dashboard_is_a_grafana_dashboard(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == "cvmfsd"
    assert dashboard["title"]
    assert 36 <= dashboard["schemaVersion"] <= 41
    assert "id" not in dashboard or dashboard["id"] is None, "an import must not carry an id"
    assert set(rows(dashboard)) == {"Fleet", "Pilot"}


def test_every_panel_has_the_datasource_variable_and_queries(
        dashboard: dict[str, Any]) -> None:
    ids: list[int] = []
    for panel in dq.all_panels(dashboard):
        ids.append(panel["id"])
        if panel["type"] == "row":
            assert not panel.get("targets"), panel["title"]
            continue
        where = f"panel {panel['title']!r}"
        assert panel["title"] and panel.get("description"), where
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, where
        targets = panel.get("targets", [])
        assert targets, f"{where} has no target"
        for target in targets:
            assert target.get("expr", "").strip(), f"{where} target {target.get('refId')}"
            assert target.get("datasource", panel["datasource"]) == panel["datasource"], where
        refs = [target["refId"] for target in targets]
        assert len(refs) == len(set(refs)), f"{where} repeats a refId"
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit")
        assert panel["type"] == "table" or unit in UNITS, f"{where}: unit {unit!r}"
    assert len(ids) == len(set(ids)), "panel ids repeat"


def test_panels_fit_the_grid_without_overlapping(dashboard: dict[str, Any]) -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in dq.all_panels(dashboard):
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["w"] > 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps {cells[x, y]!r}"
                cells[x, y] = panel["title"]


def test_variables(dashboard: dict[str, Any]) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert set(variables) == {"datasource", "site", "instance", "repo"}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    queries = {name: dq.variable_query(v) for name, v in variables.items() if name != "datasource"}
    assert queries == {
        "site": "label_values(cvmfsd_pilot_info, site)",
        "instance": 'label_values(cvmfsd_pilot_info{site=~"$site"}, instance)',
        "repo": "label_values(cvmfs_mount_up, repo)",
    }
    for name in ("site", "instance", "repo"):
        variable = variables[name]
        assert variable["type"] == "query"
        assert variable["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        if variable.get("includeAll"):
            # what Grafana sends for "All" is what the substitution uses
            assert variable["allValue"] == dq.VARIABLES[name], name


def test_template_variables_only_in_substitutable_forms(dashboard: dict[str, Any]) -> None:
    """`$site`, `$repo` and `$instance` only as a whole `=~` matcher value, and
    `$__rate_interval` only as a whole range: nothing else is left after substitute()."""
    for panel in dq.all_panels(dashboard):
        for expr in queries_of(panel):
            toks = dq.tokens(expr)
            for k, tok in enumerate(toks):
                if tok.kind == "variable":
                    assert tok.text == dq.RATE_INTERVAL, f"{panel['title']!r}: {tok.text}"
                    assert (toks[k - 1].text, toks[k + 1].text) == ("[", "]"), panel["title"]
                elif tok.kind == "string" and "$" in tok.text:
                    assert tok.text in ALLOWED_VARIABLE_FORMS, f"{panel['title']!r}: {tok.text}"
                    assert toks[k - 1].text == "=~", f"{panel['title']!r}: {tok.text} needs =~"
            assert "$" not in dq.substitute(expr), panel["title"]


def test_fleet_queries_follow_the_site_and_pilot_queries_the_instance(
        dashboard: dict[str, Any]) -> None:
    by_row = rows(dashboard)
    for panel in by_row["Fleet"]:
        for expr in queries_of(panel):
            assert "$instance" not in expr, panel["title"]
            # only `up` cannot be sliced by site (a target that is down has no labels)
            assert "$site" in expr or dq.selectors(expr).metrics == {"up"}, (
                f"{panel['title']!r}: {expr}")
    for panel in by_row["Pilot"]:
        for expr in queries_of(panel):
            assert "$instance" in expr, f"{panel['title']!r}: {expr}"


def test_the_fleet_view_shows_what_was_asked_for(dashboard: dict[str, Any]) -> None:
    fleet = "\n".join(expr for panel in rows(dashboard)["Fleet"] for expr in queries_of(panel))
    for needle in (
            'cvmfs_mount_attempts_total{result="ok"',
            *(f"histogram_quantile({q}, sum by (le) (cvmfs_mount_setup_duration_seconds_bucket"
              for q in ("0.5", "0.9", "0.99")),
            "1 - sum by (repo) (rate(cvmfs_fetch_downloads_total",
            "rate(cvmfs_net_rx_bytes_total", "rate(cvmfs_io_errors_total",
            "sum by (state) (cvmfs_mount_state", "cvmfs_repo_revision",
            "cvmfs_mount_probe_timeouts_total", "count by (mode) (cvmfsd_mode_info",
            'up{job="cvmfsd"}', "cvmfsd_processes_killed_total", "cvmfs_remounts_total",
            'group_left (site) cvmfsd_pilot_info{site=~"$site"}'):
        assert needle in fleet, needle


# --------------------------------------------------------------------------- names

def test_every_query_reads_documented_metrics_and_labels(documented: dq.Documented) -> None:
    """Metric names (histograms only as _bucket/_sum/_count), label names and the
    documented values of `state` and `phase`, as grafana/README.md lists them."""
    assert len(documented.types) > 40, "the README's metric tables were not found"
    for query in dq.runnable_queries():
        found = dq.selectors(query.expr)
        assert found.metrics, f"{query}: reads no metric"
        unknown = {name for name in found.metrics if not documented.knows(name)}
        assert not unknown, f"{query}: undocumented metrics {sorted(unknown)}"
        assert found.labels <= documented.labels, (
            f"{query}: unknown labels {sorted(found.labels - documented.labels)}")
        for label, _op, value in found.matchers:
            if label in documented.values:
                assert set(value.split("|")) <= documented.values[label], f"{query}: {value}"


def test_legends_name_known_labels(dashboard: dict[str, Any],
                                   documented: dq.Documented) -> None:
    for panel in dq.all_panels(dashboard):
        for target in panel.get("targets", []):
            for label in re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")):
                assert label in documented.labels, f"{panel['title']!r}: {{{{{label}}}}}"


def test_the_readme_documents_the_alerts_and_the_substitutions(
        alerts: dict[str, dict[str, Any]]) -> None:
    readme = dq.README.read_text()
    for name in alerts:
        assert f"`{name}`" in readme, name
    for form in ("`$__rate_interval`", "`$site`", "`$repo`", "`$instance`", "runnable_queries"):
        assert form in readme, form


# --------------------------------------------------------------------------- runnable

def test_runnable_queries_cover_every_query(dashboard: dict[str, Any],
                                            alerts: dict[str, dict[str, Any]]) -> None:
    queries = dq.runnable_queries(rate_interval="30s")
    targets = sum(len(queries_of(panel)) for panel in dq.all_panels(dashboard))
    assert [q.source for q in queries].count("panel") == targets
    assert {q.title for q in queries if q.source == "variable"} == {"site", "instance", "repo"}
    assert {q.title for q in queries if q.source == "alert"} == set(alerts)
    for query in queries:
        assert "$" not in query.expr, query
        assert "[30s]" in query.expr or "$__rate_interval" not in query.template, query
    instance = next(q for q in queries if q.source == "variable" and q.title == "instance")
    assert instance.expr == 'group by (instance) (cvmfsd_pilot_info{site=~".*"})'


def test_promtool_parses_every_runnable_query(tmp_path: Path) -> None:
    """Each runnable query, as a recording rule: promtool parses its PromQL."""
    lines = ["groups:", "  - name: dashboard", "    rules:"]
    queries = dq.runnable_queries()
    for k, query in enumerate(queries):
        lines += [f"      - record: query:{k}", "        expr: |"]
        lines += [f"          {line}" for line in query.expr.splitlines()]
    path = tmp_path / "queries.yml"
    path.write_text("\n".join(lines) + "\n")
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(queries)} rules found" in result.stdout


def test_alert_operands_and_selectors_are_queries_of_their_own() -> None:
    for query in dq.alert_queries():
        parts = dq.operands(query.expr)
        assert parts, query
        for part in parts:
            assert dq.selectors(part).metrics, f"{query}: {part!r}"
        assert all(dq.selectors(v).vectors == (v,) for v in dq.selectors(query.expr).vectors)


# --------------------------------------------------------------------------- helpers

@pytest.mark.parametrize(("expr", "metrics", "labels"), [
    ('sum by (repo) (rate(a_total{repo=~"$repo"}[$__rate_interval]))', {"a_total"}, {"repo"}),
    ("histogram_quantile(0.9, sum by (le) (b_bucket)) > bool 1", {"b_bucket"}, {"le"}),
    ('x * on (instance, job) group_left (site) info{site=~"a|b"}', {"x", "info"},
     {"instance", "job", "site"}),
    ("time() - ts offset 5m", {"ts"}, set()),
    ("sum(x) without (mode) or vector(0)", {"x"}, {"mode"}),
    ("max_over_time(g[1h30m:1m])", {"g"}, set()),
])
def test_selectors(expr: str, metrics: set[str], labels: set[str]) -> None:
    found = dq.selectors(expr)
    assert (set(found.metrics), set(found.labels)) == (metrics, labels)


@pytest.mark.parametrize(("expr", "parts"), [
    ("a > 0", ["a"]),
    ("(a < 0.5) and on (x) b > bool 1", ["a", "b"]),
    ("a == 0 unless on (i) group_left (s) (b == 1 or c)", ["a", "b", "c"]),
    ("time() - ts > 300", ["time() - ts"]),
    ("sum by (x) (rate(a[5m]) > 0)", ["sum by (x) (rate(a[5m]) > 0)"]),
    ('up{job="a>b"} != 1', ['up{job="a>b"}']),
])
def test_operands(expr: str, parts: list[str]) -> None:
    assert dq.operands(expr) == parts


def test_substitute() -> None:
    assert (dq.substitute('rate(a{repo=~"$repo", instance=~"$instance"}[$__rate_interval])',
                          "15s")
            == 'rate(a{repo=~".*", instance=~".*"}[15s])')
    assert dq.substitute('a{site=~"$site"}') == 'a{site=~".*"}'
    assert dq.substitute("$unknown") == "$unknown"


def test_load_yaml_reads_the_subset() -> None:
    text = (
        "# comment\n"
        "top:\n"
        "  - name: g   # trailing comment\n"
        "    rules:\n"
        "      - expr: |\n"
        "          a\n"
        "\n"
        "            > 1\n"
        "        list: []\n"
        "        quoted: 'it''s {x=\"1\"}'\n"
        "        double: \"a \\\"b\\\" # not a comment\"\n"
        "  - plain\n"
        "seq:\n"
        "- 1m\n"
    )
    assert dq.load_yaml(text) == {
        "top": [{"name": "g", "rules": [{"expr": "a\n\n  > 1\n", "list": [],
                                         "quoted": 'it\'s {x="1"}',
                                         "double": 'a "b" # not a comment'}]},
                "plain"],
        "seq": ["1m"],
    }


@pytest.mark.parametrize("text", [
    "a: 1\n  b: 2\n",          # indented under a scalar
    "a:\n\t- 1\n",             # tab
    "a: {b: 1}\n",             # flow mapping
    "a: 1\na: 2\n",            # duplicate key
    "a: 'open\n",              # unclosed quote
])
def test_load_yaml_refuses_what_it_does_not_read(text: str) -> None:
    with pytest.raises(ValueError, match="line"):
        dq.load_yaml(text)
