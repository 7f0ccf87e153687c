"""The control protocol: verbs and their arguments, framing, responses, and shell exports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cvmfsd import protocol
from cvmfsd.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from cvmfsd.protocol import (
    EOF,
    MAX_MESSAGE,
    MAX_RESPONSE,
    NEED_DATA,
    VERBS,
    BadMessage,
    ClientConnection,
    ErrorCode,
    ExecArgs,
    GetArgs,
    NoArgs,
    RemountArgs,
    Request,
    RequestId,
    Response,
    Sentinel,
    ServerConnection,
    Verb,
    WaitArgs,
    encode_request,
    error,
    export_problem,
    make_request,
    ok,
    shell_exports,
)


def line(obj: object) -> bytes:
    """One request line as a client would write it."""
    return json.dumps(obj).encode() + b"\n"


def drain(server: ServerConnection) -> list[Request | BadMessage | Sentinel]:
    """Every event up to and including the first NEED_DATA or EOF."""
    events: list[Request | BadMessage | Sentinel] = []
    while True:
        event = server.next_event()
        events.append(event)
        if isinstance(event, Sentinel):
            return events


def parse(*chunks: bytes) -> list[Request | BadMessage | Sentinel]:
    """The events a fresh server produces from ``chunks``, fed one at a time."""
    server = ServerConnection()
    events: list[Request | BadMessage | Sentinel] = []
    for chunk in chunks:
        server.receive_data(chunk)
        events.extend(e for e in drain(server) if e is not NEED_DATA)
    return [*events, NEED_DATA] if not events or events[-1] is not EOF else events


def one(obj: object) -> Request | BadMessage:
    """The single event a request object parses to."""
    first, rest = parse(line(obj))[0], parse(line(obj))[1:]
    assert rest == [NEED_DATA]
    assert not isinstance(first, Sentinel)
    return first


def roundtrip(response: Response) -> Response | Sentinel:
    """``response`` as the client reads it after the server has encoded it."""
    client = ClientConnection()
    client.receive_data(ServerConnection().send(response))
    return client.next_event()


# -- verbs and arguments -----------------------------------------------------------------

VALID = [
    # (verb, args on the wire, typed args)
    ("ping", None, NoArgs()),
    ("status", {}, NoArgs()),
    ("env", None, NoArgs()),
    ("config", None, NoArgs()),
    ("mounts", None, NoArgs()),
    ("stop", None, NoArgs()),
    ("metrics", None, NoArgs()),
    ("classad", None, NoArgs()),
    ("get", {"key": "GLIDEIN_Site"}, GetArgs("GLIDEIN_Site")),
    ("get", {"key": "_" + "x" * 255}, GetArgs("_" + "x" * 255)),
    ("wait", {"path": "/cvmfs/atlas.cern.ch"}, WaitArgs("/cvmfs/atlas.cern.ch", 60.0)),
    ("wait", {"path": "/cvmfs/a.b/x/./y", "timeout": 0.5}, WaitArgs("/cvmfs/a.b/x/./y", 0.5)),
    ("wait", {"path": "/cvmfs/a.b", "timeout": 86400}, WaitArgs("/cvmfs/a.b", 86400.0)),
    ("exec", {"argv": ["ls", "-l"]}, ExecArgs(("ls", "-l"))),
    ("exec", {"argv": ["sh"], "cwd": "/srv/job", "env": {"A": "1", "B": "é\n"}},
     ExecArgs(("sh",), "/srv/job", {"A": "1", "B": "é\n"})),
    ("exec", {"argv": ["sh"], "cwd": None, "env": None}, ExecArgs(("sh",))),
    ("remount", {"repo": "atlas.cern.ch"}, RemountArgs("atlas.cern.ch")),
]


def test_every_verb_has_a_valid_case() -> None:
    """The table of valid requests covers every verb."""
    assert {verb.value for verb in Verb} == {case[0] for case in VALID}


@pytest.mark.parametrize(("verb", "args", "typed"), VALID)
def test_valid_request_parses_to_typed_args(
        verb: str, args: dict[str, object] | None, typed: object) -> None:
    """A valid request of each verb parses to its typed dataclass."""
    message: dict[str, object] = {"v": 1, "id": 9, "verb": verb}
    if args is not None:
        message["args"] = args
    assert Request(9, Verb(verb), typed) == one(message)  # type: ignore[arg-type]


BAD_ARGS = [
    # (verb, args, where the message points, what it says)
    ("ping", {"x": 1}, 'unknown argument "x"', "expected no arguments"),
    ("get", {}, "missing argument args.key", "expected a string matching"),
    ("get", {"key": 3}, "args.key: got number 3", "expected a string matching"),
    ("get", {"key": "a b"}, 'args.key: got string "a b"', "expected a string matching"),
    ("get", {"key": "1a"}, "args.key", "expected a string matching"),
    ("get", {"key": "a" * 257}, "args.key", "at most 256 characters"),
    ("get", {"key": "a", "kye": "b"}, 'unknown argument "kye"', "expected only key"),
    ("wait", {}, "missing argument args.path", "expected an absolute path /cvmfs/<repository>"),
    ("wait", {"path": 5}, "args.path: got number 5", "expected an absolute path"),
    ("wait", {"path": "cvmfs/a.b"}, "args.path", "is not absolute"),
    ("wait", {"path": "/etc/x"}, "args.path", "is not under /cvmfs/"),
    ("wait", {"path": "/cvmfs/"}, "args.path", "is not under /cvmfs/"),
    ("wait", {"path": "/cvmfs/a.b/../../etc"}, "args.path", "has a '..' component"),
    ("wait", {"path": "/cvmfs//tmp/x"}, "args.path", "does not name a repository after /cvmfs/"),
    ("wait", {"path": "/cvmfs/etc/passwd"}, "args.path", "does not name a repository"),
    ("wait", {"path": "/cvmfs/a\0b"}, "args.path", "contains NUL"),
    ("wait", {"path": "/cvmfs/a\ud800"}, "args.path", "lone surrogate"),
    ("wait", {"path": "/cvmfs/" + "é" * 2045}, "args.path", "got a path of 4097 bytes"),
    ("wait", {"path": "/cvmfs/a.b", "timeout": 0}, "args.timeout: got number 0",
     "expected a number of seconds, 0 < timeout <= 86400"),
    ("wait", {"path": "/cvmfs/a.b", "timeout": -1}, "args.timeout", "0 < timeout"),
    ("wait", {"path": "/cvmfs/a.b", "timeout": 86400.5}, "args.timeout", "0 < timeout"),
    ("wait", {"path": "/cvmfs/a.b", "timeout": "5"}, "args.timeout: got string", "0 < timeout"),
    ("wait", {"path": "/cvmfs/a.b", "timeout": True}, "args.timeout: got true", "0 < timeout"),
    ("wait", {"path": "/cvmfs/a.b", "timeout": None}, "args.timeout: got null", "0 < timeout"),
    ("exec", {}, "missing argument args.argv", "expected a non-empty array"),
    ("exec", {"argv": []}, "args.argv: got an array of 0 items", "expected a non-empty array"),
    ("exec", {"argv": "ls"}, "args.argv: got string", "expected a non-empty array"),
    ("exec", {"argv": ["ls", 3]}, "args.argv[1]: got number 3", "strings without NUL"),
    ("exec", {"argv": ["ls\0"]}, "args.argv[0]", "contains NUL"),
    ("exec", {"argv": [""]}, "args.argv[0]: the program name is empty", "the first non-empty"),
    ("exec", {"argv": ["x"] * 4097}, "args.argv: got an array of 4097 items", "at most 4096"),
    ("exec", {"argv": ["ls"], "cwd": "tmp"}, "args.cwd", "is not absolute"),
    ("exec", {"argv": ["ls"], "cwd": 3}, "args.cwd: got number 3", "expected an absolute path"),
    ("exec", {"argv": ["ls"], "env": []}, "args.env: got an array", "expected an object"),
    ("exec", {"argv": ["ls"], "env": {"A": 1}}, 'args.env["A"]: got number 1', "to strings"),
    ("exec", {"argv": ["ls"], "env": {"": "x"}}, 'args.env[""]', "no '='"),
    ("exec", {"argv": ["ls"], "env": {"A=B": "x"}}, 'args.env["A=B"]', "no '='"),
    ("exec", {"argv": ["ls"], "env": {"A": "a\0"}}, 'args.env["A"]', "contains NUL"),
    ("exec", {"argv": ["ls"], "shell": True}, 'unknown argument "shell"',
     "expected only argv, cwd, env"),
    ("remount", {}, "missing argument args.repo", "a repository name"),
    ("remount", {"repo": 1}, "args.repo: got number 1", "a repository name"),
    ("remount", {"repo": "Atlas.cern.ch"}, "args.repo: invalid repository name",
     "expected lowercase letters"),
    ("remount", {"repo": "../etc"}, "args.repo", "expected lowercase letters"),
    ("remount", {"repo": "a." * 200}, "args.repo: got string", "a repository name"),
]


@pytest.mark.parametrize(("verb", "args", "where", "expected"), BAD_ARGS)
def test_bad_args_are_a_bad_request_naming_the_field(
        verb: str, args: dict[str, object], where: str, expected: str) -> None:
    """Each kind of bad argument is a bad-request that names the field and what was expected."""
    event = one({"v": 1, "id": 42, "verb": verb, "args": args})
    assert isinstance(event, BadMessage)
    assert (event.id, event.code) == (42, ErrorCode.BAD_REQUEST)
    assert event.message.startswith(f"{verb}: ")
    assert where in event.message
    assert expected in event.message


@pytest.mark.parametrize(("verb", "args", "where", "expected"), BAD_ARGS)
def test_client_side_checks_match_the_server(
        verb: str, args: dict[str, object], where: str, expected: str) -> None:
    """make_request refuses what the server refuses, with the same message."""
    server_says = one({"v": 1, "verb": verb, "args": args})
    assert isinstance(server_says, BadMessage)
    with pytest.raises(LocalProtocolError) as info:
        make_request(verb, args)
    assert (server_says.code.value, server_says.message) == (info.value.code, str(info.value))


def test_args_check_themselves_on_construction() -> None:
    """Args built in Python are checked like args read from the wire."""
    with pytest.raises(LocalProtocolError, match=r"^wait: args.path: .* is not under /cvmfs/"):
        WaitArgs("/etc/passwd")
    with pytest.raises(LocalProtocolError, match=r"^get: args.key") as info:
        GetArgs("no spaces")
    assert info.value.code == "bad-request"


def test_args_are_normalised_to_immutable_forms() -> None:
    """Arrays become tuples, objects read-only mappings, and timeouts floats."""
    args = ExecArgs(["a", "b"], env={"K": "v"})  # type: ignore[arg-type]
    assert args.argv == ("a", "b")
    assert isinstance(args.env, Mapping)
    with pytest.raises(TypeError):
        args.env["K"] = "w"  # type: ignore[index]
    assert WaitArgs("/cvmfs/a.b", 5).timeout == 5.0


def test_request_refuses_args_of_another_verb() -> None:
    """A Request's args must be the dataclass its verb names."""
    with pytest.raises(LocalProtocolError, match="get: args: got NoArgs; expected GetArgs"):
        Request(None, Verb.GET, NoArgs())
    with pytest.raises(LocalProtocolError, match='field "id"'):
        Request(True, Verb.PING, NoArgs())


