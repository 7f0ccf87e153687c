"""Every PromQL query of grafana/: the dashboard's panels and variables, and the alert rules.

Grafana-agnostic helpers for tests that check the queries, offline (tests/test_grafana.py)
or against a real Prometheus scraping cvmfsd:

    from tests.dashboard_queries import runnable_queries
    for query in runnable_queries(rate_interval="1m"):
        result = prometheus_instant_query(query.expr)   # the caller's own client
        assert result, f"{query.source} {query.title!r} {query.ref}: no data"

runnable_queries() substitutes the dashboard's template variables textually (see
grafana/README.md, "Running the queries outside Grafana"): `$__rate_interval` becomes
the given interval, `$site`, `$repo` and `$instance` (always inside `=~"..."`) become
`.*`, and a variable's `label_values(METRIC, LABEL)` becomes `group by (LABEL) (METRIC)`.

An alert rule's expression returns data only while the alert's condition holds;
operands() splits an expression into the vector operands of its comparisons and set
operations (`and`, `or`, `unless`), and selectors(expr).vectors lists the selectors it
reads (`name{matchers}`): both can be queried on their own, in any state.

The rule files are read without a YAML library (none is a dependency): load_yaml()
reads the block-style subset that grafana/*.yml keep to (see the top of alerts.yml).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GRAFANA = Path(__file__).resolve().parent.parent / "grafana"
DASHBOARD = GRAFANA / "cvmfsd-dashboard.json"
ALERTS = GRAFANA / "alerts.yml"
ALERTS_TEST = GRAFANA / "alerts_test.yml"
README = GRAFANA / "README.md"

#: The dashboard variables a query may use, and what each becomes outside Grafana.
VARIABLES = {"site": ".*", "repo": ".*", "instance": ".*"}
RATE_INTERVAL = "$__rate_interval"


@dataclass(frozen=True)
class Query:
    """One PromQL query: where it comes from, as written, and runnable."""

    source: str    # "panel", "variable" or "alert"
    title: str     # the panel's title, the variable's name or the alert's name
    ref: str       # the target's refId; "query" for a variable, "expr" for an alert
    template: str  # as written in grafana/
    expr: str      # runnable against Prometheus

    def __str__(self) -> str:
        return f"{self.source} {self.title!r} {self.ref}"


# --------------------------------------------------------------------------- PromQL

_TOKEN = re.compile(r"""
    (?P<space>\s+)
  | (?P<comment>\#[^\n]*)
  | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
  | (?P<duration>(?:\d+(?:ms|[smhdwy]))+)(?![\w:])
  | (?P<number>0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)
  | (?P<variable>\$\w+|\$\{\w+\})
  | (?P<ident>[A-Za-z_][\w:]*)
  | (?P<op>==|!=|>=|<=|=~|!~|[-+*/%^<>=(){}\[\],:@])
""", re.VERBOSE)

AGGREGATIONS = frozenset({
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
    "bottomk", "topk", "quantile"})
SET_OPERATORS = frozenset({"and", "or", "unless"})
COMPARISONS = frozenset({"==", "!=", ">", "<", ">=", "<="})
LABEL_LISTS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
KEYWORDS = AGGREGATIONS | SET_OPERATORS | LABEL_LISTS | {
    "bool", "offset", "atan2", "inf", "nan", "start", "end"}
_OPEN = {"(": ")", "{": "}", "[": "]"}
_MATCH_OPS = frozenset({"=", "!=", "=~", "!~"})


@dataclass(frozen=True)
class Token:
    kind: str
    text: str
    start: int
    end: int


def tokens(expr: str) -> list[Token]:
    """The PromQL tokens of expr, without spaces and comments."""
    out: list[Token] = []
    pos = 0
    while pos < len(expr):
        match = _TOKEN.match(expr, pos)
        if match is None:
            raise ValueError(f"cannot read PromQL at {expr[pos:pos + 20]!r} in {expr!r}")
        kind = match.lastgroup or ""
        if kind not in ("space", "comment"):
            out.append(Token(kind, match.group(), match.start(), match.end()))
        pos = match.end()
    return out


def _closing(toks: list[Token], i: int) -> int:
    """The index of the bracket that closes the one at toks[i]."""
    stack = [_OPEN[toks[i].text]]
    for j in range(i + 1, len(toks)):
        text = toks[j].text
        if toks[j].kind != "op":
            continue
        if text in _OPEN:
            stack.append(_OPEN[text])
        elif text in (")", "}", "]"):
            if text != stack.pop():
                raise ValueError(f"mismatched {text!r} at {toks[j].start}")
            if not stack:
                return j
    raise ValueError(f"unclosed {toks[i].text!r} at {toks[i].start}")


@dataclass(frozen=True)
class Selector:
    """What an expression reads: metric names, label names, and label matchers."""

    metrics: frozenset[str]
    labels: frozenset[str]
    matchers: tuple[tuple[str, str, str], ...]  # (label, operator, value)
    vectors: tuple[str, ...]   # each instant selector as written: `name{matchers}`


def selectors(expr: str) -> Selector:
    """The metric names (identifiers before `{` or `[` or standing alone, that are not
    functions or keywords), the label names (in matchers and in by/without/on/ignoring/
    group_left/group_right lists), the label matchers and the selectors of expr."""
    toks = tokens(expr)
    metrics: set[str] = set()
    labels: set[str] = set()
    matchers: list[tuple[str, str, str]] = []
    vectors: list[str] = []
    i = 0
    while i < len(toks):
        tok = toks[i]
        nxt = toks[i + 1] if i + 1 < len(toks) else None
        if tok.text == "{":
            end = _closing(toks, i)
            for label, op, value in _matchers(toks[i + 1:end], expr):
                labels.add(label)
                matchers.append((label, op, value))
            i = end + 1
        elif tok.text == "[":
            i = _closing(toks, i) + 1
        elif tok.kind == "ident" and tok.text.lower() in LABEL_LISTS:
            if nxt is not None and nxt.text == "(":
                end = _closing(toks, i + 1)
                labels.update(t.text for t in toks[i + 2:end] if t.kind == "ident")
                i = end + 1
            else:
                i += 1
        elif tok.kind == "ident":
            is_call = nxt is not None and nxt.text == "("
            if not is_call and tok.text.lower() not in KEYWORDS:
                metrics.add(tok.text)
                end = _closing(toks, i + 1) if nxt is not None and nxt.text == "{" else i
                vector = expr[tok.start:toks[end].end]
                if vector not in vectors:
                    vectors.append(vector)
            i += 1
        else:
            i += 1
    return Selector(frozenset(metrics), frozenset(labels), tuple(matchers), tuple(vectors))


def _matchers(inner: list[Token], expr: str) -> Iterator[tuple[str, str, str]]:
    """The label matchers between a selector's braces: label op "value" [,] ..."""
    for k in range(0, len(inner), 4):
        if len(inner[k:k + 3]) < 3:
            raise ValueError(f"unexpected label matcher in {expr!r}")
        label, op, value = inner[k:k + 3]
        if label.kind != "ident" or op.text not in _MATCH_OPS or value.kind != "string":
            raise ValueError(f"unexpected label matcher near {label.text!r} in {expr!r}")
        yield label.text, op.text, _unquote(value.text)


def _unquote(text: str) -> str:
    """A PromQL string literal's value (Go escapes, close enough to JSON's for ours)."""
    if text.startswith('"'):
        try:
            return str(json.loads(text))
        except ValueError:
            pass
    return text[1:-1]


def operands(expr: str) -> list[str]:
    """The operands of expr's top-level comparisons and set operations, recursively,
    without number literals: for `(a < 0.5) and on (x) b > 1` that is [`a`, `b`]."""
    text = expr.strip()
    toks = tokens(text)
    while toks and toks[0].text == "(" and _closing(toks, 0) == len(toks) - 1:
        text = text[toks[0].end:toks[-1].start].strip()
        toks = tokens(text)
    cuts: list[tuple[int, int]] = []   # character spans of the operators and modifiers
    i = 0
    while i < len(toks):
        tok = toks[i]
        if tok.kind == "op" and tok.text in _OPEN:
            i = _closing(toks, i) + 1
            continue
        is_split = ((tok.kind == "op" and tok.text in COMPARISONS)
                    or (tok.kind == "ident" and tok.text.lower() in SET_OPERATORS))
        if not is_split:
            i += 1
            continue
        start, j = tok.start, i + 1
        while j < len(toks) and toks[j].kind == "ident" and toks[j].text.lower() in (
                "bool", "on", "ignoring", "group_left", "group_right"):
            j += 1
            if j < len(toks) and toks[j].text == "(":
                j = _closing(toks, j) + 1
        cuts.append((start, toks[j - 1].end))
        i = j
    if not cuts:
        return [] if all(t.kind == "number" for t in toks) else [text]
    parts: list[str] = []
    begin = 0
    for start, end in cuts:
        parts.append(text[begin:start])
        begin = end
    parts.append(text[begin:])
    return [leaf for part in parts for leaf in operands(part)]


def substitute(expr: str, rate_interval: str = "1m") -> str:
    """expr with the dashboard's template variables replaced (see the module's doc)."""
    out = expr.replace(RATE_INTERVAL, rate_interval)
    return re.sub(r"\$(\w+)\b", lambda m: VARIABLES.get(m.group(1), m.group()), out)


_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(?P<metric>.+?)\s*,\s*(?P<label>\w+)\s*\)\s*$",
                           re.DOTALL)


