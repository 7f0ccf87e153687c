"""Parse CernVM-FS configuration text, which is a shell fragment.

Real cvmfs configuration files (``default.conf``, ``default.local``,
``config.d/<repo>.conf``, and the temporary file ``mountrepo`` hands to
``cvmfs2 -o config=``) are sourced by a shell. This module reads the subset
that such files use, without running a shell:

- ``KEY=VALUE`` assignments, optionally prefixed by ``export``;
- values unquoted, in ``'single'`` quotes (literal) or ``"double"`` quotes;
- backslash escapes outside single quotes;
- ``$VAR``, ``${VAR}`` and ``${VAR:-default}`` expansion from keys assigned
  earlier (or from ``initial``); an unknown variable expands to ``""``;
- ``#`` comments (a whole line, or after whitespace);
- the last definition of a key wins.

Lines that are not assignments (``if``/``fi``, commands) are ignored, and so is
anything after the value's first unquoted blank, which a shell would run as a
command. The module is pure: no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

_ASSIGN = re.compile(r"\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def parse_config(text: str, initial: Mapping[str, str] | None = None) -> dict[str, str]:
    """Parse configuration text into a mapping; later assignments win.

    Args:
        text: the contents of one or more concatenated configuration files.
        initial: values visible to ``$VAR`` expansion before the first line
            (they are also part of the result unless overridden).

    Returns:
        Every assigned key with its expanded value.
    """
    values: dict[str, str] = dict(initial or {})
    for line in text.splitlines():
        match = _ASSIGN.match(line)
        if match is None:
            continue
        values[match.group(1)] = _value(line[match.end() :], values)
    return values


def _value(rest: str, env: Mapping[str, str]) -> str:
    """Expand one shell word (the text after ``KEY=``) up to an unquoted blank."""
    out: list[str] = []
    i = 0
    quote = ""
    while i < len(rest):
        ch = rest[i]
        if quote == "'":
            if ch == "'":
                quote = ""
            else:
                out.append(ch)
            i += 1
        elif ch == "\\" and i + 1 < len(rest):
            nxt = rest[i + 1]
            # Inside double quotes a backslash only escapes $ ` " \ (POSIX sh).
            if quote == '"' and nxt not in '$`"\\':
                out.append(ch)
            out.append(nxt)
            i += 2
        elif ch == "$":
            text, i = _expand(rest, i, env)
            out.append(text)
        elif ch == '"':
            quote = "" if quote else '"'
            i += 1
        elif ch == "'" and not quote:
            quote = "'"
            i += 1
        elif not quote and ch in " \t":
            break  # the rest is a command or a comment
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def _expand(rest: str, i: int, env: Mapping[str, str]) -> tuple[str, int]:
    """Expand the ``$`` reference at ``rest[i]``; return text and next index."""
    if rest.startswith("${", i):
        end = rest.find("}", i + 2)
        if end == -1:
            return rest[i:], len(rest)  # unterminated: keep it literally
        inner = rest[i + 2 : end]
        name, sep, default = inner.partition(":-")
        if not _NAME.fullmatch(name):
            return rest[i : end + 1], end + 1
        value = env.get(name, "")
        if sep and not value:
            value = default
        return value, end + 1
    match = _NAME.match(rest, i + 1)
    if match is None:
        return "$", i + 1
    return env.get(match.group(0), ""), match.end()