def test_verb_table_matches_the_dataclasses() -> None:
    """Every argument in VERBS is a field of the verb's dataclass, with the same default."""
    import dataclasses

    for spec in VERBS.values():
        fields = {f.name: f for f in dataclasses.fields(spec.args_type)}  # type: ignore[arg-type]
        assert [arg.name for arg in spec.args] == list(fields)
        for arg in spec.args:
            has_default = fields[arg.name].default is not dataclasses.MISSING
            assert arg.required != has_default, arg.name
            if has_default:
                assert arg.default == fields[arg.name].default, arg.name


ENVELOPE = [
    # (line, code, fragment of the message)
    (b"not json", ErrorCode.BAD_REQUEST, "malformed JSON at column 1"),
    (b"[1, 2]", ErrorCode.BAD_REQUEST, "got an array of 2 items; expected a request object"),
    (b'"ping"', ErrorCode.BAD_REQUEST, "expected a request object"),
    (b'{"verb": "ping"}', ErrorCode.BAD_REQUEST, 'field "v": got nothing; expected'),
    (b'{"v": "1", "verb": "ping"}', ErrorCode.BAD_REQUEST, 'field "v": got string "1"'),
    (b'{"v": true, "verb": "ping"}', ErrorCode.BAD_REQUEST, 'field "v": got true'),
    (b'{"v": 2, "verb": "ping"}', ErrorCode.UNSUPPORTED_VERSION, "protocol version 2"),
    (b'{"v": 1}', ErrorCode.BAD_REQUEST, 'field "verb": got null'),
    (b'{"v": 1, "verb": 3}', ErrorCode.BAD_REQUEST, 'field "verb": got number 3'),
    (b'{"v": 1, "verb": "PING"}', ErrorCode.UNKNOWN_VERB, 'unknown verb "PING"; expected one'),
    (b'{"v": 1, "verb": "ping", "arg": {}}', ErrorCode.BAD_REQUEST,
     'unknown field "arg"; expected only v, id, verb, args'),
    (b'{"v": 1, "verb": "ping", "args": []}', ErrorCode.BAD_REQUEST, "ping: args: got an array"),
    (b'{"v": 1, "verb": "ping", "args": null}', ErrorCode.BAD_REQUEST, "ping: args: got null"),
    (b'{"v": 1, "verb": "ping", "id": true}', ErrorCode.BAD_REQUEST, 'field "id": got true'),
    (b'{"v": 1, "verb": "ping", "id": 1.5}', ErrorCode.BAD_REQUEST, 'field "id": got number'),
    (b'{"v": 1, "verb": "ping", "id": 9223372036854775808}', ErrorCode.BAD_REQUEST,
     'field "id"'),
    (b'{"v": 1, "verb": "ping", "id": "' + b"x" * 65 + b'"}', ErrorCode.BAD_REQUEST,
     "at most 64 characters"),
    (b'{"v": 1, "verb": "ping", "v": 1}', ErrorCode.BAD_REQUEST, 'duplicate key "v"'),
    (b'{"v": 1, "verb": "wait", "args": {"path": "/cvmfs/a.b", "timeout": NaN}}',
     ErrorCode.BAD_REQUEST, "NaN is not JSON"),
    (b'{"v": 1, "verb": "wait", "args": {"path": "/cvmfs/a.b", "timeout": 1e999}}',
     ErrorCode.BAD_REQUEST, "args.timeout: got number inf"),
    (b'{"v": 1, "verb": "ping", "id": ' + b"9" * 5000 + b"}", ErrorCode.BAD_REQUEST, ""),
    (b"[" * 30000 + b"]" * 30000, ErrorCode.BAD_REQUEST, ""),
    (b'{"v": 1, "verb": "\xff"}', ErrorCode.BAD_REQUEST, "not UTF-8 (bad byte at offset 18)"),
    (b'\xef\xbb\xbf{"v": 1, "verb": "ping"}', ErrorCode.BAD_REQUEST, "malformed JSON"),
]