def variable_expr(query: str) -> str:
    """The PromQL for a Grafana `label_values(METRIC, LABEL)` variable query."""
    match = _LABEL_VALUES.match(query)
    if match is None:
        raise ValueError(f"not a label_values(METRIC, LABEL) query: {query!r}")
    return f"group by ({match['label']}) ({match['metric']})"


# --------------------------------------------------------------------------- dashboard

def load_dashboard(path: Path = DASHBOARD) -> dict[str, Any]:
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a JSON object")
    return data


def all_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows included, with the panels of collapsed rows."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def variable_query(variable: dict[str, Any]) -> str:
    query = variable.get("query", "")
    return str(query.get("query", "") if isinstance(query, dict) else query)


def dashboard_queries(path: Path = DASHBOARD, rate_interval: str = "1m") -> list[Query]:
    """The dashboard's panel targets and query variables, runnable."""
    dashboard = load_dashboard(path)
    out = [Query("panel", panel.get("title", ""), target.get("refId", ""), target["expr"],
                 substitute(target["expr"], rate_interval))
           for panel in all_panels(dashboard) for target in panel.get("targets", [])]
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            query = variable_query(variable)
            out.append(Query("variable", variable["name"], "query", query,
                             substitute(variable_expr(query), rate_interval)))
    return out


