"""The control protocol between cvmfsd and its clients, with no I/O at all.

Like h11, this module only turns bytes into events and events into bytes; the
trio unix-socket server (``control.py``) and the blocking ``cvmfsctl`` client
move the bytes.  It imports no trio and no socket, and only cheap stdlib
modules, because every ``cvmfsctl`` start-up pays for its imports.

The protocol, version 1
=======================

Framing.  Each message is one JSON object encoded in UTF-8 on one line, ended
by ``\\n``.  A request line may hold at most ``MAX_MESSAGE`` (64 KiB) bytes, not
counting its newline; once more than that has arrived without a newline, the
server answers ``too-large`` and closes the connection.  Blank lines are
ignored.  A connection carries any number of requests and they may be
pipelined; each response echoes its request's ``id``, and a client that
pipelines must match responses to requests by ``id``.  Responses may be up to
``MAX_RESPONSE`` (4 MiB) long, as results such as ``metrics`` can be big.
JSON is read strictly: ``NaN``, ``Infinity`` and duplicate keys are refused.
This module writes compact ASCII JSON (other characters as ``\\uXXXX``).

Request::

    {"v": 1, "id": 7, "verb": "wait", "args": {"path": "/cvmfs/atlas.cern.ch", "timeout": 30}}

``v`` (required) is the protocol version.  ``id`` (optional) is an integer
(signed 64-bit) or a string of at most 64 characters, echoed in the response.
``verb`` (required) names the operation; ``args`` (optional) is an object.  Any
other field, or an unknown or missing argument, is a ``bad-request``: the
strictness catches typos.

Responses::

    {"v": 1, "id": 7, "ok": true, "result": <any JSON value>}
    {"v": 1, "id": 7, "ok": false, "error": {"code": "timeout", "message": "..."}}

``id`` is ``null`` when the request had none or could not be read.  Messages
say what went wrong, where, and what was expected.

Verbs and their arguments (the table ``VERBS`` is authoritative):

=========  ==================================================================
verb       args
=========  ==================================================================
ping       none
status     none
get        ``key``: name matching ``[A-Za-z_][A-Za-z0-9_]*``, <= 256 chars
env        none
config     none
mounts     none
wait       ``path``: ``/cvmfs/<repository>[/...]``, no ``..`` component,
           no NUL, <= 4096 bytes; ``timeout``: seconds, 0 < t <= 86400,
           default 60
exec       ``argv``: non-empty array of <= 4096 strings without NUL;
           ``cwd``: optional absolute path; ``env``: optional object of
           string -> string (names non-empty, without ``=`` or NUL)
remount    ``repo``: a repository name such as ``atlas.cern.ch``
stop       none
metrics    none
classad    none
=========  ==================================================================

``exec`` runs a command inside the CVMFS namespace with the client's standard
streams: the client sends its stdin, stdout and stderr descriptors, in that
order, as SCM_RIGHTS ancillary data with the request's bytes (moving them is
the socket adapter's job, not this module's).  The response comes once the
command has exited; its result is ``{"status": <exit status>}``.

``metrics`` answers ``{"text": <Prometheus text format>}`` and ``classad``
``{"text": <one "Attr = value" line per attribute>}``.

Error codes (``ErrorCode``) and the exit status ``cvmfsctl`` ends with:

=====================  ====  ==================================================
code                   exit  meaning
=====================  ====  ==================================================
bad-request             64   malformed JSON, not an object, wrong field or
                             argument types, missing or unknown fields (EX_USAGE)
unknown-verb            76   the daemon does not know the verb (EX_PROTOCOL)
unsupported-version     76   the daemon does not speak that ``v`` (EX_PROTOCOL)
too-large               65   a message over the size limit (EX_DATAERR)
not-found                1   e.g. ``get`` of a key that is not set, so that
                             ``cvmfsctl get KEY || default`` reads naturally
refused                 77   peer uid not allowed, verb disabled (EX_NOPERM)
timeout                124   e.g. ``wait`` timed out, as timeout(1) does
unavailable             69   daemon not ready or stopping (EX_UNAVAILABLE)
internal                70   a bug in cvmfsd (EX_SOFTWARE)
=====================  ====  ==================================================

From a shell (OpenBSD netcat needs ``-N`` to half-close after stdin ends,
otherwise both ends wait for each other)::

    printf '{"v":1,"verb":"ping"}\\n' | nc -N -U "$CVMFSD_SOCKET"
    printf '{"v":1,"verb":"get","args":{"key":"CVMFS_REPOSITORIES"}}\\n' \\
        | socat - UNIX-CONNECT:"$CVMFSD_SOCKET"

or from Python::

    import os, socket
    from cvmfsd import protocol

    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(os.environ["CVMFSD_SOCKET"])
        sock.sendall(protocol.encode_request("wait", {"path": "/cvmfs/atlas.cern.ch"}))
        client = protocol.ClientConnection()
        while (event := client.next_event()) is protocol.NEED_DATA:
            client.receive_data(sock.recv(65536))
        print(event)

Theory of operation
===================

``ServerConnection`` and ``ClientConnection`` each own a line buffer.  Feed it
with ``receive_data(bytes)`` (``b""`` means the peer closed its side), then
call ``next_event()`` until it returns ``NEED_DATA``.  On the server the events
are ``Request`` (valid and typed), ``BadMessage`` (answer it with
``event.response()`` and carry on), or ``EOF``.  Once ``must_close`` is true, no
more requests will come: send the responses still owed, then close.  That
happens at the peer's EOF (after any message it cut short), and after a
too-large message, where the rest of the stream cannot be re-synchronised.
``send(response)`` returns the bytes to write.

Validation happens once, at construction: the frozen argument dataclasses
check their fields against ``VERBS`` in ``__post_init__``, and the parser
builds them from the wire, so a ``Request`` in hand is always valid, whether
it was parsed or built in Python.  Rule: ``next_event()`` raises nothing on the
server, whatever bytes arrive; on the client it raises only
``RemoteProtocolError``.  Any other exception from it is a bug.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from types import MappingProxyType
from typing import Final, Union

# The error family is re-exported so that users of the protocol need one import.
from cvmfsd.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from cvmfsd.names import repo_name_problem

__all__ = [
    "EOF",
    "MAX_MESSAGE",
    "MAX_RESPONSE",
    "NEED_DATA",
    "VERBS",
    "VERSION",
    "Arg",
    "Args",
    "BadMessage",
    "ClientConnection",
    "ErrorCode",
    "ErrorInfo",
    "ExecArgs",
    "GetArgs",
    "LocalProtocolError",
    "NoArgs",
    "ProtocolError",
    "RemoteProtocolError",
    "RemountArgs",
    "Request",
    "RequestId",
    "Response",
    "Sentinel",
    "ServerConnection",
    "Verb",
    "VerbSpec",
    "WaitArgs",
    "encode_request",
    "error",
    "export_problem",
    "make_request",
    "ok",
    "shell_exports",
]

VERSION: Final = 1
MAX_MESSAGE: Final = 64 * 1024
MAX_RESPONSE: Final = 4 * 1024 * 1024
DEFAULT_WAIT_TIMEOUT: Final = 60.0
MAX_WAIT_TIMEOUT: Final = 86400
MAX_PATH: Final = 4096
MAX_ARGV: Final = 4096
MAX_ID_LENGTH: Final = 64

RequestId = Union[int, str, None]


class ErrorCode(Enum):
    """Why a request failed, as sent in ``error.code``; see the module docstring."""

    BAD_REQUEST = "bad-request"
    UNKNOWN_VERB = "unknown-verb"
    UNSUPPORTED_VERSION = "unsupported-version"
    TOO_LARGE = "too-large"
    NOT_FOUND = "not-found"
    REFUSED = "refused"
    TIMEOUT = "timeout"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"

    @property
    def exit_status(self) -> int:
        """What ``cvmfsctl`` exits with when the daemon answers with this code."""
        return _EXIT_STATUS[self]


_EXIT_STATUS: Final[Mapping[ErrorCode, int]] = {
    ErrorCode.BAD_REQUEST: 64,  # EX_USAGE
    ErrorCode.UNKNOWN_VERB: 76,  # EX_PROTOCOL: client and daemon versions differ
    ErrorCode.UNSUPPORTED_VERSION: 76,  # EX_PROTOCOL
    ErrorCode.TOO_LARGE: 65,  # EX_DATAERR
    ErrorCode.NOT_FOUND: 1,  # a plain "no", for `cvmfsctl get KEY || ...`
    ErrorCode.REFUSED: 77,  # EX_NOPERM
    ErrorCode.TIMEOUT: 124,  # what timeout(1) exits with
    ErrorCode.UNAVAILABLE: 69,  # EX_UNAVAILABLE
    ErrorCode.INTERNAL: 70,  # EX_SOFTWARE
}


class Verb(Enum):
    """The operations a client can ask for."""

    PING = "ping"
    STATUS = "status"
    GET = "get"
    ENV = "env"
    CONFIG = "config"
    MOUNTS = "mounts"
    WAIT = "wait"
    EXEC = "exec"
    REMOUNT = "remount"
    STOP = "stop"
    METRICS = "metrics"
    CLASSAD = "classad"


class Sentinel(Enum):
    """Non-message results of ``next_event()``: ``NEED_DATA`` and ``EOF``."""

    NEED_DATA = "NEED_DATA"
    EOF = "EOF"

    def __repr__(self) -> str:
        return self.value


NEED_DATA: Final = Sentinel.NEED_DATA
"""Call ``receive_data()`` before asking for the next event."""
EOF: Final = Sentinel.EOF
"""The peer closed its side; no further message will come."""


# -- argument checks ---------------------------------------------------------------------

class _Invalid(Exception):
    """A check's reason for refusing a value; becomes part of a bad-request message."""

    def __init__(self, reason: str, where: str = "", *, complete: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.where = where  # e.g. "[3]" for the fourth item of an array
        self.complete = complete  # the reason already says what was expected


def _quote(text: str) -> str:
    """``text`` as a JSON string, cut short so that messages stay small."""
    return json.dumps(text if len(text) <= 40 else text[:40] + "...")


def _describe(value: object) -> str:
    """A short, bounded description of a JSON value for error messages."""
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, (int, float)):
        big = isinstance(value, int) and abs(value) >= 10**18
        return "a very large number" if big else f"number {value!r}"
    if isinstance(value, str):
        return "string " + _quote(value)
    if isinstance(value, (list, tuple)):
        return f"an array of {len(value)} item{'' if len(value) == 1 else 's'}"
    return "an object" if isinstance(value, Mapping) else f"a Python {type(value).__name__}"


