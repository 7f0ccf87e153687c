"""Parse ``/proc/<pid>/mountinfo`` (pure; imports only collections, which every
interpreter has loaded by then: the shim uses it on the payload's critical path).

Reading a mount table never touches FUSE, so it is safe even when a
repository hangs: this is how cvmfsd looks at mounts.  Format (proc(5)):
``id parent major:minor root mountpoint options [optional...] - fstype source superoptions``,
with spaces, tabs, newlines and backslashes in paths escaped as octal ``\\NNN``.

How a CVMFS mount is recognised (the one rule, used everywhere a mount is
judged): a mount at the expected mount point whose fstype is ``fuse`` or
``fuse.*`` (:func:`is_fuse`), whose root then answers the ``user.fqrn`` xattr
with the repository's name (:func:`cvmfsd.shim.verify_repo`, or the probe
worker).  Never the source: a cvmfsexec mount reads ``fuse /dev/fuse``
(cvmfs2 mounts without ``fsname``), a system mount by ``mount.cvmfs`` reads
``fuse cvmfs2``; see tests/test_fidelity_mounts.py for the upstream lines.
"""

from __future__ import annotations

from collections import namedtuple

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (2 ms of the shim's start)
if TYPE_CHECKING:
    from typing import NamedTuple

    class Mount(NamedTuple):
        """One line of a mountinfo file."""

        mount_id: int
        mountpoint: str
        fstype: str
        source: str
        options: str
else:
    Mount = namedtuple("Mount", "mount_id mountpoint fstype source options")
    Mount.__doc__ = "One line of a mountinfo file."


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


def is_fuse(fstype: str) -> bool:
    """Whether a mountinfo fstype is FUSE's: ``fuse``, or ``fuse.<subtype>``."""
    return fstype == "fuse" or fstype.startswith("fuse.")


def fuse_mounts(text: str) -> dict[str, Mount]:
    """Mount point -> the FUSE mount there, in a mountinfo text (the last, topmost, one wins)."""
    return {m.mountpoint: m for m in parse_mountinfo(text) if is_fuse(m.fstype)}


def mounts_under(text: str, prefix: str) -> list[Mount]:
    """The mounts at ``prefix`` or below it."""
    prefix = prefix.rstrip("/")
    return [m for m in parse_mountinfo(text)
            if m.mountpoint == prefix or m.mountpoint.startswith(prefix + "/")]