@pytest.mark.parametrize(("data", "code", "fragment"), ENVELOPE)
def test_bad_envelope(data: bytes, code: ErrorCode, fragment: str) -> None:
    """A malformed message is a BadMessage with the right code, and the connection lives on."""
    events = parse(data + b"\n" + line({"v": 1, "verb": "ping"}))
    assert len(events) == 3
    bad, after = events[0], events[1]
    assert isinstance(bad, BadMessage)
    assert code == bad.code
    assert fragment in bad.message
    assert Request(None, Verb.PING, NoArgs()) == after


def test_valid_id_is_echoed_in_a_bad_message() -> None:
    """Once the id has been read, a later problem still answers to it."""
    event = one({"v": 1, "id": "abc", "verb": "nope"})
    assert isinstance(event, BadMessage)
    assert (event.id, event.code) == ("abc", ErrorCode.UNKNOWN_VERB)
    assert error("abc", ErrorCode.UNKNOWN_VERB, event.message) == event.response()


# -- framing -----------------------------------------------------------------------------

PING = line({"v": 1, "id": 1, "verb": "ping"})
WAIT = line({"v": 1, "id": "w", "verb": "wait", "args": {"path": "/cvmfs/a.b/é"}})


def test_split_at_every_byte_boundary() -> None:
    """A request split anywhere into two chunks parses the same as whole."""
    whole = parse(WAIT)
    for cut in range(1, len(WAIT)):
        assert whole == parse(WAIT[:cut], WAIT[cut:]), cut