_SHELL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _text(value: object, where: str = "") -> str:
    """A string that can travel through argv, paths and environments: no NUL, valid Unicode."""
    if not isinstance(value, str):
        raise _Invalid(f"got {_describe(value)}", where)
    if "\0" in value:
        raise _Invalid(f"{_describe(value)} contains NUL", where)
    if _SURROGATE.search(value):
        raise _Invalid(f"{_describe(value)} is not valid Unicode (lone surrogate)", where)
    return value


def _check_key(value: object) -> object:
    if not isinstance(value, str) or len(value) > 256 or not _SHELL_NAME.fullmatch(value):
        raise _Invalid(f"got {_describe(value)}")
    return value


def _absolute_path(value: object) -> str:
    path = _text(value)
    if len(path.encode()) > MAX_PATH:
        raise _Invalid(f"got a path of {len(path.encode())} bytes")
    if not path.startswith("/"):
        raise _Invalid(f"{_describe(path)} is not absolute")
    return path


def _check_cvmfs_path(value: object) -> object:
    path = _absolute_path(value)
    if not path.startswith("/cvmfs/") or not path[len("/cvmfs/"):].strip("/"):
        raise _Invalid(f"{_describe(path)} is not under /cvmfs/")
    if ".." in path.split("/"):
        raise _Invalid(f"{_describe(path)} has a '..' component")
    # The first component names the repository: "/cvmfs//tmp/x" must not become /tmp/x.
    if repo_name_problem(path[len("/cvmfs/"):].split("/", 1)[0]):
        raise _Invalid(f"{_describe(path)} does not name a repository after /cvmfs/")
    return path


