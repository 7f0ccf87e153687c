"""The exceptions cvmfsd raises on purpose.

Every error says what went wrong, where, and what was expected, and carries the
exit status the command line should end with.  Any other exception is a bug.
This module imports nothing from the package, so every module can use it.
"""

from __future__ import annotations


class CvmfsdError(Exception):
    """Base of cvmfsd's deliberate errors.

    Attributes:
        exit_status: what ``cvmfsd`` exits with when this error ends it.
        hint: an optional next step for the user, printed after the message.
    """

    exit_status = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


class UsageError(CvmfsdError):
    """The command line itself is wrong (bad value, missing argument)."""

    exit_status = 2


class SimError(CvmfsdError):
    """The simulated CVMFS distribution or stratum cannot do what was asked."""


class ConfigError(CvmfsdError):
    """Configuration (flags, environment, glidein_config) is missing or malformed."""


class PolicyError(ConfigError):
    """A GLIDEIN_CVMFS policy attribute has a value cvmfsd cannot act on."""


class HostUnsupported(CvmfsdError):
    """This node cannot provide CVMFS the way it was asked for (no usable mode or build)."""