def test_fed_one_byte_at_a_time() -> None:
    """Single-byte chunks (splitting UTF-8 sequences too) still give the whole request."""
    assert parse(WAIT) == parse(*(bytes([b]) for b in WAIT))


def test_several_requests_in_one_chunk_come_out_in_order() -> None:
    """Pipelined requests in one chunk come out one by one, in order."""
    events = parse(PING + WAIT + b"\n \r\n" + PING.replace(b"\n", b"\r\n"))
    assert [e.id for e in events[:-1]] == [1, "w", 1]  # type: ignore[union-attr]
    assert NEED_DATA is events[-1]


def padded(size: int) -> bytes:
    """A ping request of exactly ``size`` bytes, padded with JSON whitespace."""
    body = b'{"v":1,"verb":"ping"}'
    return body[:-1] + b" " * (size - len(body)) + b"}"


def test_line_exactly_at_the_limit_passes() -> None:
    """A message of exactly MAX_MESSAGE bytes (plus its newline) is accepted."""
    server = ServerConnection()
    server.receive_data(padded(MAX_MESSAGE))
    assert NEED_DATA is server.next_event()
    server.receive_data(b"\n")
    assert Request(None, Verb.PING, NoArgs()) == server.next_event()
    assert not server.must_close


@pytest.mark.parametrize("newline", [b"\n", b""])
def test_one_byte_over_the_limit_is_too_large_and_closes(newline: bytes) -> None:
    """One byte over the limit is too-large, newline or not, and the connection must close."""
    server = ServerConnection()
    server.receive_data(PING + padded(MAX_MESSAGE + 1) + newline + PING)
    first, closing_before = server.next_event(), server.must_close
    event = server.next_event()
    assert isinstance(first, Request)
    assert isinstance(event, BadMessage)
    assert (event.id, event.code) == (None, ErrorCode.TOO_LARGE)
    assert (first.id, closing_before, server.must_close) == (1, False, True)
    assert EOF is server.next_event()
    with pytest.raises(LocalProtocolError, match="after must_close"):
        server.receive_data(PING)
    server.receive_data(b"")  # the adapter's EOF is harmless
    assert EOF is server.next_event()
    assert roundtrip(event.response()) == event.response()


