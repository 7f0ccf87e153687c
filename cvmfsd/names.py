"""Repository names: the one rule every part of cvmfsd applies.

A repository name ends up in paths (``/cvmfs/<repo>``, ``dist/cvmfs/<repo>``,
``cvmfs_io.<repo>``) and on shell command lines (cvmfsexec, mountrepo), so it
must never be able to become a path or a shell word.
"""

from __future__ import annotations

import re

_REPO = re.compile(r"[a-z0-9][a-z0-9-]*(\.[a-z0-9][a-z0-9-]*)+")
MAX_LENGTH = 255


def repo_name_problem(name: object) -> str | None:
    """None if ``name`` is a safe repository name, else what is wrong with it.

    Allowed: lowercase letters, digits, ``-`` and ``.``, at least one dot, no
    empty label (hence no ``..``), no leading dot or dash, at most 255
    characters -- e.g. ``atlas.cern.ch``.
    """
    if isinstance(name, str) and len(name) <= MAX_LENGTH and _REPO.fullmatch(name):
        return None
    return (f"invalid repository name {name!r}: expected lowercase letters, digits, '-' and "
            "'.', at least one dot, no empty label and no leading '.' or '-', at most 255 chars")
