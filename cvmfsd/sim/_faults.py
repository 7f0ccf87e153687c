"""Fault knobs of the simulated stratum (the ``.cvmfsfaults`` file; not part of real CVMFS).

Re-exported by :mod:`cvmfsd.sim.stratum`, which reads and writes the file.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, fields


class StratumError(ValueError):
    """A stratum operation got bad input or found bad data; the message says where."""


@dataclass(frozen=True)
class Faults:
    """Fault knobs of one repository; ``None`` means the knob is off.

    Attributes:
        mount_fail: cvmfs2 exits with this loader code instead of mounting.
        mount_delay: seconds the mount takes before it completes (or fails).
        crash_after: seconds after the mount at which cvmfs2 aborts (ENOTCONN).
        hang_after: seconds after the mount from which every FUSE request stalls.
        eio: repository-relative paths whose reads fail with EIO, or ``"*"``.
    """

    mount_fail: int | None = None
    mount_delay: float | None = None
    crash_after: float | None = None
    hang_after: float | None = None
    eio: tuple[str, ...] | str | None = None

    def __post_init__(self) -> None:
        if self.mount_fail is not None and (
            isinstance(self.mount_fail, bool)
            or not isinstance(self.mount_fail, int)
            or not 1 <= self.mount_fail <= 255
        ):
            raise StratumError(f"fault mount_fail={self.mount_fail!r}: expected an int in 1..255")
        for name in ("mount_delay", "crash_after", "hang_after"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0
            ):
                raise StratumError(f"fault {name}={value!r}: expected seconds >= 0")
        eio = self.eio
        if eio is not None and eio != "*":
            if not isinstance(eio, (list, tuple)) or not all(isinstance(p, str) for p in eio):
                raise StratumError(f"fault eio={eio!r}: expected '*' or a list of paths")
            object.__setattr__(self, "eio", tuple(p.strip("/") for p in eio))

    def eio_matches(self, path: str) -> bool:
        """Whether reads of repository path ``path`` must fail with EIO."""
        return self.eio == "*" or (isinstance(self.eio, tuple) and path in self.eio)

    def to_json(self) -> dict[str, object]:
        """The knobs that are set, as a JSON-ready mapping."""
        out: dict[str, object] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


_KNOBS = frozenset(f.name for f in fields(Faults))


def parse_faults(text: str, *, where: str = "faults") -> Faults:
    """Parse the JSON fault file; an empty text means no faults.

    Raises:
        StratumError: not a JSON object, an unknown knob or a bad value.
    """
    if not text.strip():
        return Faults()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise StratumError(f"{where}: not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise StratumError(f"{where}: expected a JSON object of fault knobs")
    return make_faults(data, where)


def make_faults(knobs: Mapping[str, object], where: str) -> Faults:
    """Build :class:`Faults` from a mapping of knobs, naming ``where`` in errors."""
    unknown = sorted(set(knobs) - _KNOBS)
    if unknown:
        raise StratumError(f"{where}: unknown fault knob(s) {unknown}; expected {sorted(_KNOBS)}")
    eio = knobs.get("eio")
    if isinstance(eio, list):
        knobs = {**knobs, "eio": tuple(eio)}
    try:
        return Faults(**knobs)  # type: ignore[arg-type]  # values are checked in __post_init__
    except TypeError as exc:
        raise StratumError(f"{where}: {exc}") from None