def test_too_large_is_found_before_the_newline_arrives() -> None:
    """A line is refused as soon as more than MAX_MESSAGE bytes arrived without a newline."""
    server = ServerConnection()
    for _ in range(MAX_MESSAGE // 1024):
        server.receive_data(b" " * 1024)
        assert NEED_DATA is server.next_event()
    server.receive_data(b" ")
    assert server.next_event().code == ErrorCode.TOO_LARGE  # type: ignore[union-attr]


def test_eof_mid_line_is_a_bad_message_then_eof() -> None:
    """A connection closed inside a message reports it, then EOF."""
    server = ServerConnection()
    server.receive_data(PING + PING[:-1])
    server.receive_data(b"")
    first, closing_before = server.next_event(), server.must_close
    event = server.next_event()
    assert isinstance(first, Request)
    assert isinstance(event, BadMessage)
    assert event.code == ErrorCode.BAD_REQUEST
    assert f"connection closed after {len(PING) - 1} bytes" in event.message
    assert (first.id, closing_before, server.must_close) == (1, False, True)
    assert [server.next_event(), server.next_event()] == [EOF, EOF]


def test_clean_eof_after_blank_lines() -> None:
    """Trailing blank lines before EOF are not a message."""
    assert parse(b"\n  \r\n \t", b"") == [EOF]


def test_data_after_eof_is_a_local_error() -> None:
    """Feeding data after b"" is the adapter's bug; a repeated b"" is not."""
    server = ServerConnection()
    server.receive_data(b"")
    server.receive_data(b"")
    with pytest.raises(LocalProtocolError, match="after EOF"):
        server.receive_data(b"x")


# -- responses and the client ------------------------------------------------------------

RESPONSES = [
    ok(1, None),
    ok("x", {"repos": ["a.b"], "ready": True, "n": 1.5}),
    ok(None, "pong"),
    ok(7, {"status": 0}),
    *(error(3, code, f"something about {code.value}") for code in ErrorCode),
    error(None, ErrorCode.INTERNAL, "é \ud800 \n"),
]


@pytest.mark.parametrize("response", RESPONSES)
def test_response_round_trip(response: Response) -> None:
    """Every response the server sends reads back equal on the client."""
    assert response == roundtrip(response)


def test_response_wire_format() -> None:
    """Responses are compact one-line JSON with the documented fields."""
    server = ServerConnection()
    assert server.send(ok(7, {"status": 0})) == b'{"v":1,"id":7,"ok":true,"result":{"status":0}}\n'
    assert (server.send(error(None, ErrorCode.NOT_FOUND, "no key X"))
            == b'{"v":1,"id":null,"ok":false,"error":{"code":"not-found","message":"no key X"}}\n')


def test_client_reads_pipelined_responses_and_eof() -> None:
    """Responses split anyhow come out in order, then EOF once the server closes."""
    data = b"".join(ServerConnection().send(r) for r in RESPONSES)
    client = ClientConnection()
    got: list[Response | Sentinel] = []
    for start in range(0, len(data), 7):
        client.receive_data(data[start:start + 7])
        while (event := client.next_event()) is not NEED_DATA:
            got.append(event)
    client.receive_data(b"")
    assert [*RESPONSES, EOF] == [*got, client.next_event()]


CLIENT_GARBAGE = [
    # (what the server sent, code of the RemoteProtocolError)
    (b"nope\n", "bad-request"),
    (b"[]\n", "bad-request"),
    (b'{"v":2,"id":1,"ok":true,"result":1}\n', "unsupported-version"),
    (b'{"v":1,"id":1,"ok":true}\n', "bad-request"),
    (b'{"id":1,"ok":true,"result":1}\n', "bad-request"),
    (b'{"v":1,"ok":true,"result":1}\n', "bad-request"),
    (b'{"v":1,"id":1,"ok":"yes","result":1}\n', "bad-request"),
    (b'{"v":1,"id":1,"ok":true,"result":1,"extra":2}\n', "bad-request"),
    (b'{"v":1,"id":1,"ok":false,"result":1}\n', "bad-request"),
    (b'{"v":1,"id":1,"ok":false,"error":"boom"}\n', "bad-request"),
    (b'{"v":1,"id":1,"ok":false,"error":{"code":"weird","message":"x"}}\n', "bad-request"),
    (b'{"v":1,"id":1,"ok":false,"error":{"code":"internal"}}\n', "bad-request"),
    (b'{"v":1,"id":[],"ok":true,"result":1}\n', "bad-request"),
    (b'{"v":1,"id":1,"ok":true,"result":NaN}\n', "bad-request"),
    (b'{"v":1,"id":1,"ok":true,"result":1}', "bad-request"),  # then EOF mid-line
    (b"x" * (MAX_RESPONSE + 1), "too-large"),
]


@pytest.mark.parametrize(("data", "code"), CLIENT_GARBAGE)
def test_client_raises_remote_protocol_error_on_garbage(data: bytes, code: str) -> None:
    """Garbage from the server is a RemoteProtocolError, raised again on every later call."""
    client = ClientConnection()
    client.receive_data(data)
    client.receive_data(b"")
    with pytest.raises(RemoteProtocolError) as first:
        client.next_event()
    assert code == first.value.code
    with pytest.raises(RemoteProtocolError) as again:
        client.next_event()
    assert first.value is again.value


@pytest.mark.parametrize(("result", "code"), [
    (object(), "internal"),
    (float("nan"), "internal"),
    ({1: {2}}, "internal"),
    ("x" * MAX_RESPONSE, "too-large"),
])
def test_server_refuses_to_send_what_it_cannot_encode(result: object, code: str) -> None:
    """A result that is not JSON, or too big, is a LocalProtocolError, not bad bytes."""
    with pytest.raises(LocalProtocolError) as info:
        ServerConnection().send(ok(1, result))
    assert code == info.value.code


def test_client_refuses_to_send_a_request_over_the_limit() -> None:
    """A request that would be too-large fails locally, before any byte is sent."""
    request = make_request("exec", {"argv": ["echo", "x" * MAX_MESSAGE]})
    with pytest.raises(LocalProtocolError) as info:
        ClientConnection().send(request)
    assert info.value.code == "too-large"


@pytest.mark.parametrize("args", [
    {"id": 1, "ok": True, "error": None, "result": None},
    {"id": 1, "ok": False},
    {"id": 1, "ok": False, "result": 1},
    {"id": 1, "ok": 1},
    {"id": 1.5, "ok": True},
])
def test_response_checks_itself(args: dict[str, object]) -> None:
    """ok, result and error must agree, and the id must be valid."""
    if args.get("error", 0) is None:
        args["error"] = error(1, ErrorCode.INTERNAL, "x").error
    with pytest.raises(LocalProtocolError):
        Response(**args)  # type: ignore[arg-type]


def test_encode_request_is_the_wire_form() -> None:
    """encode_request writes compact JSON that the server parses back."""
    data = encode_request("wait", {"path": "/cvmfs/a.b", "timeout": 5}, id=3)
    assert data == b'{"v":1,"id":3,"verb":"wait","args":{"path":"/cvmfs/a.b","timeout":5.0}}\n'
    assert [Request(3, Verb.WAIT, WaitArgs("/cvmfs/a.b", 5.0)), NEED_DATA] == parse(data)
    assert encode_request(Verb.PING) == b'{"v":1,"verb":"ping"}\n'


def test_encode_request_refuses_unknown_verbs() -> None:
    """An unknown verb fails locally with the code the server would use."""
    with pytest.raises(LocalProtocolError) as info:
        encode_request("frobnicate")
    assert info.value.code == "unknown-verb"


def test_protocol_error_family() -> None:
    """ProtocolError is abstract; its subclasses carry a code and an exit status."""
    with pytest.raises(TypeError, match="abstract"):
        ProtocolError("x", code="internal")
    local = LocalProtocolError("x", code="internal")
    assert (local.exit_status, local.code) == (70, "internal")
    assert RemoteProtocolError("x", code="bad-request").exit_status == 76


def test_exit_statuses() -> None:
    """Every error code has its documented cvmfsctl exit status."""
    assert {code.value: code.exit_status for code in ErrorCode} == {
        "bad-request": 64, "unknown-verb": 76, "unsupported-version": 76, "too-large": 65,
        "not-found": 1, "refused": 77, "timeout": 124, "unavailable": 69, "internal": 70,
    }


def test_no_io_imports() -> None:
    """Importing the protocol loads no trio, socket or asyncio (the module is sans-IO)."""
    code = ("import sys, cvmfsd.protocol; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "{'trio', 'socket', 'asyncio', 'selectors', 'subprocess'}))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True).stdout
    assert out == "[]\n"