def _check_timeout(value: object) -> object:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Invalid(f"got {_describe(value)}")
    if not 0 < value <= MAX_WAIT_TIMEOUT:  # also refuses NaN
        raise _Invalid(f"got {_describe(value)}")
    return float(value)


def _check_argv(value: object) -> object:
    if not isinstance(value, (list, tuple)) or not value or len(value) > MAX_ARGV:
        raise _Invalid(f"got {_describe(value)}")
    for index, item in enumerate(value):
        _text(item, f"[{index}]")
    if not value[0]:
        raise _Invalid("the program name is empty", "[0]")
    return tuple(value)


def _check_cwd(value: object) -> object:
    return _absolute_path(value)


def _check_env(value: object) -> object:
    if not isinstance(value, Mapping) or len(value) > MAX_ARGV:
        raise _Invalid(f"got {_describe(value)}")
    for name, text in value.items():
        where = f"[{_quote(name) if isinstance(name, str) else _describe(name)}]"
        if not isinstance(name, str) or not name or "=" in name:
            raise _Invalid("the variable name is empty or contains '='", where)
        _text(name, where)
        _text(text, where)
    return MappingProxyType(dict(value))


def _check_repo(value: object) -> object:
    if not isinstance(value, str) or len(value) > 255:
        raise _Invalid(f"got {_describe(value)}")
    problem = repo_name_problem(value)
    if problem is not None:
        raise _Invalid(problem, complete=True)
    return value


# -- the verb table ----------------------------------------------------------------------

@dataclass(frozen=True)
class Arg:
    """One argument of a verb: its name, its check, and what a valid value looks like.

    ``check`` returns the value in its typed form (e.g. a tuple for a JSON
    array) or raises ``_Invalid``.  An argument is optional when it has a
    ``default``; an optional argument whose default is None may be null.
    """

    name: str
    check: Callable[[object], object]
    expected: str
    required: bool = True
    default: object = None


class _ValidatedArgs:
    """Mixin: a frozen args dataclass that checks itself against ``VERBS`` on construction."""

    def __post_init__(self) -> None:
        spec = _SPEC_BY_TYPE[type(self)]
        for arg in spec.args:
            value = getattr(self, arg.name)
            if value is None and not arg.required and arg.default is None:
                continue
            try:
                checked = arg.check(value)
            except _Invalid as exc:
                message = f"{spec.verb.value}: args.{arg.name}{exc.where}: {exc.reason}"
                if not exc.complete:
                    message += f"; expected {arg.expected}"
                raise LocalProtocolError(message, code=ErrorCode.BAD_REQUEST.value) from None
            if checked is not value:
                object.__setattr__(self, arg.name, checked)


@dataclass(frozen=True)
class NoArgs:
    """The arguments of a verb that takes none."""


@dataclass(frozen=True)
class GetArgs(_ValidatedArgs):
    """``get``: the value of one glidein configuration variable."""

    key: str


@dataclass(frozen=True)
class WaitArgs(_ValidatedArgs):
    """``wait``: until ``path`` exists, for at most ``timeout`` seconds."""

    path: str
    timeout: float = DEFAULT_WAIT_TIMEOUT


