"""The asyncio LMTP client (fastsmtp.lmtp.client) against scripted servers on 127.0.0.1.

What a real Dovecot cannot easily be made to do: stay silent, talk
garbage, drop the connection in the middle of DATA or between two
recipients' replies, run without PIPELINING, or close a kept connection.
Every test is bounded in time (the client's own timeouts are short here,
and each test's client side runs under ``asyncio.wait_for``), and runs
under uvloop and under the stdlib loop.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Coroutine, Iterator, TypeVar

import pytest
import uvloop

from helpers import LOOPS

from fastsmtp.lmtp.client import (
    NOT_UTF8,
    LMTPClient,
    LMTPTemporaryError,
    RecipientResult,
    Target,
    parse_target,
)

T = TypeVar("T")
FAST = {"connect_timeout": 0.5, "command_timeout": 0.5, "data_timeout": 0.5}
MESSAGE = b"Subject: hi\r\n\r\n.dot\r\nbody\r\n"


@pytest.fixture(autouse=True, params=LOOPS)
def loop(request: pytest.FixtureRequest) -> Iterator[str]:
    """Every test under uvloop (as the server runs) and under the stdlib loop."""
    before = asyncio.get_event_loop_policy()
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy() if request.param == "uvloop" else None)
    try:
        yield request.param
    finally:
        asyncio.set_event_loop_policy(before)


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 20))


# -- targets -------------------------------------------------------------------------


@pytest.mark.parametrize("spec, expected", [
    ("lmtp:unix:/run/dovecot/lmtp", Target("lmtp:unix:/run/dovecot/lmtp", path="/run/dovecot/lmtp")),
    ("lmtp:127.0.0.1:24", Target("lmtp:127.0.0.1:24", host="127.0.0.1", port=24)),
    ("lmtp:mail.example:2424", Target("lmtp:mail.example:2424", host="mail.example", port=2424)),
    ("lmtp:[::1]:24", Target("lmtp:[::1]:24", host="::1", port=24)),
    ("LMTP:[2001:db8::1]:24", Target("LMTP:[2001:db8::1]:24", host="2001:db8::1", port=24)),
])
def test_parse_target(spec: str, expected: Target) -> None:
    assert parse_target(spec) == expected
    assert str(parse_target(spec)) == spec


@pytest.mark.parametrize("spec", ["", "lmtp:", "lmtp:unix:", "smtp:127.0.0.1:25", "lmtp:127.0.0.1", "lmtp:::1:24",
                                  "lmtp:127.0.0.1:0", "lmtp:127.0.0.1:65536", "lmtp:[::1]", "unix:/run/lmtp"])
def test_parse_target_refuses(spec: str) -> None:
    with pytest.raises(ValueError):
        parse_target(spec)


# -- a scripted server ---------------------------------------------------------------


@dataclass
class Script:
    """How a fake LMTP server behaves; ``seen`` collects the command lines it read."""

    greeting: bytes = b"220 fake.example LMTP ready\r\n"
    pipelining: bool = True
    mail: bytes = b"250 2.1.0 OK\r\n"
    rcpt: Callable[[bytes], bytes] = lambda r: b"250 2.1.5 OK\r\n"
    data: bytes = b"354 OK\r\n"
    #: What follows the final dot, given the accepted recipients (None: the connection is dropped).
    delivery: Callable[[list[bytes]], bytes | None] = lambda rs: b"".join(
        b"250 2.0.0 <%s> Saved\r\n" % r for r in rs)
    drop_in_data: bool = False
    close_after: int = 0  # close the connection after this many transactions (0: never)
    seen: list[bytes] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    connections: int = 0


async def lmtp_server(script: Script, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    script.connections += 1
    try:
        writer.write(script.greeting)
        accepted: list[bytes] = []
        mail_ok = False
        transactions = 0
        while line := await reader.readline():
            script.seen.append(line)
            verb = line[:4].upper()
            if verb == b"LHLO":
                writer.write(b"250-fake.example\r\n250-8BITMIME\r\n250-ENHANCEDSTATUSCODES\r\n"
                             + (b"250 PIPELINING\r\n" if script.pipelining else b"250 CHUNKING\r\n"))
            elif verb == b"MAIL":
                accepted = []
                mail_ok = script.mail.startswith(b"2")
                writer.write(script.mail)
            elif verb == b"RCPT":
                rcpt = line[9:].split(b">")[0]
                reply = script.rcpt(rcpt)
                if not mail_ok:
                    reply = b"503 5.5.1 MAIL needed first\r\n"
                elif reply.startswith(b"2"):
                    accepted.append(rcpt)
                writer.write(reply)
            elif verb == b"DATA":
                if not accepted:
                    writer.write(b"503 5.5.1 No valid recipients\r\n")
                    continue
                writer.write(script.data)
                if not script.data.startswith(b"354"):
                    continue
                if script.drop_in_data:
                    await reader.read(10)
                    return
                body = b""
                while not body.endswith(b"\r\n.\r\n") and body != b".\r\n":
                    chunk = await reader.read(65536)
                    if not chunk:
                        return
                    body += chunk
                script.bodies.append(body)
                replies = script.delivery(accepted)
                if replies is None:
                    return
                writer.write(replies)
                transactions += 1
                if script.close_after and transactions >= script.close_after:
                    await writer.drain()
                    return
            elif verb == b"RSET":
                writer.write(b"250 2.0.0 OK\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 2.0.0 Bye\r\n")
                return
            else:
                writer.write(b"500 5.5.2 what\r\n")
            await writer.drain()
    finally:
        writer.close()


async def serve(handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
                ) -> tuple[asyncio.Server, str]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"lmtp:127.0.0.1:{port}"


async def scripted(script: Script) -> tuple[asyncio.Server, str]:
    return await serve(lambda r, w: lmtp_server(script, r, w))


async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read()  # never a greeting
    writer.close()


def verbs(script: Script) -> list[bytes]:
    return [line.split()[0] for line in script.seen]


# -- tests ---------------------------------------------------------------------------


def test_a_silent_server_times_out_promptly() -> None:
    async def go() -> float:
        server, target = await serve(silent)
        async with server, LMTPClient([target], lhlo_name="mx.test.example", **FAST) as client:
            t0 = time.monotonic()
            with pytest.raises(LMTPTemporaryError, match="timed out"):
                await client.deliver("s@example.net", ["a@example.com"], MESSAGE)
            return time.monotonic() - t0

    assert run(go()) < 2.0


@pytest.mark.parametrize("greeting", [b"HTTP/1.1 400 Bad Request\r\n", b"421 4.3.2 going down\r\n",
                                      b"554 5.3.2 no\r\n", b"220 " + b"x" * 5000 + b"\r\n"])
def test_garbage_or_a_refusing_greeting_is_temporary(greeting: bytes) -> None:
    async def go() -> None:
        server, target = await scripted(Script(greeting=greeting))
        async with server, LMTPClient([target], lhlo_name="mx.test.example", **FAST) as client:
            with pytest.raises(LMTPTemporaryError):
                await client.deliver("s@example.net", ["a@example.com"], MESSAGE)
            with pytest.raises(LMTPTemporaryError):
                await client.probe("a@example.com")

    run(go())


def test_connection_lost_mid_data_is_temporary_and_fails_over() -> None:
    bad, good = Script(drop_in_data=True), Script()

    async def go() -> tuple[list[RecipientResult], LMTPTemporaryError]:
        s1, t1 = await scripted(bad)
        s2, t2 = await scripted(good)
        async with s1, s2:
            async with LMTPClient([t1], lhlo_name="mx.test.example", **FAST) as only:
                with pytest.raises(LMTPTemporaryError) as err:
                    await only.deliver("s@example.net", ["a@example.com"], MESSAGE)
            async with LMTPClient([t1, t2], lhlo_name="mx.test.example", **FAST) as client:
                return await client.deliver("s@example.net", ["a@example.com"], MESSAGE), err.value

    results, err = run(go())
    assert err.partial == [] and str(err).startswith("lmtp:127.0.0.1:"), str(err)
    assert [(r.recipient, r.code) for r in results] == [(b"a@example.com", 250)]
    assert good.bodies == [b"Subject: hi\r\n\r\n..dot\r\nbody\r\n.\r\n"]


def test_a_drop_between_two_delivery_replies_keeps_the_first_and_sends_on_the_rest() -> None:
    """RFC 2033 §4.2: the first recipient's 250 came, so only the second goes to the next target."""
    bad = Script(delivery=lambda rs: b"250 2.0.0 <%s> Saved\r\n250 2.0.0 <" % rs[0])
    good = Script()

    async def go() -> list[RecipientResult]:
        s1, t1 = await scripted(bad)
        s2, t2 = await scripted(good)
        async with s1, s2, LMTPClient([t1, t2], lhlo_name="mx.test.example", **FAST) as client:
            return await client.deliver("s@example.net", ["a@example.com", "b@example.com"], MESSAGE)

    results = run(go())
    assert [(r.recipient, r.code, r.text) for r in results] == [
        (b"a@example.com", 250, "<a@example.com> Saved"), (b"b@example.com", 250, "<b@example.com> Saved")]
    assert [line for line in good.seen if line.startswith(b"RCPT")] == [b"RCPT TO:<b@example.com>\r\n"]