# -- properties --------------------------------------------------------------------------

def check_event(event: Request | BadMessage | Sentinel) -> None:
    """An event is well formed, and whatever the server answers reads back on the client."""
    assert not isinstance(event, Sentinel)
    if isinstance(event, Request):
        assert [event, NEED_DATA] == parse(ClientConnection().send(event))
        reply = ok(event.id, {"verb": event.verb.value})
    else:
        assert isinstance(event.code, ErrorCode)
        assert isinstance(event.message, str)
        assert event.message
        reply = event.response()
    assert reply == roundtrip(reply)


def feed_all(chunks: list[bytes], *, eof: bool) -> list[Request | BadMessage | Sentinel]:
    """Feed ``chunks`` (then EOF) to a server, checking its state after every event."""
    server = ServerConnection()
    events: list[Request | BadMessage | Sentinel] = []
    for chunk in [*chunks, b""] if eof else chunks:
        if server.must_close:
            break
        server.receive_data(chunk)
        events.extend(drain(server))
    if server.must_close:
        assert EOF is server.next_event()
    return events


FRAGMENTS = st.one_of(
    st.binary(max_size=40),
    st.sampled_from([PING, WAIT, b"\n", b"\r\n", b"{", b"}", b'"v":1,', b'"verb":"get"',
                     b'"args":{"key":"K"}', b'"id":', b"\xff", b"\xc3", b"\\ud800", b"NaN"]),
)


@settings(max_examples=300, deadline=None)  # a timing deadline only makes CI flaky
@given(fragments=st.lists(FRAGMENTS, max_size=30), eof=st.booleans(), data=st.data())
def test_arbitrary_bytes_in_arbitrary_chunks(
        fragments: list[bytes], eof: bool, data: st.DataObject) -> None:
    """Any bytes, chunked anyhow, give only well-formed events, and the replies read back."""
    stream = b"".join(fragments)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)]) if a < b]
    for event in feed_all(chunks, eof=eof):
        if not isinstance(event, Sentinel):
            check_event(event)


JSON_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False),
    st.text(max_size=20),
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=10,
)
ARG_NAMES = sorted({arg.name for spec in VERBS.values() for arg in spec.args} | {"x"})
REQUESTISH = st.fixed_dictionaries(
    {},
    optional={
        "v": st.one_of(st.just(1), JSON_VALUES),
        "id": st.one_of(st.integers(), st.text(max_size=70), JSON_VALUES),
        "verb": st.one_of(st.sampled_from([v.value for v in Verb]), JSON_VALUES),
        "args": st.one_of(
            st.dictionaries(st.sampled_from(ARG_NAMES), JSON_VALUES, max_size=4), JSON_VALUES),
        "extra": JSON_VALUES,
    },
)


