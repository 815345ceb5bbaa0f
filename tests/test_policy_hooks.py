"""Policy hooks (``--policy``): the real server with the policies of policies_for_tests.py.

The policy is loaded by file path (``FILE.py:CLASS``), so the server
subprocess needs no PYTHONPATH.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import Client, ehlo, greeted, never
from fastsmtp import Address, Reply
from fastsmtp.config import ConfigError
from fastsmtp.hooks import SessionInfo, load_policy
from fastsmtp.stages import NO_STAGES, resolve

HERE = Path(__file__).resolve().parent
POLICIES = HERE / "policies_for_tests.py"
EXAMPLES = HERE.parent / "examples" / "policies.py"


def policy(name: str) -> str:
    return f"{POLICIES}:{name}"


def message(c: Client, sender: bytes, rcpts: list[bytes], body: bytes = b"Subject: t\r\n\r\nhi\r\n") -> list[bytes]:
    """Replies to MAIL, each RCPT, DATA and (after 354) the end of data."""
    c.send(b"MAIL FROM:<" + sender + b">\r\n")
    out = [c.reply()]
    for r in rcpts:
        c.send(b"RCPT TO:<" + r + b">\r\n")
        out.append(c.reply())
    c.send(b"DATA\r\n")
    out.append(c.reply())
    if out[-1].startswith(b"354"):
        c.send(body + b".\r\n")
        out.append(c.reply())
    return out


# -- loading ---------------------------------------------------------------------


def test_hooks_are_resolved_once_by_name() -> None:
    stages = resolve([("policy", load_policy(policy("Slow")), 1.0)])
    assert stages.on_connect == () and stages.on_helo == ()
    (mail,) = stages.on_mail
    assert mail.is_async and mail.name == "policy on_mail" and mail.timeout == 1.0
    sync = resolve([("policy", load_policy(policy("Refusing")), 1.0)])
    assert len(sync.on_mail) == 1 and not sync.on_mail[0].is_async
    assert resolve([]) == NO_STAGES


@pytest.mark.parametrize(
    "spec, words",
    [
        ("no_such_module_xyz:Policy", "ModuleNotFoundError"),
        (f"{POLICIES}:Missing", "AttributeError"),
        (f"{POLICIES}:NotInstantiable", "cannot start"),
        ("/nonexistent/file.py:Policy", "No such file"),
        ("justamodule", "MODULE:CLASS"),
    ],
)
def test_a_bad_policy_is_one_config_error_line(tmp_path: Path, spec: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        load_policy(spec)
    proc = subprocess.run(
        [sys.executable, "-m", "fastsmtp", "serve", "--listen", "127.0.0.1:0", "--mail-root", str(tmp_path),
         "--policy", spec, "--workers", "1"],
        capture_output=True, text=True, timeout=30,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastsmtp: error: policy:") and words in lines[0], proc.stderr


# -- refusing ----------------------------------------------------------------------


def test_sync_hooks_refuse_sender_recipient_helo_and_message(server_factory) -> None:  # type: ignore[no-untyped-def]
    srv = server_factory("--policy", policy("Refusing"))
    c = greeted(srv)
    assert ehlo(c, b"bad.example").startswith(b"550 5.7.1 Go away")
    assert ehlo(c).startswith(b"250-")
    # A refused sender: the transaction does not start.
    c.send(b"MAIL FROM:<spammer@bad.example>\r\n")
    assert c.reply() == b"550 5.7.1 Sender refused by policy\r\n"
    c.send(b"RCPT TO:<alice@example.com>\r\n")
    assert c.reply().startswith(b"503 ")
    # A refused recipient; the other one is delivered.  After the hook's
    # None the folder check still applies (nobody@ has no Maildir).
    replies = message(c, b"ex@example.net", [b"bob@example.com", b"alice@example.com", b"nobody@example.com"])
    assert replies[1] == b"550 5.7.1 Bob does not want mail from you\r\n"
    assert replies[2].startswith(b"250 ")
    assert replies[3].startswith(b"550 5.1.1")
    assert replies[-1].startswith(b"250 2.0.0 Ok: queued as ")
    assert len(srv.wait_messages("alice@example.com", 1)) == 1
    assert srv.messages("bob@example.com", count=0) == []
    # on_message refuses: nothing is stored.
    replies = message(c, b"ex2@example.net", [b"bob@example.com"], b"Subject: big\r\n\r\n" + b"x" * 3000 + b"\r\n")
    assert replies[-1] == b"554 5.7.1 Too long for this policy\r\n"
    # A message is linked into new/ before its reply is written, so a wrong
    # store would show at once; 0.3 s more covers a late one.
    never(lambda: srv.messages("bob@example.com", count=0) or list((srv.maildir("bob@example.com") / "tmp").iterdir()),
          what="a refused message stored")
    c.send(b"QUIT\r\n")
    assert c.reply().startswith(b"221 ")


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_async_hooks_answer_pipelined_commands_in_order(server_factory, loop: str) -> None:  # type: ignore[no-untyped-def]
    srv = server_factory("--policy", policy("Slow"), loop=loop)
    c = greeted(srv)
    assert ehlo(c).startswith(b"250-")
    start = time.monotonic()
    c.send(
        b"MAIL FROM:<s@example.net>\r\n"
        b"RCPT TO:<carol@example.org>\r\n"
        b"RCPT TO:<nobody@example.com>\r\n"
        b"RCPT TO:<alice@example.com>\r\n"
        b"NOOP\r\n"
        b"DATA\r\n"
    )
    replies = c.replies(6)
    assert replies[0].startswith(b"250 2.1.0")
    assert replies[1] == b"450 4.2.0 Carol is busy\r\n"
    assert replies[2].startswith(b"550 5.1.1")
    assert replies[3].startswith(b"250 2.1.5")
    assert replies[4].startswith(b"250 2.0.0")
    assert replies[5].startswith(b"354 ")
    assert time.monotonic() - start >= 0.5  # 0.2 + 3 * 0.1: one hook at a time
    c.send(b"Subject: t\r\n\r\nhello\r\n.\r\nQUIT\r\n")
    assert c.reply().startswith(b"250 2.0.0 Ok: queued as ")
    assert c.reply().startswith(b"221 ")
    assert len(srv.wait_messages("alice@example.com", 1)) == 1


def test_async_on_connect_delays_the_greeting(server_factory) -> None:  # type: ignore[no-untyped-def]
    srv = server_factory("--policy", policy("AsyncConnect"))
    start = time.monotonic()
    c = Client(srv.connect())
    c.send(b"EHLO early.example\r\n")  # waits unread until the hook has answered
    assert c.reply().startswith(b"220 ")
    assert time.monotonic() - start >= 0.2
    assert c.reply().startswith(b"250-")


def test_on_connect_refusal_replaces_the_greeting(server_factory) -> None:  # type: ignore[no-untyped-def]
    srv = server_factory("--policy", policy("RefuseConnect"))
    c = Client(srv.connect())
    assert c.reply() == b"554 5.7.1 Not from 127.0.0.1\r\n"
    assert c.closed()


# -- failing hooks -------------------------------------------------------------------


def test_raising_hanging_and_wrong_hooks_give_451(server_factory) -> None:  # type: ignore[no-untyped-def]
    srv = server_factory("--policy", policy("Broken"), "--policy-timeout", "0.5", "--log-level", "info")
    c = greeted(srv)
    assert ehlo(c, b"raise.example").startswith(b"451 4.3.0")
    assert ehlo(c).startswith(b"250-")
    c.send(b"MAIL FROM:<raise@example.net>\r\n")
    assert c.reply().startswith(b"451 4.3.0")
    start = time.monotonic()
    c.send(b"MAIL FROM:<hang@example.net>\r\nNOOP\r\n")
    assert c.reply().startswith(b"451 4.3.0")
    assert 0.4 < time.monotonic() - start < 5
    assert c.reply().startswith(b"250 ")  # the session goes on
    c.send(b"MAIL FROM:<ok@example.net>\r\nRCPT TO:<bob@example.com>\r\nRCPT TO:<alice@example.com>\r\n")
    assert c.reply().startswith(b"250 ")
    assert c.reply().startswith(b"451 4.3.0")  # "250 OK" is not a Reply
    assert c.reply().startswith(b"250 ")
    c.send(b"QUIT\r\n")
    assert c.reply().startswith(b"221 ")
    # The worker is still alive and serving.
    c2 = greeted(srv)
    assert ehlo(c2).startswith(b"250-")
    c2.close()


# -- the examples ----------------------------------------------------------------------


def test_rate_limit_example_in_the_server(server_factory) -> None:  # type: ignore[no-untyped-def]
    srv = server_factory("--policy", policy("TinyRateLimit"), "--workers", "0")
    c = greeted(srv)
    assert ehlo(c).startswith(b"250-")
    for _ in range(2):
        assert message(c, b"a@limited.example", [b"alice@example.com"])[-1].startswith(b"250 2.0.0")
    c.send(b"MAIL FROM:<b@LIMITED.example>\r\n")
    assert c.reply().startswith(b"451 4.7.1")
    # Other domains, and bounces, are not limited.
    assert message(c, b"a@other.example", [b"alice@example.com"])[-1].startswith(b"250 2.0.0")
    assert message(c, b"", [b"alice@example.com"])[-1].startswith(b"250 2.0.0")


def _examples():  # type: ignore[no-untyped-def]
    from policies_for_tests import examples

    return examples


def info() -> SessionInfo:
    return SessionInfo("192.0.2.1", "client.example", False, None, ())


def test_rate_limit_window_slides() -> None:
    now = [1000.0]
    limiter = _examples().SenderDomainRateLimit(clock=lambda: now[0])
    limiter.limit, limiter.window = 3, 10.0
    sender = Address(b"a", b"x.example", b"a@x.example")
    assert [limiter.on_mail(info(), sender) for _ in range(3)] == [None, None, None]
    refused = limiter.on_mail(info(), sender)
    assert isinstance(refused, Reply) and refused.code == 451
    now[0] += 10.5
    assert limiter.on_mail(info(), sender) is None


def test_dnsbl_example_with_an_injected_resolver() -> None:
    examples = _examples()
    assert examples.dnsbl_name("192.0.2.1", "bl.example") == "1.2.0.192.bl.example"
    assert examples.dnsbl_name("2001:db8::1", "bl.example").startswith("1.0.0.0.")
    assert examples.dnsbl_name("not an ip", "bl.example") is None
    asked: list[str] = []

    async def resolver(name: str) -> bool:
        asked.append(name)
        return name.startswith("2.0.0.127.")

    bl = examples.DnsBlocklist(resolver)
    listed = asyncio.run(bl.on_connect("127.0.0.2"))  # loopback is never looked up
    assert listed is None and asked == []
    bl.zone = "bl.example"
    assert asyncio.run(bl.on_connect("192.0.2.1")) is None
    assert asked == ["1.2.0.192.bl.example"]

    async def listing(name: str) -> bool:
        return True

    refused = asyncio.run(examples.DnsBlocklist(listing).on_connect("192.0.2.1"))
    assert isinstance(refused, Reply) and refused.code == 554


def test_examples_load_as_policies() -> None:
    for name in ("SenderDomainRateLimit", "DnsBlocklist", "Combined"):
        stages = resolve([("policy", load_policy(f"{EXAMPLES}:{name}"), 1.0)])
        assert bool(stages.on_connect) == (name != "SenderDomainRateLimit")
        if stages.on_connect:
            assert stages.on_connect[0].is_async
