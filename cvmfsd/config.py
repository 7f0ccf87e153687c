"""cvmfsd's configuration: one frozen value built from flags, environment and glidein_config.

Precedence, highest first: command-line flags, environment variables, the
glidein_config file, defaults.  Nothing here performs I/O except reading the
glidein_config file named by the caller.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cvmfsd.errors import ConfigError, UsageError
from cvmfsd.names import repo_name_problem

#: Keys of glidein_config exported to the payload's environment, by prefix.
EXPORT_PREFIXES = ("GLIDEIN_", "GWMS_", "CVMFS_", "CONDOR_VARS_FILE", "TMP_DIR")
#: Secret-looking names: these anywhere in a key, case-insensitively ...
SECRET = re.compile(
    r"TOKEN|PASSW|SECRET|CREDENTIAL|PRIVATE|PRIVKEY|COOKIE|BEARER|HMAC|SIGNATURE|X509.*PROXY",
    re.IGNORECASE,
)
#: ... or one of these as a whole word of the key (words split at ``_``) ...
SECRET_WORDS = frozenset({"KEY", "APIKEY", "PWD", "PASS", "PASSPHRASE", "SIG", "SESSIONID"})
#: ... or a value that holds a PEM block, a JWT, or a long opaque token: a run of
#: 32+ base64 characters with a part of 20+ (between ``/ _ - + =``) that mixes
#: upper case, lower case and digits (random tokens do; names, paths, UUIDs and
#: hex digests do not).
PEM = re.compile(r"-----BEGIN [A-Z0-9 ]+-----")
JWT = re.compile(r"eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*")
_RUN = re.compile(r"[A-Za-z0-9+/=_-]{32,}")
_PART = re.compile(r"[A-Za-z0-9]{20,}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
#: The default control socket's private directory: ``<prefix><uid>-<random>``.
SOCKET_DIR_PREFIX = "cvmfsd-"
MAX_PATH = 107  # sun_path holds 108 bytes, NUL included
MODES = ("auto", "host", "3", "2", "1")


def parse_address(text: str) -> tuple[str, int] | None:
    """``--metrics-address``: ``HOST:PORT``, ``[V6]:PORT`` or ``none`` (-> None).

    Port 0 asks for any free port; the bound one is reported.

    Raises:
        UsageError: anything else.
    """
    if text == "none":
        return None
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or int(port) > 65535 or ("[" in host):
        raise UsageError(f"--metrics-address {text!r}: expected HOST:PORT (e.g. 127.0.0.1:9868, "
                         "[::1]:0 for any free port), or none")
    return host, int(port)


def pushgateway_url(text: str) -> str:
    """``--pushgateway``: an ``http://`` or ``https://`` URL with a host.

    Raises:
        UsageError: anything else.
    """
    from urllib.parse import urlsplit

    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"--pushgateway {text!r}: expected a URL such as "
                         "http://pushgateway.example.org:9091")
    return text.rstrip("/")


def is_secret(key: str, value: str = "") -> bool:
    """Whether a glidein_config entry looks like it holds a secret, by its name or its value.

    The rule (SECURITY.md): a name containing TOKEN, PASSW, SECRET, CREDENTIAL,
    PRIVATE, PRIVKEY, COOKIE, BEARER, HMAC, SIGNATURE or X509...PROXY; a name
    with a word (split at ``_``) KEY, APIKEY, PWD, PASS, PASSPHRASE or SIG, or
    ending in KEY, or ending in AUTH, or SESSION followed by ID; a value with a
    PEM block, a JWT or a long opaque token (see :func:`looks_secret`).  So
    ``GLIDEIN_Auth_Method`` is not one, ``GLIDEIN_HTTP_AUTH`` is.
    """
    if SECRET.search(key):
        return True
    words = key.upper().split("_")
    if any(w in SECRET_WORDS or w.endswith("KEY") for w in words) or words[-1].endswith("AUTH"):
        return True
    if any(a == "SESSION" and b in ("ID", "KEY") for a, b in zip(words, words[1:])):
        return True
    return looks_secret(value)


def looks_secret(value: str) -> bool:
    """Whether a value holds a PEM block, a JWT or a long opaque token."""
    if PEM.search(value) or JWT.search(value):
        return True
    for run in _RUN.findall(value):
        for part in _PART.findall(run):
            if (any(c.isupper() for c in part) and any(c.islower() for c in part)
                    and any(c.isdigit() for c in part)):
                return True
    return False


#: Bounds of the exported environment: one ``NAME=value`` (the kernel refuses a
#: string over 128 KiB with E2BIG, MAX_ARG_STRLEN) and all exported glidein
#: values together (argv and environment share ARG_MAX, often 2 MiB).  What does
#: not fit is left to ``cvmfsctl get``.
EXPORT_MAX_VARIABLE = 32 * 1024
EXPORT_MAX_TOTAL = 256 * 1024


def exported_variables(values: Mapping[str, str], *, allow: Sequence[str] = ()) -> dict[str, str]:
    """The glidein_config values the payload gets in its environment.

    Keys with one of :data:`EXPORT_PREFIXES`, valid as environment names, and
    not secret-looking by name or value (:func:`is_secret`) unless named in
    ``allow``.  Values keep their spaces.  Bounded: a variable over
    :data:`EXPORT_MAX_VARIABLE` bytes, or one that would take the total over
    :data:`EXPORT_MAX_TOTAL`, is left out (:func:`oversized_variables`).
    """
    return _exports(values, allow)[0]


def oversized_variables(values: Mapping[str, str], *, allow: Sequence[str] = ()) -> list[str]:
    """The variables :func:`exported_variables` leaves out for size alone."""
    return _exports(values, allow)[1]


def _exports(values: Mapping[str, str], allow: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    exported: dict[str, str] = {}
    oversized: list[str] = []
    total = 0
    for key, value in values.items():
        if not (_ENV_NAME.fullmatch(key) and key.startswith(EXPORT_PREFIXES)
                and (key in allow or not is_secret(key, value)) and "\0" not in value):
            continue
        size = len(key.encode()) + len(value.encode(errors="surrogateescape")) + 2  # = and NUL
        if size > EXPORT_MAX_VARIABLE or total + size > EXPORT_MAX_TOTAL:
            oversized.append(key)
            continue
        exported[key] = value
        total += size
    return exported, oversized


def default_socket_path(environ: Mapping[str, str]) -> Path:
    """Where the socket goes unless --socket says: never under TMPDIR, never a guessable name.

    cvmfsexec replaces and then deletes an exported TMPDIR, so the socket lives
    in a private directory made as :func:`tempfile.mkdtemp` makes them (0700,
    a random name, created exclusively) in ``$XDG_RUNTIME_DIR`` if that is ours,
    else in ``/tmp``.  A fixed name there (``/tmp/cvmfsd-<uid>``) let any local
    user deny every run of a uid by creating it first (issue 12).

    Raises:
        ConfigError: no private directory can be made.
    """
    import tempfile  # only here: cvmfsctl imports this module on its fast path

    base = "/tmp"  # noqa: S108 - mkdtemp: random name, 0700, created exclusively
    runtime = environ.get("XDG_RUNTIME_DIR")
    if runtime:
        try:
            st = Path(runtime).stat()
        except OSError:
            st = None
        if st is not None and stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid():
            base = runtime
    try:
        directory = tempfile.mkdtemp(prefix=f"{SOCKET_DIR_PREFIX}{os.getuid()}-", dir=base)
    except OSError as exc:
        raise ConfigError(f"cannot make a private directory for the control socket in {base}: "
                          f"{exc.strerror}", hint="pass --socket") from exc
    return Path(directory) / "control.sock"


def prepare_socket_dir(path: Path) -> bool:
    """Create the socket's directory 0700, or check that an existing one is ours and private.

    Only the directory itself is made, never its parents: what cvmfsd makes
    it removes at the end, and a chain of parents would be left behind.
    Returns whether it made the directory.

    Raises:
        ConfigError: the path is too long for a unix socket, the directory's
            parent does not exist, or the directory is someone else's or
            readable by others.
    """
    if len(os.fsencode(path)) > MAX_PATH:
        raise ConfigError(f"control socket path {path} is {len(os.fsencode(path))} bytes; "
                          f"unix sockets allow at most {MAX_PATH}", hint="pass a shorter --socket")
    directory = path.parent
    made = False
    try:
        directory.mkdir(mode=0o700)
        made = True
    except FileExistsError:
        pass
    except FileNotFoundError:
        raise ConfigError(f"control socket directory {directory} cannot be made: "
                          f"{directory.parent} does not exist; expected an existing directory",
                          hint="pass a --socket in an existing directory") from None
    st = directory.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise ConfigError(
            f"control socket directory {directory} must be a directory owned by uid "
            f"{os.getuid()} with mode 0700 (found uid {st.st_uid}, mode "
            f"{stat.S_IMODE(st.st_mode):04o})", hint="remove it, or pass another --socket")
    return made


@dataclass(frozen=True)
class SocketDir:
    """A directory cvmfsd made for its control socket, and how to remove it at the end.

    ``private``: made with ``mkdtemp`` for the default socket, unguessable and
    ours alone, so it goes with everything in it.  Otherwise made for a
    ``--socket`` whose directory did not exist: other runs of the same user
    may have put their sockets there since, so it goes only once empty.
    """

    path: Path
    private: bool

    def remove(self) -> None:
        """Remove the directory (see the class); never raises."""
        if self.private:
            import shutil  # not at the top: cvmfsctl imports this module

            shutil.rmtree(self.path, ignore_errors=True)
            return
        with contextlib.suppress(OSError):  # not empty: another run's socket is there
            self.path.rmdir()


def bind_socket(path: Path) -> socket.socket:
    """The control socket, bound at ``path`` (mode 0600) and listening; non-blocking.

    ``cvmfsd run`` binds it before cvmfsexec starts: a payload that asks
    something at once is queued until the server answers, never refused.

    Raises:
        ConfigError: the directory is not ours and private, or the bind failed.
    """
    prepare_socket_dir(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.setblocking(False)
    try:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # a stale socket of ours, in our private directory
        old_umask = os.umask(0o177)
        try:
            listener.bind(str(path))
        finally:
            os.umask(old_umask)
        path.chmod(0o600)
        listener.listen(128)
    except OSError as exc:
        listener.close()
        raise ConfigError(f"cannot listen on the control socket {path}: "
                          f"{exc.strerror or exc}", hint="pass another --socket") from None
    return listener


def bind_tcp(host: str, port: int, *, backlog: int = 0xFFFF) -> list[socket.socket]:
    """Listening sockets on every address ``host`` resolves to, as trio's
    ``open_tcp_listeners`` makes them (SO_REUSEADDR; IPv6 sockets v6-only; with
    port 0 each gets a free port of its own, the first one's is reported; the
    longest accept queue the kernel allows, net.core.somaxconn).

    ``cvmfsd run`` binds /metrics before cvmfsexec starts: its address is in
    glidein_config with the rest, and a taken port is known before anything runs.

    Raises:
        OSError: the host does not resolve, or no address could be bound.
    """
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _name, address in socket.getaddrinfo(
                host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(backlog)
    except (OSError, UnicodeError) as exc:
        for sock in sockets:
            sock.close()
        if isinstance(exc, OSError):
            raise
        raise OSError(f"{host!r} is not a host name: {exc}") from None
    return sockets


def split_repos(text: str) -> tuple[str, ...]:
    """Repositories from a comma- or colon-separated list (GWMS uses colons)."""
    return tuple(dict.fromkeys(r.strip() for r in re.split(r"[,:\s]+", text) if r.strip()))


@dataclass(frozen=True)
class Config:
    """Everything ``cvmfsd run`` needs to know before it starts."""

    payload: tuple[str, ...]
    repos: tuple[str, ...] = ()
    dist: Path | None = None
    glidein_config: Path | None = None
    mode: str = "auto"
    grace: float = 30.0
    mount_timeout: float = 300.0
    log_format: str = "console"
    nonesting: bool = True
    allow_keys: tuple[str, ...] = ()
    socket: Path | None = None
    allow_exec: bool = False
    probe_interval: float = 15.0
    probe_deadline: float = 5.0
    hang_timeout: float = 120.0
    metrics_address: str = "127.0.0.1:0"
    metrics_interval: float = 15.0
    metrics_textfile: Path | None = None
    pushgateway: str | None = None
    environ: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))

    def __post_init__(self) -> None:
        if not self.payload:
            raise UsageError("cvmfsd run: no payload given; expected: cvmfsd run [OPTIONS] -- "
                             "COMMAND [ARGS...]")
        if self.mode not in MODES:
            raise UsageError(f"--mode {self.mode!r}: expected one of {', '.join(MODES)}")
        if self.grace < 0 or self.mount_timeout <= 0:
            raise UsageError("--grace must be >= 0 and --mount-timeout > 0 seconds")
        if self.log_format not in ("console", "json"):
            raise UsageError(f"--log-format {self.log_format!r}: expected console or json")
        for repo in self.repos:
            problem = repo_name_problem(repo)
            if problem:
                raise UsageError(f"--repos: {problem}")
        parse_address(self.metrics_address)
        if self.metrics_interval <= 0:
            raise UsageError("--metrics-interval must be > 0 seconds")
        if self.pushgateway is not None:
            pushgateway_url(self.pushgateway)
        textfile = self.metrics_textfile
        if textfile is not None:
            if textfile.suffix != ".prom":
                raise UsageError(f"--metrics-textfile {textfile}: the name must end in .prom "
                                 "(the node exporter's textfile collector reads only *.prom)")
            if not textfile.parent.is_dir():
                raise UsageError(f"--metrics-textfile {textfile}: {textfile.parent} is not a "
                                 "directory (expected the node exporter's textfile directory)")