@settings(max_examples=300, deadline=None)  # a timing deadline only makes CI flaky
@given(message=REQUESTISH)
def test_arbitrary_json_requests(message: dict[str, object]) -> None:
    """Any JSON object as a request gives a Request or a BadMessage, both well formed."""
    events = parse(json.dumps(message).encode() + b"\n")
    assert NEED_DATA is events[-1]
    for event in events[:-1]:
        check_event(event)


TEXT = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\0"))
IDS = st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1), st.text(max_size=64))
COMPONENT = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\0/"),
                    min_size=1, max_size=12).filter(lambda c: c != "..")
VALID_ARGS: dict[Verb, st.SearchStrategy[dict[str, object]]] = {
    verb: st.just({}) for verb, spec in VERBS.items() if not spec.args
}
VALID_ARGS[Verb.GET] = st.fixed_dictionaries(
    {"key": st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,40}", fullmatch=True)})
REPO_NAMES = st.from_regex(r"[a-z0-9][a-z0-9-]{0,8}(\.[a-z0-9][a-z0-9-]{0,8}){1,3}",
                           fullmatch=True)
VALID_ARGS[Verb.WAIT] = st.fixed_dictionaries(
    {"path": st.tuples(REPO_NAMES, st.lists(COMPONENT, max_size=4)).map(
        lambda rc: "/cvmfs/" + "/".join([rc[0], *rc[1]]))},
    optional={"timeout": st.floats(0, 86400, exclude_min=True) | st.integers(1, 86400)})
VALID_ARGS[Verb.EXEC] = st.fixed_dictionaries(
    {"argv": st.lists(TEXT, max_size=5).flatmap(
        lambda rest: TEXT.filter(bool).map(lambda first: [first, *rest]))},
    optional={
        "cwd": TEXT.map(lambda t: "/" + t),
        "env": st.dictionaries(TEXT.filter(lambda n: bool(n) and "=" not in n), TEXT,
                               max_size=4),
    })
VALID_ARGS[Verb.REMOUNT] = st.fixed_dictionaries({"repo": REPO_NAMES})
VALID_REQUESTS = st.sampled_from(list(Verb)).flatmap(
    lambda verb: st.tuples(st.just(verb), VALID_ARGS[verb], IDS))


@settings(max_examples=300, deadline=None)  # a timing deadline only makes CI flaky
@given(case=VALID_REQUESTS)
def test_valid_requests_round_trip(case: tuple[Verb, dict[str, object], RequestId]) -> None:
    """A valid request goes to bytes and back to an equal Request, by either encoder."""
    verb, args, request_id = case
    request = make_request(verb, args, request_id)
    data = ClientConnection().send(request)
    assert data == encode_request(verb.value, args, id=request_id)
    assert [request, NEED_DATA] == parse(data)


# -- shell exports -----------------------------------------------------------------------

EXPORTS = [
    ({"A": "plain"}, "export A='plain'\n"),
    ({"A": "it's"}, "export A='it'\\''s'\n"),
    ({"A": ""}, "export A=''\n"),
    ({"A": "$HOME `id` \\n \"q\"\nline2"}, "export A='$HOME `id` \\n \"q\"\nline2'\n"),
    ({"_a1": "x", "B": "y"}, "export _a1='x'\nexport B='y'\n"),
    ({"1A": "x"}, "# skipped '1A': not a valid shell variable name\n"),
    ({"A-B": "x"}, "# skipped 'A-B': not a valid shell variable name\n"),
    ({"É": "x"}, "# skipped '\\xc9': not a valid shell variable name\n"),
    ({"A\nrm -rf /": "x"}, "# skipped 'A\\nrm -rf /': not a valid shell variable name\n"),
    ({"UID": "0"}, "# skipped 'UID': a variable the shell manages itself\n"),
    ({"A": "a\0b"}, "# skipped 'A': the value contains NUL, which no shell variable can hold\n"),
]


@pytest.mark.parametrize(("values", "expected"), EXPORTS)
def test_shell_exports(values: dict[str, str], expected: str) -> None:
    """Values are single-quoted; unusable variables are skipped with a comment."""
    assert expected == shell_exports(values)


def test_export_problem() -> None:
    """export_problem says why a variable is skipped, or None."""
    assert export_problem("GLIDEIN_Site", "x") is None
    assert export_problem("a b", "x") == "not a valid shell variable name"


# Both are required (bash is essential on Debian, dash is its /bin/sh): payloads
# eval the output in either, so the test must never quietly shrink to one.
SHELLS = ["bash", "dash"]
SHELL_KEYS = st.from_regex(r"[A-Za-z0-9_]{0,12}", fullmatch=True).map(lambda s: "CVMFSD_T_" + s)


@settings(max_examples=50, deadline=None)
@given(values=st.dictionaries(SHELL_KEYS, TEXT, min_size=1, max_size=4))
def test_shell_exports_survive_eval(values: dict[str, str]) -> None:
    """eval "$(cat file)" in bash and dash reproduces every value byte for byte."""
    names = list(values)
    script = ('eval "$(cat "$1")"; printf \'%s\\0\' '
              + " ".join(f'"${name}"' for name in names))
    with tempfile.NamedTemporaryFile("wb", suffix=".sh") as file:
        file.write(shell_exports(values).encode())
        file.flush()
        for shell in SHELLS:
            out = subprocess.run([shell, "-c", script, "sh", file.name], check=True,
                                 capture_output=True, env={"PATH": os.environ["PATH"]}).stdout
            assert [values[name].encode() for name in names] == out.split(b"\0")[:-1], shell


# -- the parsed-request memo ---------------------------------------------------------------

def test_a_line_seen_before_is_not_parsed_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """The second connection sending a line gets the Request the first one's parse built."""
    monkeypatch.setattr(protocol, "_PARSED", {})
    calls: list[bytes] = []
    real_loads = protocol._loads

    def counting_loads(data: bytes) -> object:
        calls.append(data)
        return real_loads(data)

    monkeypatch.setattr(protocol, "_loads", counting_loads)
    request = line({"v": 1, "verb": "get", "args": {"key": "GLIDEIN_Site"}})
    first, second = parse(request)[0], parse(request)[0]
    assert first is second
    assert first == Request(None, Verb.GET, GetArgs("GLIDEIN_Site"))
    assert len(calls) == 1
    other = parse(line({"v": 1, "id": 2, "verb": "get", "args": {"key": "GLIDEIN_Site"}}))[0]
    assert isinstance(other, Request)
    assert other.id == 2  # another id is another line: parsed, and answered with its own id
    assert len(calls) == 2


def test_the_memo_is_bounded_and_forgets_the_oldest(monkeypatch: pytest.MonkeyPatch) -> None:
    """At most _PARSED_ENTRIES lines are kept, the oldest going first; long lines never."""
    monkeypatch.setattr(protocol, "_PARSED", {})
    lines = [line({"v": 1, "id": n, "verb": "ping"}) for n in range(protocol._PARSED_ENTRIES + 1)]
    for data in lines:
        parse(data)
    assert len(protocol._PARSED) == protocol._PARSED_ENTRIES
    assert lines[0].rstrip(b"\n") not in protocol._PARSED
    assert lines[-1].rstrip(b"\n") in protocol._PARSED
    long = line({"v": 1, "verb": "exec", "args": {"argv": ["x" * protocol._PARSED_LINE]}})
    assert isinstance(parse(long)[0], Request)
    assert long.rstrip(b"\n") not in protocol._PARSED


def test_refused_lines_are_not_kept_and_each_gets_its_own_answer(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A bad request is parsed, and refused with its own message, every time it comes."""
    monkeypatch.setattr(protocol, "_PARSED", {})
    bad = line({"v": 1, "id": 9, "verb": "get", "args": {"key": "no spaces"}})
    first, second = parse(bad)[0], parse(bad)[0]
    assert isinstance(first, BadMessage)
    assert first == second
    assert (first.id, first.code) == (9, ErrorCode.BAD_REQUEST)
    assert protocol._PARSED == {}


def test_a_shared_request_cannot_be_changed_by_whoever_got_it() -> None:
    """Sharing parsed Requests is safe only because nothing in them can change."""
    request = one({"v": 1, "verb": "exec",
                   "args": {"argv": ["env"], "env": {"A": "1"}, "cwd": "/"}})
    assert isinstance(request, Request)
    assert isinstance(request.args, ExecArgs)
    assert isinstance(request.args.argv, tuple)
    assert request.args.env is not None
    with pytest.raises(TypeError):
        request.args.env["A"] = "2"  # type: ignore[index]
    with pytest.raises(AttributeError):
        request.args.argv = ("id",)  # type: ignore[misc]


_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20)


@given(_JSON_VALUES)
@settings(max_examples=300)
def test_the_made_once_encoder_writes_what_json_writes(value: object) -> None:
    """``_encode_json`` is ``_ENCODER.encode``, made once: the same text for every value."""
    assert protocol._encode_json(value) == protocol._ENCODER.encode(value)


@pytest.mark.parametrize(("value", "problem"), [
    ({"x": float("nan")}, "Out of range float"),
    ({"x": object()}, "not JSON serializable"),
    ({"x": b"bytes"}, "not JSON serializable"),
])
def test_values_json_cannot_hold_are_internal_errors(value: object, problem: str) -> None:
    """A result JSON cannot hold is refused as ``internal``, and refused again the next time."""
    for _ in range(2):  # nothing of the first failure stays behind in the encoder
        with pytest.raises(LocalProtocolError, match=problem) as caught:
            ServerConnection().send(Response(1, True, value))
        assert caught.value.code == ErrorCode.INTERNAL.value


def test_a_cycle_is_an_internal_error_and_leaves_the_encoder_sound() -> None:
    """A circular result ends in RecursionError inside the encoder, refused as ``internal``."""
    cycle: list[object] = []
    cycle.append(cycle)
    with pytest.raises(LocalProtocolError, match="cannot be encoded") as caught:
        ServerConnection().send(Response(1, True, cycle))
    assert caught.value.code == ErrorCode.INTERNAL.value
    shared = {"a": 1}
    assert ServerConnection().send(Response(2, True, [shared, shared])) == (
        b'{"v":1,"id":2,"ok":true,"result":[{"a":1},{"a":1}]}\n')