@dataclass(frozen=True)
class ExecArgs(_ValidatedArgs):
    """``exec``: run ``argv`` inside the namespace, in ``cwd``, with ``env`` added."""

    argv: tuple[str, ...]
    cwd: str | None = None
    env: Mapping[str, str] | None = field(default=None, hash=False)


@dataclass(frozen=True)
class RemountArgs(_ValidatedArgs):
    """``remount``: unmount and mount one repository again."""

    repo: str


Args = Union[NoArgs, GetArgs, WaitArgs, ExecArgs, RemountArgs]


@dataclass(frozen=True)
class VerbSpec:
    """One row of ``VERBS``: a verb, the dataclass its arguments become, and their specs."""

    verb: Verb
    args_type: Callable[..., Args]
    args: tuple[Arg, ...] = ()


_PATH_RULE = "no NUL, at most 4096 bytes"
_TABLE: Final = (
    VerbSpec(Verb.PING, NoArgs),
    VerbSpec(Verb.STATUS, NoArgs),
    VerbSpec(Verb.GET, GetArgs, (
        Arg("key", _check_key,
            "a string matching [A-Za-z_][A-Za-z0-9_]*, at most 256 characters"),
    )),
    VerbSpec(Verb.ENV, NoArgs),
    VerbSpec(Verb.CONFIG, NoArgs),
    VerbSpec(Verb.MOUNTS, NoArgs),
    VerbSpec(Verb.WAIT, WaitArgs, (
        Arg("path", _check_cvmfs_path,
            f"an absolute path /cvmfs/<repository>[/...] with no '..' component, {_PATH_RULE}"),
        Arg("timeout", _check_timeout,
            f"a number of seconds, 0 < timeout <= {MAX_WAIT_TIMEOUT}",
            required=False, default=DEFAULT_WAIT_TIMEOUT),
    )),
    VerbSpec(Verb.EXEC, ExecArgs, (
        Arg("argv", _check_argv,
            f"a non-empty array of at most {MAX_ARGV} strings without NUL, the first non-empty"),
        Arg("cwd", _check_cwd, f"an absolute path, {_PATH_RULE}", required=False),
        Arg("env", _check_env,
            "an object mapping variable names (non-empty, no '=') to strings, without NUL",
            required=False),
    )),
    VerbSpec(Verb.REMOUNT, RemountArgs, (
        Arg("repo", _check_repo, "a repository name such as atlas.cern.ch"),
    )),
    VerbSpec(Verb.STOP, NoArgs),
    VerbSpec(Verb.METRICS, NoArgs),
    VerbSpec(Verb.CLASSAD, NoArgs),
)

VERBS: Final[Mapping[Verb, VerbSpec]] = {spec.verb: spec for spec in _TABLE}
"""Every verb of protocol version 1 and its arguments."""

_SPEC_BY_TYPE: Final[Mapping[object, VerbSpec]] = {
    spec.args_type: spec for spec in _TABLE if spec.args
}


# -- events ------------------------------------------------------------------------------

def _as_id(value: object) -> RequestId:
    """``value`` if it is a valid request id, else raise ``_Reject``."""
    if value is None or (isinstance(value, str) and len(value) <= MAX_ID_LENGTH):
        return value
    if isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**63:
        return value
    raise _Reject(ErrorCode.BAD_REQUEST, f"field \"id\": got {_describe(value)}; expected a "
                  f"64-bit integer, a string of at most {MAX_ID_LENGTH} characters, or null")


@dataclass(frozen=True)
class Request:
    """A valid request: its ``id`` (echoed in the response), ``verb`` and typed ``args``.

    Raises:
        LocalProtocolError: if a field is invalid or ``args`` is not the
            dataclass ``VERBS[verb]`` names.
    """

    id: RequestId
    verb: Verb
    args: Args

    def __post_init__(self) -> None:
        try:
            _as_id(self.id)
        except _Reject as exc:
            raise LocalProtocolError(exc.message, code=ErrorCode.BAD_REQUEST.value) from None
        verb: object = self.verb
        if not isinstance(verb, Verb):
            raise LocalProtocolError(f"Request.verb: got {verb!r}; expected a Verb",
                                     code=ErrorCode.UNKNOWN_VERB.value)
        spec = VERBS[verb]
        if type(self.args) is not spec.args_type:
            raise LocalProtocolError(
                f"{verb.value}: args: got {type(self.args).__name__}; "
                f"expected {getattr(spec.args_type, '__name__', '?')}",
                code=ErrorCode.BAD_REQUEST.value)


@dataclass(frozen=True)
class ErrorInfo:
    """The ``error`` of a failed response."""

    code: ErrorCode
    message: str

    def __post_init__(self) -> None:
        code: object = self.code
        message: object = self.message
        if not isinstance(code, ErrorCode) or not isinstance(message, str):
            raise LocalProtocolError(
                f"ErrorInfo: got code={code!r}, message={type(message).__name__}; "
                "expected an ErrorCode and a str", code=ErrorCode.INTERNAL.value)


