"""Parse ``/proc/<pid>/mountinfo`` (pure; imports nothing, so the shim can use it cheaply).

Reading a mount table never touches FUSE, so it is safe even when a
repository hangs: this is how cvmfsd looks at mounts.  Format (proc(5)):
``id parent major:minor root mountpoint options [optional...] - fstype source superoptions``,
with spaces, tabs, newlines and backslashes in paths escaped as octal ``\\NNN``.
"""

from __future__ import annotations

from typing import NamedTuple


class Mount(NamedTuple):
    """One line of a mountinfo file."""

    mount_id: int
    mountpoint: str
    fstype: str
    source: str
    options: str


def _unescape(text: str) -> str:
    if "\\" not in text:
        return text
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and text[i + 1:i + 4].isdigit():
            out.append(chr(int(text[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[Mount]:
    """Every well-formed line of a mountinfo text, in order; malformed lines are skipped."""
    mounts = []
    for line in text.splitlines():
        fields = line.split(" ")
        try:
            sep = fields.index("-", 6)
            mounts.append(Mount(int(fields[0]), _unescape(fields[4]), fields[sep + 1],
                                _unescape(fields[sep + 2]), fields[5]))
        except (ValueError, IndexError):
            continue
    return mounts


def fuse_mounts(text: str) -> dict[str, str]:
    """Mount point -> source of the FUSE mounts in a mountinfo text (the last one wins)."""
    return {m.mountpoint: m.source for m in parse_mountinfo(text)
            if m.fstype == "fuse" or m.fstype.startswith("fuse.")}


def mounts_under(text: str, prefix: str) -> list[Mount]:
    """The mounts at ``prefix`` or below it."""
    prefix = prefix.rstrip("/")
    return [m for m in parse_mountinfo(text)
            if m.mountpoint == prefix or m.mountpoint.startswith(prefix + "/")]