def test_the_last_target_failing_gives_the_partial_results() -> None:
    bad = Script(rcpt=lambda r: b"550 5.1.1 no\r\n" if r.startswith(b"x") else b"250 2.1.5 OK\r\n",
                 delivery=lambda rs: b"250 2.0.0 <%s> Saved\r\n" % rs[0])

    async def go() -> LMTPTemporaryError:
        s1, t1 = await scripted(bad)
        async with s1, LMTPClient([t1], lhlo_name="mx.test.example", **FAST) as client:
            with pytest.raises(LMTPTemporaryError) as err:
                await client.deliver("s@example.net", ["a@example.com", "x@example.com", "b@example.com"], MESSAGE)
            return err.value

    err = run(go())
    assert [(r.recipient, r.code) for r in err.partial] == [(b"a@example.com", 250), (b"x@example.com", 550)]


def test_no_reply_after_the_dot_times_out() -> None:
    async def go() -> float:
        s1, t1 = await scripted(Script(delivery=lambda rs: b""))
        async with s1, LMTPClient([t1], lhlo_name="mx.test.example", **FAST) as client:
            t0 = time.monotonic()
            with pytest.raises(LMTPTemporaryError, match="timed out"):
                await client.deliver("s@example.net", ["a@example.com"], MESSAGE)
            return time.monotonic() - t0

    assert run(go()) < 2.0