@dataclass(frozen=True)
class Response:
    """An answer: ``ok`` with any JSON ``result``, or not ``ok`` with an ``error``.

    Raises:
        LocalProtocolError: if ``id`` is invalid, or ``ok`` disagrees with
            which of ``result`` and ``error`` is set.
    """

    id: RequestId
    ok: bool
    result: object = field(default=None, hash=False)
    error: ErrorInfo | None = None

    def __post_init__(self) -> None:
        try:
            _as_id(self.id)
        except _Reject as exc:
            raise LocalProtocolError(exc.message, code=ErrorCode.INTERNAL.value) from None
        ok_: object = self.ok
        error_: object = self.error
        if ok_ is True and error_ is None:
            return
        if ok_ is False and isinstance(error_, ErrorInfo) and self.result is None:
            return
        raise LocalProtocolError(
            f"Response: got ok={ok_!r} with error={error_!r} and result of type "
            f"{type(self.result).__name__}; expected ok=True with no error, or ok=False "
            "with an ErrorInfo and no result", code=ErrorCode.INTERNAL.value)


@dataclass(frozen=True)
class BadMessage:
    """A message the server could not accept; answer it with ``response()``."""

    id: RequestId
    code: ErrorCode
    message: str

    def response(self) -> Response:
        """The error response this message deserves."""
        return error(self.id, self.code, self.message)


def ok(request_id: RequestId, result: object = None) -> Response:
    """A successful response to request ``request_id``."""
    return Response(request_id, True, result)


def error(request_id: RequestId, code: ErrorCode, message: str) -> Response:
    """A failed response; ``message`` says what went wrong, where, and what was expected."""
    return Response(request_id, False, None, ErrorInfo(code, message))


# -- JSON in and out ---------------------------------------------------------------------