# --------------------------------------------------------------------------- rules

def load_yaml(text: str) -> Any:
    """Read the YAML subset of grafana/*.yml: block mappings and sequences, `|` block
    scalars, plain and quoted one-line scalars, `[]` and `{}`.  Every scalar is a str."""
    return _Yaml(text).document()


class _Yaml:
    def __init__(self, text: str) -> None:
        self.lines = text.splitlines()
        self.i = 0

    def error(self, what: str) -> ValueError:
        line = self.lines[self.i] if self.i < len(self.lines) else "(end of file)"
        return ValueError(f"line {self.i + 1}: {what}: {line!r}")

    def peek(self) -> tuple[int, str] | None:
        while self.i < len(self.lines):
            line = self.lines[self.i]
            if "\t" in line[:len(line) - len(line.lstrip())]:
                raise self.error("tab in indentation")
            stripped = line.strip()
            if stripped and not stripped.startswith("#"):
                return len(line) - len(line.lstrip(" ")), stripped
            self.i += 1
        return None

    def document(self) -> Any:
        first = self.peek()
        if first is None:
            return None
        node = self.node(first[0])
        if self.peek() is not None:
            raise self.error("unexpected indentation")
        return node

    def node(self, indent: int) -> Any:
        peeked = self.peek()
        assert peeked is not None
        if peeked[1] == "-" or peeked[1].startswith("- "):
            return self.sequence(indent)
        return self.mapping(indent)

    def sequence(self, indent: int) -> list[Any]:
        items: list[Any] = []
        while (peeked := self.peek()) and peeked[0] == indent and (
                peeked[1] == "-" or peeked[1].startswith("- ")):
            rest = peeked[1][1:].strip()
            if not rest:
                self.i += 1
                child = self.peek()
                if child is None or child[0] <= indent:
                    raise self.error("empty sequence item")
                items.append(self.node(child[0]))
            elif _KEY.match(rest):
                # "- key: value": a mapping whose first key sits after the dash
                self.lines[self.i] = " " * (indent + 2) + rest
                items.append(self.mapping(indent + 2))
            else:
                self.i += 1
                items.append(self.scalar(rest))
        if peeked is not None and peeked[0] > indent:
            raise self.error("unexpected indentation")
        return items

    def mapping(self, indent: int) -> dict[str, Any]:
        result: dict[str, Any] = {}
        while (peeked := self.peek()) and peeked[0] == indent and not (
                peeked[1] == "-" or peeked[1].startswith("- ")):
            match = _KEY.match(peeked[1])
            if match is None:
                raise self.error("expected `key: value`")
            key, rest = match["key"], _strip_comment(match["rest"])
            if key in result:
                raise self.error(f"duplicate key {key!r}")
            self.i += 1
            if rest in ("|", "|-"):
                result[key] = self.block_scalar(indent, keep_newline=rest == "|")
            elif rest:
                result[key] = self.scalar(rest)
            else:
                child = self.peek()
                if child is not None and (child[0] > indent or (
                        child[0] == indent and child[1].startswith("- "))):
                    result[key] = self.node(child[0])
                else:
                    result[key] = None
        if peeked is not None and peeked[0] > indent:
            raise self.error("unexpected indentation")
        return result

    def block_scalar(self, indent: int, *, keep_newline: bool) -> str:
        body: list[str] = []
        content_indent: int | None = None
        while self.i < len(self.lines):
            line = self.lines[self.i]
            if line.strip():
                here = len(line) - len(line.lstrip(" "))
                if here <= indent:
                    break
                if content_indent is None:
                    content_indent = here
                if here < content_indent:
                    raise self.error("block scalar line indented less than its first")
                body.append(line[content_indent:])
            else:
                body.append("")
            self.i += 1
        while body and not body[-1]:
            body.pop()
        return "\n".join(body) + ("\n" if keep_newline and body else "")

    def scalar(self, text: str) -> Any:
        if text in ("[]", "{}"):
            return [] if text == "[]" else {}
        if text[0] in "[{&*!>|%@`":
            raise self.error("unsupported YAML")
        if text[0] == "'":
            match = re.fullmatch(r"'((?:[^']|'')*)'\s*(#.*)?", text)
            if match is None:
                raise self.error("bad single-quoted scalar")
            return match[1].replace("''", "'")
        if text[0] == '"':
            match = re.fullmatch(r'"((?:[^"\\]|\\.)*)"\s*(#.*)?', text)
            if match is None:
                raise self.error("bad double-quoted scalar")
            return str(json.loads(f'"{match[1]}"'))
        return _strip_comment(text)


