"""bench/loadgen.py against the real server: what it counts is what was stored.

Small and bounded: a few hundred 1 KiB messages per test, every run capped
by a message count and a duration.
"""

from __future__ import annotations

import importlib.util
import socket
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest

from helpers import RunningServer

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _load_loadgen() -> ModuleType:
    spec = importlib.util.spec_from_file_location("loadgen", BENCH / "loadgen.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["loadgen"] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


loadgen = _load_loadgen()

ALICE, BOB = "alice@example.com", "bob@example.com"


def _stored(server: RunningServer, address: str, expected: int) -> int:
    """Files in new/, once ``expected`` are there (delivery follows the 250 by a few ms) or 10 s passed."""
    return len(server.messages(address, count=expected))


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelining", "lockstep"])
def test_every_250_is_one_stored_file(server: RunningServer, pipelining: bool) -> None:
    options = loadgen.Options(
        port=server.port, connections=10, messages=200, duration=60, size=1024,
        per_connection=7, pipelining=pipelining, to=[ALICE, BOB], timeout=20,
    )
    result = loadgen.run_sync(options)
    assert (result.accepted, result.failures, result.rcpt_rejected) == (200, 0, 0), loadgen.format_result(result)
    assert result.attempted == result.sent == 200
    assert result.connections >= 200 // 7
    assert _stored(server, ALICE, 100) == _stored(server, BOB, 100) == 100
    assert result.latency_ms["p50"] <= result.latency_ms["p99"] <= result.latency_ms["max"]
    assert sum(count for _, count in result.histogram) == 200


def test_two_recipients_one_message_per_connection(server: RunningServer) -> None:
    options = loadgen.Options(
        port=server.port, connections=5, messages=60, duration=60,
        per_connection=1, pipelining=True, rcpts=2, to=[ALICE, BOB], timeout=20,
    )
    result = loadgen.run_sync(options)
    assert (result.accepted, result.failures) == (60, 0), loadgen.format_result(result)
    assert _stored(server, ALICE, 60) == _stored(server, BOB, 60) == 60


def test_refused_recipients_are_counted_not_stored(server_factory) -> None:  # type: ignore[no-untyped-def]
    # Each refused message is two errors (550, then 503 for the pipelined
    # DATA): without --error-delay 0 the tarpit would stretch this test to a
    # minute.
    server = server_factory("--error-delay", "0")
    options = loadgen.Options(
        port=server.port, connections=3, messages=30, duration=60, pipelining=True,
        to=["nobody@example.com"], timeout=20,
    )
    result = loadgen.run_sync(options)
    assert (result.accepted, result.perm_failures, result.sent) == (0, 30, 0), loadgen.format_result(result)
    assert not (server.mail_root / "example.com" / "nobody").exists()


def test_run_ends_on_its_duration_when_nothing_listens() -> None:
    with socket.socket() as sock:  # a port that was free a moment ago
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    start = time.monotonic()
    result = loadgen.run_sync(loadgen.Options(port=port, connections=4, messages=100, duration=1.0, timeout=2))
    assert time.monotonic() - start < 5
    assert result.accepted == 0 and result.connection_errors > 0


def test_message_shape() -> None:
    for size in (300, 1024, 5000):
        message = loadgen.build_message(size, "a@example.net", "b@example.com")
        assert len(message) == size
        lines = message.split(b"\r\n")
        assert lines[-1] == b"" and b"\n" not in message.replace(b"\r\n", b"")
        assert max(map(len, lines)) <= 78
        assert not any(line.startswith(b".") for line in lines)