class _Reject(Exception):
    """A message is refused with this code and message (and the id it carried, if any)."""

    def __init__(self, code: ErrorCode, message: str, request_id: RequestId = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id


class _JsonRefused(ValueError):
    """JSON that Python would accept but the protocol does not (NaN, duplicate keys)."""


def _no_constants(name: str) -> object:
    raise _JsonRefused(f"{name} is not JSON")


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _JsonRefused(f"duplicate key {_quote(key)}")
            seen.add(key)
    return obj


# Made once: json.loads and json.dumps with options build a new coder on every call.
_DECODER: Final = json.JSONDecoder(parse_constant=_no_constants, object_pairs_hook=_no_duplicates)
_ENCODER: Final = json.JSONEncoder(ensure_ascii=True, allow_nan=False, separators=(",", ":"))


def _chunk_encoder() -> Callable[[object], str]:
    """``_ENCODER.encode``, without the C encoder it builds anew on every call (~1 us).

    The C encoder is made once here, as ``JSONEncoder.iterencode`` makes it,
    but without circular-reference markers: a shared markers dict would keep
    the entries of an encoding that failed half-way.  What is encoded is built
    by cvmfsd and never circular; a cycle would end in RecursionError, which
    ``_dumps`` refuses like any other value JSON cannot hold.  Where the C
    encoder is missing or takes other arguments, ``_ENCODER.encode`` it is.
    """
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        return _ENCODER.encode
    try:
        chunks = make(None, _ENCODER.default, json.encoder.encode_basestring_ascii, None,
                      _ENCODER.key_separator, _ENCODER.item_separator, False, False, False)
    except TypeError:
        return _ENCODER.encode
    return lambda obj: "".join(chunks(obj, 0))


_encode_json: Final = _chunk_encoder()


def _loads(line: bytes) -> object:
    """Parse one line of JSON, or raise ``_Reject`` saying what is wrong with it."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _Reject(ErrorCode.BAD_REQUEST, f"message is not UTF-8 (bad byte at offset "
                      f"{exc.start}); expected one JSON object per line") from None
    try:
        return _DECODER.decode(text)
    except json.JSONDecodeError as exc:
        reason = f"malformed JSON at column {exc.colno}: {exc.msg}"
    except _JsonRefused as exc:
        reason = f"unacceptable JSON: {exc}"
    except ValueError:  # an integer beyond Python's digit limit
        reason = "unacceptable JSON: a number has too many digits"
    except RecursionError:
        reason = "unacceptable JSON: nested too deeply"
    raise _Reject(ErrorCode.BAD_REQUEST, f"{reason}; expected one JSON object per line")


def _dumps(obj: object, limit: int) -> bytes:
    """One line of compact ASCII JSON; ``LocalProtocolError`` if impossible or over ``limit``."""
    try:
        data = _encode_json(obj)
    except (TypeError, ValueError, RecursionError) as exc:
        raise LocalProtocolError(f"message cannot be encoded as JSON: {exc}",
                                 code=ErrorCode.INTERNAL.value) from None
    if len(data) > limit:
        raise LocalProtocolError(f"message of {len(data)} bytes is over the limit of {limit}",
                                 code=ErrorCode.TOO_LARGE.value)
    return data.encode("ascii") + b"\n"


_REQUEST_FIELDS: Final = ("v", "id", "verb", "args")
_REQUEST_FIELD_SET: Final = frozenset(_REQUEST_FIELDS)
_VERB_BY_NAME: Final[Mapping[str, Verb]] = {verb.value: verb for verb in Verb}
_ARG_NAMES: Final[Mapping[Verb, frozenset[str]]] = {
    spec.verb: frozenset(arg.name for arg in spec.args) for spec in _TABLE}
_NO_ARGS: Final = NoArgs()  # frozen and empty: one instance serves every request
_ABSENT: Final = object()


def _check_version(obj: dict[str, object], request_id: RequestId) -> None:
    version = obj.get("v", _ABSENT)
    if isinstance(version, bool) or not isinstance(version, int):
        shown = "nothing" if version is _ABSENT else _describe(version)
        raise _Reject(ErrorCode.BAD_REQUEST,
                      f"field \"v\": got {shown}; expected the protocol version {VERSION}",
                      request_id)
    if version != VERSION:
        number = str(version) if abs(version) < 10**18 else "(huge)"
        raise _Reject(ErrorCode.UNSUPPORTED_VERSION, f"protocol version {number} is not "
                      f"supported; expected version {VERSION}", request_id)


def _request_from_json(obj: object) -> Request:
    """Check a decoded request and build it, or raise ``_Reject``."""
    if not isinstance(obj, dict):
        raise _Reject(ErrorCode.BAD_REQUEST,
                      f"got {_describe(obj)}; expected a request object")
    request_id = _as_id(obj.get("id"))
    _check_version(obj, request_id)
    if not obj.keys() <= _REQUEST_FIELD_SET:
        unknown = next(name for name in obj if name not in _REQUEST_FIELD_SET)
        raise _Reject(ErrorCode.BAD_REQUEST, f"unknown field {_quote(unknown)}; "
                      f"expected only {', '.join(_REQUEST_FIELDS)}", request_id)
    name = obj.get("verb")
    if not isinstance(name, str):
        raise _Reject(ErrorCode.BAD_REQUEST,
                      f"field \"verb\": got {_describe(name)}; expected a verb name",
                      request_id)
    verb = _VERB_BY_NAME.get(name)
    if verb is None:
        raise _Reject(ErrorCode.UNKNOWN_VERB, f"unknown verb {_quote(name)}; expected one "
                      f"of {', '.join(v.value for v in Verb)}", request_id)
    raw = obj.get("args", {})
    if not isinstance(raw, dict):
        raise _Reject(ErrorCode.BAD_REQUEST,
                      f"{name}: args: got {_describe(raw)}; expected an object", request_id)
    return Request(request_id, verb, _args_from_json(VERBS[verb], raw, request_id))


def _args_from_json(spec: VerbSpec, raw: dict[str, object], request_id: RequestId) -> Args:
    if not raw and not spec.args:
        return _NO_ARGS  # the common case of most verbs: nothing to check
    names = _ARG_NAMES[spec.verb]
    if not raw.keys() <= names:
        listed = [arg.name for arg in spec.args]
        unknown = next(name for name in raw if name not in names)
        expected = f"only {', '.join(listed)}" if listed else "no arguments"
        raise _Reject(ErrorCode.BAD_REQUEST, f"{spec.verb.value}: unknown argument "
                      f"{_quote(unknown)}; expected {expected}", request_id)
    for arg in spec.args:
        if arg.required and arg.name not in raw:
            raise _Reject(ErrorCode.BAD_REQUEST, f"{spec.verb.value}: missing argument "
                          f"args.{arg.name}; expected {arg.expected}", request_id)
    try:
        return spec.args_type(**raw)
    except LocalProtocolError as exc:
        raise _Reject(ErrorCode.BAD_REQUEST, str(exc), request_id) from None


def _request_to_json(request: Request) -> dict[str, object]:
    obj: dict[str, object] = {"v": VERSION}
    if request.id is not None:
        obj["id"] = request.id
    obj["verb"] = request.verb.value
    args: dict[str, object] = {}
    for arg in VERBS[request.verb].args:
        value = getattr(request.args, arg.name)
        if value is not None:
            args[arg.name] = dict(value) if isinstance(value, Mapping) else value
    if args:
        obj["args"] = args
    return obj


def _response_from_json(obj: object) -> Response:
    """Check a decoded response and build it, or raise ``_Reject``."""
    if not isinstance(obj, dict):
        raise _Reject(ErrorCode.BAD_REQUEST, f"got {_describe(obj)}; expected a response object")
    _check_version(obj, None)
    success = obj.get("ok")
    if not isinstance(success, bool):
        raise _Reject(ErrorCode.BAD_REQUEST,
                      f"field \"ok\": got {_describe(success)}; expected true or false")
    fields = ("v", "id", "ok", "result") if success else ("v", "id", "ok", "error")
    if set(obj) != set(fields):
        raise _Reject(ErrorCode.BAD_REQUEST, f"response has fields {', '.join(sorted(obj))}; "
                      f"expected exactly {', '.join(fields)}")
    request_id = _as_id(obj["id"])
    if success:
        return ok(request_id, obj["result"])
    info = obj["error"]
    if not isinstance(info, dict) or set(info) != {"code", "message"}:
        raise _Reject(ErrorCode.BAD_REQUEST, f"field \"error\": got {_describe(info)}; "
                      "expected an object with exactly code and message")
    code, message = info["code"], info["message"]
    if not isinstance(code, str) or code not in _CODES or not isinstance(message, str):
        raise _Reject(ErrorCode.BAD_REQUEST, f"field \"error\": got code {_describe(code)} and "
                      f"message {_describe(message)}; expected a known code and a string")
    return error(request_id, _CODES[code], message)


_CODES: Final[Mapping[str, ErrorCode]] = {code.value: code for code in ErrorCode}


def _response_to_json(response: Response) -> dict[str, object]:
    if response.error is None:
        return {"v": VERSION, "id": response.id, "ok": True, "result": response.result}
    return {"v": VERSION, "id": response.id, "ok": False,
            "error": {"code": response.error.code.value, "message": response.error.message}}


def make_request(verb: Verb | str, args: Mapping[str, object] | None = None,
                 id: RequestId = None) -> Request:
    """Build a request from wire-shaped values, with the server's own checks.

    Raises:
        LocalProtocolError: with the code and message the server would have
            answered with (``bad-request``, ``unknown-verb``).
    """
    obj: dict[str, object] = {"v": VERSION, "verb": verb.value if isinstance(verb, Verb) else verb}
    if id is not None:
        obj["id"] = id
    if args is not None:
        obj["args"] = dict(args)
    try:
        return _request_from_json(obj)
    except _Reject as exc:
        raise LocalProtocolError(exc.message, code=exc.code.value) from None


def encode_request(verb: Verb | str, args: Mapping[str, object] | None = None,
                   id: RequestId = None) -> bytes:
    """The bytes of one request, checked as the server would check them (the CLI fast path).

    Raises:
        LocalProtocolError: the request is invalid, or longer than ``MAX_MESSAGE``.
    """
    return _dumps(_request_to_json(make_request(verb, args, id)), MAX_MESSAGE)


# -- connections -------------------------------------------------------------------------

class _Overflow(Exception):
    """More than the limit arrived without a newline."""


class _Unterminated(Exception):
    """The peer closed its side in the middle of a line."""

    def __init__(self, length: int) -> None:
        super().__init__(length)
        self.length = length


class _LineReader:
    """The framing: splits the byte stream at newlines, refusing over-long lines."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._buffer = bytearray()
        self._start = 0  # the first byte not yet returned
        self._scanned = 0  # bytes from _start on known to hold no newline
        self.eof = False

    def feed(self, data: bytes) -> None:
        if self.eof:
            if data:
                raise LocalProtocolError("receive_data() got data after EOF (b'')",
                                         code=ErrorCode.INTERNAL.value)
            return
        if not data:
            self.eof = True
            return
        if self._start:
            del self._buffer[:self._start]
            self._start = 0
        self._buffer += data

    def next_line(self) -> bytes | Sentinel:
        """The next non-blank line without its newline, ``NEED_DATA`` or ``EOF``.

        Raises:
            _Overflow: the next line is longer than the limit.
            _Unterminated: the stream ended inside a line.
        """
        buffer = self._buffer
        while True:
            start = self._start
            newline = buffer.find(b"\n", start + self._scanned, start + self._limit + 1)
            if newline < 0:
                pending = len(buffer) - start
                if pending > self._limit:
                    raise _Overflow
                self._scanned = pending
                if not self.eof:
                    return NEED_DATA
                self._start, self._scanned = len(buffer), 0
                if buffer[start:].strip(b" \t\r"):
                    raise _Unterminated(pending)
                return EOF
            line = bytes(buffer[start:newline])
            self._start, self._scanned = newline + 1, 0
            if line.strip(b" \t\r"):
                return line


# Requests already parsed, by their line: clients ask the same few questions over
# and over (every job's ``cvmfsctl get GLIDEIN_Site`` is the same line), and a
# Request is immutable, so a line seen before costs a dict lookup instead of
# the JSON parse and the checks (~4.5 us of a ~12 us request).  Shared by every
# connection; bounded in entries and in line length (at most ~170 KB in all),
# the oldest entry going first.  Refused lines are not kept: they are rare, and
# each must be answered with its own message anyway.
_PARSED: Final[dict[bytes, Request]] = {}
_PARSED_ENTRIES: Final = 128
_PARSED_LINE: Final = 512  # bytes: longer lines (exec with an environment) are parsed every time


def _remember(line: bytes, request: Request) -> None:
    if len(line) > _PARSED_LINE:
        return
    if len(_PARSED) >= _PARSED_ENTRIES:
        del _PARSED[next(iter(_PARSED))]
    _PARSED[line] = request


class ServerConnection:
    """The server's side of one control connection.

    ``next_event()`` raises nothing, whatever bytes the peer sends: any
    exception from it is a bug.
    """

    def __init__(self) -> None:
        self._reader = _LineReader(MAX_MESSAGE)
        self._must_close = False

    @property
    def must_close(self) -> bool:
        """No request will come any more: send the responses owed, then close."""
        return self._must_close

    def receive_data(self, data: bytes) -> None:
        """Add bytes from the peer; ``b""`` means it closed its side.

        Raises:
            LocalProtocolError: data after ``b""``, or after ``must_close``.
        """
        if self._must_close and data:
            raise LocalProtocolError("receive_data() after must_close: the connection must be "
                                     "closed, not read", code=ErrorCode.INTERNAL.value)
        if not self._must_close:
            self._reader.feed(data)

    def next_event(self) -> Request | BadMessage | Sentinel:
        """The next ``Request``, a ``BadMessage`` to answer, ``NEED_DATA`` or ``EOF``."""
        if self._must_close:
            return EOF
        try:
            line = self._reader.next_line()
        except _Overflow:
            self._must_close = True
            return BadMessage(None, ErrorCode.TOO_LARGE,
                              f"message longer than {MAX_MESSAGE} bytes (no newline in time); "
                              "the connection will be closed")
        except _Unterminated as exc:
            self._must_close = True
            return BadMessage(None, ErrorCode.BAD_REQUEST,
                              f"connection closed after {exc.length} bytes of a message; "
                              "expected a newline at the end of each message")
        if isinstance(line, Sentinel):
            if line is EOF:
                self._must_close = True
            return line
        request = _PARSED.get(line)
        if request is None:
            try:
                request = _request_from_json(_loads(line))
            except _Reject as exc:
                return BadMessage(exc.request_id, exc.code, exc.message)
            _remember(line, request)
        return request

    def send(self, response: Response) -> bytes:
        """The bytes of ``response``.

        Raises:
            LocalProtocolError: the result is not JSON (code ``internal``) or the
                response is over ``MAX_RESPONSE`` (code ``too-large``); send an
                error response instead.
        """
        return _dumps(_response_to_json(response), MAX_RESPONSE)


class ClientConnection:
    """The client's side of one control connection."""

    def __init__(self) -> None:
        self._reader = _LineReader(MAX_RESPONSE)
        self._failure: RemoteProtocolError | None = None

    def send(self, request: Request) -> bytes:
        """The bytes of ``request``.

        Raises:
            LocalProtocolError: the request is over ``MAX_MESSAGE`` (``too-large``).
        """
        return _dumps(_request_to_json(request), MAX_MESSAGE)

    def receive_data(self, data: bytes) -> None:
        """Add bytes from the server; ``b""`` means it closed its side."""
        self._reader.feed(data)

    def next_event(self) -> Response | Sentinel:
        """The next ``Response``, ``NEED_DATA``, or ``EOF`` once the server has closed.

        Raises:
            RemoteProtocolError: the server sent something that is not a valid
                response; the connection is then unusable and the same error is
                raised again on every call.
        """
        if self._failure is not None:
            raise self._failure
        try:
            line = self._reader.next_line()
            if isinstance(line, Sentinel):
                return line
            return _response_from_json(_loads(line))
        except _Overflow:
            self._failure = RemoteProtocolError(
                f"response longer than {MAX_RESPONSE} bytes", code=ErrorCode.TOO_LARGE.value)
        except _Unterminated as exc:
            self._failure = RemoteProtocolError(
                f"server closed the connection after {exc.length} bytes of a response",
                code=ErrorCode.BAD_REQUEST.value)
        except _Reject as exc:
            self._failure = RemoteProtocolError(f"invalid response from cvmfsd: {exc.message}",
                                                code=exc.code.value)
        raise self._failure


# -- env as shell code -------------------------------------------------------------------

# Variables bash sets or refuses itself: an export of them fails or does not stick.
_SHELL_MANAGED: Final = frozenset({
    "BASHOPTS", "BASHPID", "BASH_ARGC", "BASH_ARGV", "BASH_ARGV0", "BASH_COMMAND",
    "BASH_LINENO", "BASH_SOURCE", "BASH_SUBSHELL", "BASH_VERSINFO", "EPOCHREALTIME",
    "EPOCHSECONDS", "EUID", "FUNCNAME", "GROUPS", "HISTCMD", "LINENO", "PPID", "RANDOM",
    "SECONDS", "SHELLOPTS", "SRANDOM", "UID",
})


def export_problem(name: str, value: str) -> str | None:
    """Why ``name=value`` cannot be exported to a shell, or None if it can."""
    if not _SHELL_NAME.fullmatch(name):
        return "not a valid shell variable name"
    if name in _SHELL_MANAGED:
        return "a variable the shell manages itself"
    if "\0" in value:
        return "the value contains NUL, which no shell variable can hold"
    return None


def shell_exports(values: Mapping[str, str]) -> str:
    """Shell code that exports ``values``, for ``eval "$(cvmfsctl env)"`` in bash or dash.

    Each value is single-quoted, with ``'`` written as ``'\\''``, so the shell
    reproduces it byte for byte (newlines, ``$``, backslashes, Unicode...).
    Variables that cannot be exported (see ``export_problem``) are skipped,
    each reported on a ``# skipped`` comment line the shell ignores.  Values
    holding surrogate escapes (from ``os.environ``) need
    ``encode("utf-8", "surrogateescape")`` when written out.
    """
    lines = []
    for name, value in values.items():
        problem = export_problem(name, value)
        if problem is None:
            quoted = value.replace("'", "'\\''")
            lines.append(f"export {name}='{quoted}'\n")
        else:
            # ascii() escapes every newline, so the comment cannot end early
            shown = ascii(name if len(name) <= 80 else name[:80] + "...")
            lines.append(f"# skipped {shown}: {problem}\n")
    return "".join(lines)