_KEY = re.compile(r"^(?P<key>[A-Za-z_][\w.-]*):(?:\s+(?P<rest>.*))?$")


def _strip_comment(text: str | None) -> str:
    if not text:
        return ""
    if text.startswith(("'", '"')):
        return text
    return re.split(r"\s+#", text, maxsplit=1)[0].strip()


def load_rules(path: Path = ALERTS) -> list[dict[str, Any]]:
    """Every rule of a Prometheus rule file, each with its group's name as `group`."""
    data = load_yaml(path.read_text())
    return [{**rule, "group": group["name"]}
            for group in data["groups"] for rule in group["rules"]]


def alert_queries(path: Path = ALERTS) -> list[Query]:
    """The alert rules' expressions (they use no template variables)."""
    return [Query("alert", rule["alert"], "expr", rule["expr"], rule["expr"].strip())
            for rule in load_rules(path) if "alert" in rule]


def runnable_queries(rate_interval: str = "1m") -> list[Query]:
    """Every panel query, variable query and alert expression, runnable as they stand."""
    return dashboard_queries(rate_interval=rate_interval) + alert_queries()


# --------------------------------------------------------------------------- README

@dataclass(frozen=True)
class Documented:
    """The metric families and labels grafana/README.md documents."""

    types: dict[str, str]          # family name (or `process_` for `process_*`) -> type
    labels: frozenset[str]
    values: dict[str, frozenset[str]]   # label -> its documented values, where listed

    def series_names(self) -> frozenset[str]:
        """The names a query can select: histograms only by their _bucket, _sum, _count."""
        names: set[str] = {"up"}
        for name, kind in self.types.items():
            if kind == "histogram":
                names.update(f"{name}{suffix}" for suffix in ("_bucket", "_sum", "_count"))
            else:
                names.add(name)
        return frozenset(names)

    def knows(self, metric: str) -> bool:
        if metric in self.series_names():
            return True
        return "process_" in self.types and metric.startswith("process_")


_CELL_SPLIT = re.compile(r"(?<!\\)\|")


def documented(path: Path = README) -> Documented:
    """Read the metric tables of grafana/README.md (`| name | type | ... |`)."""
    types: dict[str, str] = {}
    labels: set[str] = {"instance", "job", "le"}
    values: dict[str, frozenset[str]] = {}
    header: list[str] = []
    for line in path.read_text().splitlines():
        if not line.startswith("|"):
            header = []
            continue
        cells = [cell.strip() for cell in _CELL_SPLIT.split(line.strip())[1:-1]]
        if not header:
            header = [cell.lower() for cell in cells]
            continue
        if set("".join(cells)) <= set("-: "):
            continue
        row = dict(zip(header, cells))
        kind = row.get("type", "").split(" ")[0]
        for name in re.findall(r"`([^`]+)`", row.get("name", "")):
            base, _, brace = name.partition("{")
            base = base.removesuffix("*")
            types[base] = kind
            labels.update(re.findall(r"(\w+)(?:=|,|\})", brace))
            meaning = row.get("meaning", "")
            for label in re.findall(r"\w+", row.get("labels", "")):
                labels.add(label)
                listed = [word for word in re.findall(r"`([^`]+)`", meaning) if " " in word]
                if label in ("state", "phase") and listed:
                    values[label] = frozenset(listed[0].split())
    return Documented(types, frozenset(labels), values)