def test_without_pipelining_one_command_at_a_time() -> None:
    script = Script(pipelining=False, rcpt=lambda r: b"550 5.1.1 no\r\n" if r.startswith(b"x") else b"250 OK\r\n")

    async def go() -> tuple[list[RecipientResult], list[RecipientResult], int]:
        s1, t1 = await scripted(script)
        async with s1, LMTPClient([t1], lhlo_name="mx.test.example", **FAST) as client:
            mixed = await client.deliver("s@example.net", ["a@example.com", "x@example.com"], MESSAGE)
            refused = await client.deliver("s@example.net", ["x@example.com"], MESSAGE)
            probed = (await client.probe("x@example.com")).code
            return mixed, refused, probed

    mixed, refused, probed = run(go())
    assert [r.code for r in mixed] == [250, 550] and [r.code for r in refused] == [550] and probed == 550
    # All RCPTs refused: no DATA, an RSET instead.
    assert verbs(script) == [b"LHLO", b"MAIL", b"RCPT", b"RCPT", b"DATA", b"MAIL", b"RCPT", b"RSET",
                             b"MAIL", b"RCPT", b"RSET", b"QUIT"]


def test_probes_share_one_connection_and_survive_its_close() -> None:
    script = Script(rcpt=lambda r: b"550 5.1.1 <%s> User doesn't exist\r\n" % r if r.startswith(b"x")
                    else b"250 2.1.5 OK\r\n", close_after=1)

    async def go() -> list[tuple[int, str]]:
        s1, t1 = await scripted(script)
        async with s1, LMTPClient([t1], lhlo_name="mx.test.example", **FAST) as client:
            out = [await client.probe(r) for r in ("a@example.com", "x@example.com", "b@example.com")]
            # The server closes the kept connection after this delivery: the next probe
            # finds it closed and takes a fresh one without a failure.
            await client.deliver("s@example.net", ["a@example.com"], MESSAGE)
            await asyncio.sleep(0.05)
            out.append(await client.probe("a@example.com"))
            return [(r.code, r.enhanced) for r in out]

    assert run(go()) == [(250, "2.1.5"), (550, "5.1.1"), (250, "2.1.5"), (250, "2.1.5")]
    assert script.connections == 2
    assert verbs(script)[:7] == [b"LHLO", b"MAIL", b"RCPT", b"RSET", b"MAIL", b"RCPT", b"RSET"]


