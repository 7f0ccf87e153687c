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


class ProtocolError(CvmfsdError):
    """The control protocol was broken; abstract: raise one of the two subclasses.

    As in h11, the split says who is at fault: :class:`LocalProtocolError` when
    our side misused the protocol (a bug, or user input that no valid request
    can carry), :class:`RemoteProtocolError` when the peer sent something the
    protocol does not allow.

    Attributes:
        code: the protocol error code (a ``cvmfsd.protocol.ErrorCode`` value,
            e.g. ``"bad-request"``) that describes the fault.
    """

    exit_status = 76  # EX_PROTOCOL

    def __init__(self, message: str, *, code: str, hint: str | None = None) -> None:
        if type(self) is ProtocolError:
            raise TypeError("ProtocolError is abstract: raise LocalProtocolError or "
                            "RemoteProtocolError")
        super().__init__(message, hint=hint)
        self.code = code


class LocalProtocolError(ProtocolError):
    """We misused the control protocol: an invalid request or response, or a call out of turn."""

    exit_status = 70  # EX_SOFTWARE: usually a bug on our side


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes that are not a valid control-protocol message."""

    exit_status = 76  # EX_PROTOCOL