def test_a_non_ascii_envelope_without_smtputf8_is_refused_permanently() -> None:
    script = Script()

    async def go() -> tuple[list[RecipientResult], int]:
        s1, t1 = await scripted(script)
        async with s1, LMTPClient([t1], lhlo_name="mx.test.example", **FAST) as client:
            results = await client.deliver("s@example.net", ["j\u00f6rg@example.com"], MESSAGE)
            return results, (await client.probe("j\u00f6rg@example.com")).code

    results, probed = run(go())
    assert [r.reply for r in results] == [NOT_UTF8] and probed == 553
    assert not any(line.startswith((b"MAIL", b"RCPT")) for line in script.seen)


def test_a_failed_target_is_tried_after_the_others() -> None:
    async def go() -> tuple[list[str], list[str]]:
        s1, t1 = await serve(silent)
        s2, t2 = await scripted(Script())
        async with s1, s2, LMTPClient([t1, t2], lhlo_name="mx.test.example", retry_after=0.3, **FAST) as client:
            assert (await client.probe("a@example.com")).code == 250
            later = [str(t) for t in client._order()]
            await asyncio.sleep(0.35)
            again = [str(t) for t in client._order()]
            return later, again

    later, again = run(go())
    assert later[1] == again[0]  # the silent one: last for retry_after seconds, then first again


def test_an_address_that_cannot_be_sent_is_the_callers_error() -> None:
    script = Script()

    async def go() -> None:
        s1, t1 = await scripted(script)
        async with s1, LMTPClient([t1], lhlo_name="mx.test.example", **FAST) as client:
            for bad in ("a@example.com>\r\nRCPT TO:<b@example.com", "a\n@example.com"):
                with pytest.raises(ValueError):
                    await client.deliver("s@example.net", [bad], MESSAGE)
                with pytest.raises(ValueError):
                    await client.deliver(bad, ["a@example.com"], MESSAGE)
                with pytest.raises(ValueError):
                    await client.probe(bad)
            assert (await client.probe("a@example.com")).code == 250

    run(go())
    assert script.connections == 1 and not any(b"b@example.com" in line for line in script.seen)


@pytest.mark.parametrize("pipelining", [True, False])
def test_a_refused_mail_is_every_recipients_result(pipelining: bool) -> None:
    script = Script(pipelining=pipelining, mail=b"451 4.3.0 <s@example.net> Temporary failure\r\n")

    async def go() -> tuple[list[RecipientResult], int]:
        s1, t1 = await scripted(script)
        async with s1, LMTPClient([t1], lhlo_name="mx.test.example", **FAST) as client:
            results = await client.deliver("s@example.net", ["a@example.com", "b@example.com"], MESSAGE)
            return results, (await client.probe("a@example.com")).code

    results, probed = run(go())
    assert [(r.code, r.enhanced, r.temporary) for r in results] == [(451, "4.3.0", True)] * 2
    assert probed == 451
    expected = [b"LHLO", b"MAIL", b"RCPT", b"RCPT", b"DATA"] if pipelining else [b"LHLO", b"MAIL"]
    assert verbs(script)[: len(expected)] == expected


@pytest.mark.parametrize("pipelining", [True, False])
def test_a_refused_data_is_every_accepted_recipients_result(pipelining: bool) -> None:
    script = Script(pipelining=pipelining, data=b"554 5.6.0 no\r\n",
                    rcpt=lambda r: b"550 5.1.1 no\r\n" if r.startswith(b"x") else b"250 2.1.5 OK\r\n")

    async def go() -> list[RecipientResult]:
        s1, t1 = await scripted(script)
        async with s1, LMTPClient([t1], lhlo_name="mx.test.example", **FAST) as client:
            return await client.deliver("s@example.net", ["a@example.com", "x@example.com"], MESSAGE)

    assert [(r.code, r.enhanced) for r in run(go())] == [(554, "5.6.0"), (550, "5.1.1")]
    assert script.bodies == []
