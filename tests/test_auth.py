"""SPF, DKIM, DMARC and ARC end to end: the real server, a real DNS server, real signers.

Knot (tests/dnsserver.py) serves the test zones on loopback; dkimpy and
OpenDKIM (its milter in sign mode, driven by miltertest as an MTA would)
sign the messages; dkimpy seals the ARC chain as a list server would.
Each client's address comes from a PROXY header the server trusts from
127.0.0.1, so the checks see 192.0.2.x clients.  The results are read from
the Authentication-Results field of the stored files.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Callable, Iterator

import pytest

from dkimtools import craft, ed_key, rsa_key
from dnsserver import KnotServer, zone_text
from fakedns import FaultServer
from helpers import HOSTNAME, Client, RunningServer, start_server, wait_for
from opendkimd import signing_opendkim

dkim = pytest.importorskip("dkim")

pytestmark = pytest.mark.skipif(shutil.which("knotd") is None, reason="knotd is not installed (CI installs knot)")

RSA = rsa_key(2048)
ED = ed_key()
SMALL = rsa_key(1024)
LIST = rsa_key(2048)  # the list server's ARC key

LOCAL = "alice@example.com"


def _key_record(pair) -> str:  # type: ignore[no-untyped-def]
    return pair.record.decode()


def zones(opendkim_record: str = "v=DKIM1; p=", serial: int = 1, spf: str = "v=spf1 -all") -> dict[str, str]:
    zones = {
        # RFC 7208 Appendix A's example.com (records set per case, TTL 0).
        "example.com": zone_text("example.com", [
            ("@", "MX", "10 mail-a"), ("@", "MX", "20 mail-b"),
            ("@", "A", "192.0.2.10"), ("@", "A", "192.0.2.11"),
            ("amy", "A", "192.0.2.65"), ("bob", "A", "192.0.2.66"),
            ("mail-a", "A", "192.0.2.129"), ("mail-b", "A", "192.0.2.130"),
            ("www", "CNAME", "example.com."),
            ("@", "TXT", spf, 0),
        ]),
        "example.org": zone_text("example.org", [
            ("@", "MX", "10 mail-c"), ("mail-c", "A", "192.0.2.140"),
        ]),
        "2.0.192.in-addr.arpa": zone_text("2.0.192.in-addr.arpa", [
            ("10", "PTR", "example.com."), ("11", "PTR", "example.com."),
            ("65", "PTR", "amy.example.com."), ("66", "PTR", "bob.example.com."),
            ("129", "PTR", "mail-a.example.com."), ("130", "PTR", "mail-b.example.com."),
            ("140", "PTR", "mail-c.example.org."),
        ]),
        "signed.example": zone_text("signed.example", [
            ("@", "TXT", "v=spf1 ip4:192.0.2.0/24 -all"),
            ("mx", "A", "192.0.2.250"),
            ("rsa._domainkey", "TXT", _key_record(RSA)),
            ("ed._domainkey", "TXT", _key_record(ED)),
            ("small._domainkey", "TXT", _key_record(SMALL)),
            ("odk._domainkey", "TXT", opendkim_record),
            ("gone._domainkey", "TXT", "v=DKIM1; k=rsa; p="),
            ("bad._domainkey", "TXT", "v=DKIM1; k=rsa; p=!!!notbase64"),
            ("_dmarc", "TXT", "v=DMARC1; p=reject"),
            ("loop", "CNAME", "loop2.signed.example."), ("loop2", "CNAME", "loop.signed.example."),
            ("inc1", "TXT", "v=spf1 include:inc2.signed.example -all"),
            ("inc2", "TXT", "v=spf1 include:inc1.signed.example -all"),
            ("big", "TXT", "v=spf1 " + " ".join(f"ip4:10.{i // 250}.{i % 250}.1" for i in range(1000)) + " -all"),
            ("many", "TXT", "v=spf1 " + " ".join(["a:mx.signed.example/32"] * 500) + " -all"),
            ("huge", "TXT", "v=spf1 " + "a" * 59_000 + " -all"),
            ("exp", "TXT", "v=spf1 -all exp=why.signed.example"),
            ("why", "TXT", "%{i} is not one of %{d}'s senders"),
        ]),
        "quarantine.example": zone_text("quarantine.example", [
            ("@", "TXT", "v=spf1 ip4:192.0.2.0/24 -all"),
            ("rsa._domainkey", "TXT", _key_record(RSA)),
            ("_dmarc", "TXT", "v=DMARC1; p=quarantine"),
        ]),
        "other.example": zone_text("other.example", [
            ("@", "TXT", "v=spf1 ip4:192.0.2.0/24 -all"),
            ("rsa._domainkey", "TXT", _key_record(RSA)),
            ("_dmarc", "TXT", "v=DMARC1; p=none"),
        ]),
        "list.example": zone_text("list.example", [
            ("@", "TXT", "v=spf1 ip4:192.0.2.0/24 -all"),
            ("arc._domainkey", "TXT", _key_record(LIST)),
            ("_dmarc", "TXT", "v=DMARC1; p=none"),
        ]),
    }
    if serial != 1:
        zones = {name: text.replace(f"hostmaster.{name}. 1 ", f"hostmaster.{name}. {serial} ")
                 for name, text in zones.items()}
    return zones


# -- OpenDKIM, signing as a sender's MTA would ---------------------------------------


@pytest.fixture(scope="module")
def opendkim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Callable[[bytes], bytes], str]]:
    """A signing OpenDKIM milter, and ``sign(message)`` through it with miltertest."""
    if shutil.which("miltertest") is None:
        pytest.skip("miltertest is not installed (CI installs it)")
    home = tmp_path_factory.mktemp("opendkim")
    with signing_opendkim(home) as (port, record):

        def sign(message: bytes) -> bytes:
            head, _, body = message.partition(b"\r\n\r\n")
            lines = [f'conn = mt.connect("inet:{port}@127.0.0.1")', 'assert(conn ~= nil, "connect")',
                     'mt.macro(conn, SMFIC_CONNECT, "j", "mx.signed.example", "{daemon_name}", "MTA")',
                     'assert(mt.conninfo(conn, "localhost", "127.0.0.1") == nil)',
                     'mt.macro(conn, SMFIC_MAIL, "i", "T1")',
                     'assert(mt.mailfrom(conn, "alice@signed.example") == nil)',
                     'assert(mt.rcptto(conn, "alice@example.com") == nil)']
            for raw in head.split(b"\r\n"):
                name, _, value = raw.decode().partition(":")
                lines.append(f"mt.header(conn, {_lua(name)}, {_lua(value.strip())})")
            lines += ["mt.eoh(conn)", f"mt.bodystring(conn, {_lua(body.decode())})", "mt.eom(conn)",
                      'io.write(mt.getheader(conn, "DKIM-Signature", 0))', "mt.disconnect(conn)"]
            script = home / "sign.lua"
            script.write_text("\n".join(lines) + "\n")
            out = subprocess.run(["miltertest", "-s", str(script)], capture_output=True, timeout=30)
            assert out.returncode == 0, out.stderr
            value = out.stdout.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
            return b"DKIM-Signature:" + value + b"\r\n" + message

        yield sign, record


def _lua(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\r", "\\r").replace("\n", "\\n") + '"'


# -- the servers ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def dns(opendkim: tuple[Callable[[bytes], bytes], str]) -> Iterator[KnotServer]:
    with KnotServer(zones(opendkim[1])) as server:
        server.opendkim_record = opendkim[1]  # type: ignore[attr-defined]
        yield server


def _start(tmp: Path, dns_port: int, *args: str) -> RunningServer:
    return start_server(tmp, "--proxy-trusted", "127.0.0.1/32", "--dns-server", f"127.0.0.1:{dns_port}",
                        "--metrics", "127.0.0.1:0", *args)


@pytest.fixture(scope="module")
def tagging(dns: KnotServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """Every check at its default, tag."""
    srv = _start(tmp_path_factory.mktemp("tag") / "mail", dns.port)
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def enforcing(dns: KnotServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    root = tmp_path_factory.mktemp("enforce") / "mail"
    srv = _start(root, dns.port, "--spf", "enforce", "--dmarc", "enforce")
    for sub in ("tmp", "new", "cur"):
        (root / "example.com" / "alice" / ".Junk" / sub).mkdir(parents=True, exist_ok=True)
    try:
        yield srv
    finally:
        srv.stop()


_serial = [0]


def client(srv: RunningServer, ip: str) -> Client:
    """A session as the client ``ip``, through a PROXY v1 header, past its greeting."""
    sock = srv.connect()
    family, dest = ("TCP6", "2001:db8::25") if ":" in ip else ("TCP4", "192.0.2.25")
    sock.sendall(f"PROXY {family} {ip} {dest} 40000 25\r\n".encode())
    c = Client(sock)
    assert c.reply().startswith(b"220 ")
    return c


def send(srv: RunningServer, ip: str, sender: str, content: bytes, helo: str = "client.signed.example",
         rcpt: str = LOCAL) -> bytes:
    """One session, one message; the reply to its end of data (or to the first refusal)."""
    c = client(srv, ip)
    try:
        c.send(f"EHLO {helo}\r\n".encode())
        assert c.reply().startswith(b"250")
        c.send(f"MAIL FROM:<{sender}>\r\n".encode())
        reply = c.reply()
        if not reply.startswith(b"250"):
            return reply
        c.send(f"RCPT TO:<{rcpt}>\r\nDATA\r\n".encode())
        assert c.reply().startswith(b"250")
        assert c.reply().startswith(b"354")
        c.send(content + b".\r\n")
        reply = c.reply()
        c.send(b"QUIT\r\n")
        return reply
    finally:
        c.close()


def message(from_: str = "Alice <alice@signed.example>", subject: str = "", body: bytes = b"Hello.\r\n",
            extra: bytes = b"") -> bytes:
    """A message with a unique Subject to find it by."""
    _serial[0] += 1
    subject = subject or f"test {_serial[0]} {time.monotonic_ns()}"
    return (f"From: {from_}\r\nTo: <alice@example.com>\r\nSubject: {subject}\r\n"
            f"Message-ID: <{_serial[0]}.{time.monotonic_ns()}@signed.example>\r\n").encode() + extra + b"\r\n" + body


def signed(msg: bytes, key, selector: bytes, domain: bytes = b"signed.example",  # type: ignore[no-untyped-def]
           canon: tuple[bytes, bytes] = (b"relaxed", b"relaxed"), **kw) -> bytes:
    sig = dkim.sign(msg, selector, domain, key.private, canonicalize=canon, signature_algorithm=key.algorithm,
                    include_headers=[b"from", b"to", b"subject", b"message-id"], **kw)
    return sig.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n") + msg


def stored(srv: RunningServer, subject: bytes, folder: str = "", marker: bytes = b"") -> bytes:
    """The stored file whose Subject is ``subject`` (and holds ``marker``), once it is in new/."""
    box = srv.mail_root / "example.com" / "alice" / folder / "new"

    def find() -> bytes | None:
        for path in box.iterdir():
            data = path.read_bytes()
            if b"\r\nSubject: " + subject + b"\r\n" in data and marker in data:
                return data
        return None

    return wait_for(find, 10, f"the message {subject!r} in {box}")


def subject_of(msg: bytes) -> bytes:
    return re.search(rb"\r\nSubject: ([^\r]*)\r\n", b"\r\n" + msg).group(1)  # type: ignore[union-attr]


def results(data: bytes) -> str:
    """Our Authentication-Results field, unfolded."""
    found = re.search(rb"^Authentication-Results: " + HOSTNAME.encode() + rb";(.*?)\r\n(?![ \t])", data,
                      re.S | re.M)
    assert found, data[:2000]
    return found.group(1).decode().replace("\r\n\t", " ")


def deliver(srv: RunningServer, msg: bytes, ip: str = "192.0.2.1", sender: str = "alice@signed.example",
            **kw) -> str:  # type: ignore[no-untyped-def]
    reply = send(srv, ip, sender, msg, **kw)
    assert reply.startswith(b"250 "), reply
    return results(stored(srv, subject_of(msg)))


# -- SPF: RFC 7208 Appendix A, one session per case --------------------------------

APPENDIX_A1 = [
    ("v=spf1 +all", {"192.0.2.1": "pass", "10.1.2.3": "pass", "2001:db8::9": "pass"}),
    ("v=spf1 a -all", {"192.0.2.10": "pass", "192.0.2.11": "pass", "192.0.2.12": "fail"}),
    ("v=spf1 a:example.org -all", {"192.0.2.10": "fail", "192.0.2.140": "fail"}),
    ("v=spf1 mx -all", {"192.0.2.129": "pass", "192.0.2.130": "pass", "192.0.2.140": "fail"}),
    ("v=spf1 mx:example.org -all", {"192.0.2.140": "pass", "192.0.2.129": "fail"}),
    ("v=spf1 mx mx:example.org -all", {"192.0.2.129": "pass", "192.0.2.140": "pass", "192.0.2.10": "fail"}),
    ("v=spf1 mx/30 mx:example.org/30 -all", {"192.0.2.131": "pass", "192.0.2.143": "pass", "192.0.2.132": "fail"}),
    ("v=spf1 ptr -all", {"192.0.2.65": "pass", "192.0.2.140": "fail"}),
    ("v=spf1 ip4:192.0.2.128/28 -all", {"192.0.2.65": "fail", "192.0.2.129": "pass"}),
    ("v=spf1 ~all", {"192.0.2.1": "softfail"}),
    ("v=spf1 ?all", {"192.0.2.1": "neutral"}),
    ("v=spf1 ip4:192.0.2.1", {"192.0.2.1": "pass", "192.0.2.2": "neutral"}),
    ("v=spf1 ip6:2001:db8::/32 -all", {"2001:db8::9": "pass", "192.0.2.1": "fail"}),
]


def test_spf_appendix_a_through_the_server(dns: KnotServer, tagging: RunningServer) -> None:
    """Each record of RFC 7208 Appendix A.1 at example.com, each client one SMTP session."""
    for serial, (record, cases) in enumerate(APPENDIX_A1, start=2):
        dns.reload(zones(dns.opendkim_record, serial, record), serial)  # type: ignore[attr-defined]
        for ip, want in cases.items():
            got = deliver(tagging, message(from_="bob@example.com"), ip=ip, sender="bob@example.com")
            assert f"spf={want} " in got and "smtp.mailfrom=example.com" in got, (record, ip, got)


def test_spf_results_limits_and_bad_records(tagging: RunningServer) -> None:
    got = deliver(tagging, message(), ip="192.0.2.7")
    assert "spf=pass" in got and "smtp.mailfrom=signed.example" in got
    assert "spf=fail" in deliver(tagging, message(), ip="198.51.100.7")
    assert "spf=none" in deliver(tagging, message(), sender="a@nothing-here.signed.example")
    # An include loop, a record of 1,000 terms, a 59 KB record (TCP), a CNAME loop.
    assert "spf=permerror" in deliver(tagging, message(), sender="a@inc1.signed.example")
    # 1,000 ip4 terms need no DNS: evaluated, to -all; 500 a: terms stop at 10 lookups.
    assert "spf=fail (matched -all)" in deliver(tagging, message(), sender="a@big.signed.example")
    assert "spf=permerror (too many DNS lookups" in deliver(tagging, message(), sender="a@many.signed.example")
    assert "spf=permerror" in deliver(tagging, message(), sender="a@huge.signed.example")
    got = deliver(tagging, message(), sender="a@loop.signed.example")
    assert "spf=temperror" in got, got  # the resolver gives up on the loop: DNSError
    # HELO is its own identity.
    got = deliver(tagging, message(), helo="signed.example")
    assert "spf=pass" in got and "smtp.helo=signed.example" in got


# -- DKIM -----------------------------------------------------------------------------


@pytest.mark.parametrize("key,selector,canon", [
    (RSA, b"rsa", (b"relaxed", b"relaxed")),
    (RSA, b"rsa", (b"simple", b"simple")),
    (RSA, b"rsa", (b"relaxed", b"simple")),
    (ED, b"ed", (b"relaxed", b"relaxed")),
    (ED, b"ed", (b"simple", b"relaxed")),
    (SMALL, b"small", (b"relaxed", b"relaxed")),
], ids=["rsa-rr", "rsa-ss", "rsa-rs", "ed-rr", "ed-sr", "rsa1024"])
def test_dkim_signed_by_dkimpy_passes(tagging: RunningServer, key, selector: bytes, canon) -> None:  # type: ignore[no-untyped-def]
    body = b"Some  text\twith   spaces  \r\n\r\n.leading dot\r\n\r\n\r\n"
    got = deliver(tagging, signed(message(body=body), key, selector, canon=canon).replace(b"\r\n.", b"\r\n.."))
    assert f"dkim=pass header.d=signed.example header.s={selector.decode()}" in got.replace(
        " header.i=@signed.example", ""), got
    assert "dmarc=pass" in got


def test_dkim_signed_by_opendkim_passes(tagging: RunningServer, opendkim) -> None:  # type: ignore[no-untyped-def]
    sign, _ = opendkim
    got = deliver(tagging, sign(message(body=b"Signed by OpenDKIM.\r\n")))
    assert "dkim=pass header.d=signed.example header.s=odk header.a=rsa-sha256" in got, got


def test_dkim_failures(tagging: RunningServer) -> None:
    good = signed(message(), RSA, b"rsa")
    tampered_body = good.replace(b"Hello.", b"Hullo.")
    assert "dkim=fail (body hash mismatch)" in deliver(tagging, tampered_body)
    tampered_header = re.sub(rb"Subject: test", b"Subject: Test", signed(message(), RSA, b"rsa"))
    got = deliver(tagging, tampered_header)
    assert "dkim=fail" in got and "body hash" not in got.split("dkim=")[1].split(";")[0], got
    assert "dkim=fail (key revoked)" in deliver(tagging, signed(message(), RSA, b"gone"))
    now = int(time.time())
    expired = craft(message(), RSA, [(b"t", b"%d" % (now - 7200)), (b"x", b"%d" % (now - 3600))],
                    domain=b"signed.example", selector=b"rsa")
    assert "dkim=fail (signature expired)" in deliver(tagging, expired)
    assert "dkim=permerror" in deliver(tagging, b"DKIM-Signature: v=1; a=rsa-sha256; garbage\r\n" + message())
    assert "dkim=none" in deliver(tagging, message())


def test_several_signatures_each_reported(tagging: RunningServer) -> None:
    msg = signed(signed(signed(message(), RSA, b"rsa"), ED, b"ed"), RSA, b"rsa", domain=b"other.example")
    got = deliver(tagging, msg)
    assert got.count("dkim=pass") == 3, got
    assert "header.d=other.example" in got and "header.s=ed" in got


# -- DMARC ------------------------------------------------------------------------------


def test_dmarc_alignment_and_policies_tagged(tagging: RunningServer) -> None:
    # SPF aligned (MAIL FROM signed.example passes), no signature.
    assert "dmarc=pass (p=reject dis=none) header.from=signed.example" in deliver(tagging, message())
    # DKIM aligned only: SPF fails for the client.
    assert "dmarc=pass" in deliver(tagging, signed(message(), RSA, b"rsa"), ip="198.51.100.7")
    # Neither aligned: other.example passes SPF and signs, From is signed.example.
    got = deliver(tagging, signed(message(), RSA, b"rsa", domain=b"other.example"), sender="b@other.example")
    assert "dmarc=fail (p=reject dis=reject) header.from=signed.example" in got, got
    # p=none: fail, nothing to do.
    got = deliver(tagging, message(from_="x@other.example"), sender="b@signed.example")
    assert "dmarc=fail (p=none dis=none)" in got
    # No policy, and zero From: domains.
    assert "dmarc=none" in deliver(tagging, message(from_="x@example.org"))
    assert "dmarc=permerror" in deliver(tagging, message(from_="undisclosed-recipients:;"))


def test_dmarc_enforced_reject_quarantine_and_spf_fail(enforcing: RunningServer) -> None:
    reply = send(enforcing, "192.0.2.1", "b@other.example", signed(message(), RSA, b"rsa", domain=b"other.example"))
    assert reply.startswith(b"550 5.7.1 ") and b"signed.example" in reply, reply
    # p=quarantine: stored with a header, into .Junk.
    msg = message(from_="q@quarantine.example")
    assert send(enforcing, "192.0.2.1", "b@other.example", msg).startswith(b"250 ")
    data = stored(enforcing, subject_of(msg), folder=".Junk")
    assert data.startswith(b"X-Quarantine: DMARC policy of quarantine.example")
    assert "dmarc=fail (p=quarantine dis=quarantine)" in results(data)
    # SPF fail, enforced at the end of data, with the domain's explanation (exp=).
    reply = send(enforcing, "192.0.2.9", "a@exp.signed.example", message(from_="x@example.org"))
    assert reply.startswith(b"550 5.7.23 192.0.2.9 is not one of exp.signed.example's senders"), reply
    # A message that passes is stored, tagged.
    assert "dmarc=pass" in deliver(enforcing, message())


def test_spf_refused_at_mail(dns: KnotServer, tmp_path: Path) -> None:
    srv = _start(tmp_path / "mail", dns.port, "--spf", "enforce", "--spf-reject-at", "mail")
    try:
        c = client(srv, "198.51.100.7")
        c.send(b"EHLO client.example\r\nMAIL FROM:<a@signed.example>\r\n")
        assert c.reply().startswith(b"250")
        assert c.reply().startswith(b"550 5.7.23 "), "refused at MAIL"
        c.send(b"MAIL FROM:<a@signed.example>\r\nQUIT\r\n")  # the session goes on
        assert c.reply().startswith(b"550 5.7.23 ")
        c.close()
    finally:
        srv.stop()


# -- ARC ----------------------------------------------------------------------------------


def test_arc_chain_sealed_by_a_list_server(tagging: RunningServer) -> None:
    pytest.importorskip("authres")
    original = signed(message(), RSA, b"rsa")
    # The list server's MX checked it and recorded so; then it seals, adds its
    # footer (which breaks the author's DKIM signature) and sends it on.
    with_ar = b"Authentication-Results: lists.list.example; dkim=pass header.d=signed.example\r\n" + original
    seal = dkim.arc_sign(with_ar, b"arc", b"list.example", LIST.private, b"lists.list.example")
    sealed = b"".join(h.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n") for h in seal) + with_ar
    got = deliver(tagging, sealed, sender="bounce@list.example")
    assert "arc=pass (i=1)" in got, got
    assert "dkim=pass" in got
    tampered = sealed.replace(b"Hello.", b"Hello, with a footer.")
    assert send(tagging, "192.0.2.1", "bounce@list.example", tampered).startswith(b"250 ")
    got = results(stored(tagging, subject_of(tampered), marker=b"with a footer"))
    assert "arc=fail" in got and "dkim=fail" in got, got


# -- the Authentication-Results fields already in a message -------------------------


def test_our_authserv_id_is_removed_and_others_kept(tagging: RunningServer) -> None:
    forged = f"Authentication-Results: {HOSTNAME}; dkim=pass header.d=paypal.example\r\n".encode()
    forged_folded = f"Authentication-Results:\r\n\t(comment) {HOSTNAME.upper()};\r\n\tspf=pass\r\n".encode()
    theirs = b"Authentication-Results: mx.other.example; spf=pass smtp.mailfrom=x\r\n"
    msg = message(extra=forged + theirs + forged_folded)
    assert send(tagging, "192.0.2.1", "alice@signed.example", msg).startswith(b"250 ")
    data = stored(tagging, subject_of(msg))
    assert b"paypal.example" not in data and b"(comment)" not in data
    assert theirs in data
    assert data.count(b"Authentication-Results: " + HOSTNAME.encode()) == 1


# -- trusted clients, bad DNS ---------------------------------------------------------------


def test_trusted_clients_wait_for_no_dns(tmp_path: Path) -> None:
    """127.0.0.1 (trusted by default) against a DNS server that never answers: no wait, no field."""
    with FaultServer("silent") as silent:
        srv = start_server(tmp_path / "mail", "--dns-server", f"127.0.0.1:{silent.port}", "--dns-timeout", "5")
        try:
            c = Client(srv.connect())
            assert c.reply().startswith(b"220 ")
            msg = message()
            started = time.monotonic()
            c.send(b"EHLO laptop\r\nMAIL FROM:<a@signed.example>\r\nRCPT TO:<alice@example.com>\r\nDATA\r\n")
            assert [r[:3] for r in c.replies(4)] == [b"250", b"250", b"250", b"354"]
            c.send(msg + b".\r\n")
            assert c.reply().startswith(b"250 ")
            assert time.monotonic() - started < 2.0  # well under one DNS timeout
            data = stored(srv, subject_of(msg))
            assert b"Authentication-Results" not in data
            assert silent.udp_queries == 0
        finally:
            srv.stop()


@pytest.mark.parametrize("mode", ["silent", "garbage", "wrong_id", "servfail"])
def test_dns_trouble_is_temperror_tagged_and_451_enforced(tmp_path: Path, mode: str) -> None:
    with FaultServer(mode) as bad:
        srv = _start(tmp_path / "mail", bad.port, "--dns-timeout", "0.5", "--auth-timeout", "3")
        try:
            msg = message()
            started = time.monotonic()
            got = deliver(srv, msg)
            assert "spf=temperror" in got and "dmarc=temperror" in got, got
            assert time.monotonic() - started < 8
        finally:
            srv.stop()
        srv = _start(tmp_path / "mail2", bad.port, "--dns-timeout", "0.5", "--spf", "enforce")
        try:
            reply = send(srv, "192.0.2.1", "alice@signed.example", message())
            assert reply.startswith(b"451 4.7.24 "), reply
        finally:
            srv.stop()


# -- what the operator sees -------------------------------------------------------------


def test_log_line_and_counters(tagging: RunningServer) -> None:
    deliver(tagging, signed(message(), RSA, b"rsa"))
    wait_for(lambda: any("spf=pass dkim=pass dmarc=pass arc=none" in line for line in tagging.output), 10,
             "the message's log line with its results")
    line = next(line for line in tagging.output if "metrics on" in line)
    port = int(re.search(r"127\.0\.0\.1:(\d+)/metrics", line).group(1))  # type: ignore[union-attr]
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    passed = re.search(r'fastsmtp_auth_results_total\{check="dkim",result="pass"\} (\d+)', text)
    assert passed and int(passed.group(1)) >= 1, text[-3000:]


def test_policy_hook_sees_the_results(dns: KnotServer, tmp_path: Path) -> None:
    policy = tmp_path / "policy.py"
    policy.write_text(
        "from fastsmtp import AcceptAll, Reply\n"
        "class NoFailingDMARC(AcceptAll):\n"
        "    def on_message(self, info, message):\n"
        "        auth = message.auth\n"
        "        if auth is not None and auth.dmarc is not None and auth.dmarc.result == 'fail':\n"
        "            return Reply(550, '5.7.1', f'hook: dmarc {auth.dmarc.result} for {auth.dmarc.domain}, '\n"
        "                         f'spf {auth.spf.result}, dkim {auth.dkim_result}')\n"
        "        return None\n"
    )
    srv = _start(tmp_path / "mail", dns.port, "--policy", f"{policy}:NoFailingDMARC")
    try:
        reply = send(srv, "192.0.2.1", "b@other.example", message())
        assert reply.startswith(b"550 5.7.1 hook: dmarc fail for signed.example, spf pass, dkim none"), reply
        assert send(srv, "192.0.2.1", "alice@signed.example", message()).startswith(b"250 ")
    finally:
        srv.stop()


def test_bdat_chunks_are_hashed_as_they_come(tagging: RunningServer) -> None:
    """CHUNKING (RFC 3030): the body hash streams across BDAT chunks as across DATA reads."""
    msg = signed(message(body=b"First part.\r\n" * 50 + b"Second part.\r\n" * 50), RSA, b"rsa")
    cut = len(msg) // 2
    c = client(tagging, "192.0.2.1")
    try:
        c.send(b"EHLO client.signed.example\r\nMAIL FROM:<alice@signed.example>\r\nRCPT TO:<alice@example.com>\r\n")
        assert [r[:3] for r in c.replies(3)] == [b"250", b"250", b"250"]
        c.send(b"BDAT %d\r\n" % cut + msg[:cut])
        assert c.reply().startswith(b"250 ")
        c.send(b"BDAT %d LAST\r\n" % (len(msg) - cut) + msg[cut:])
        assert c.reply().startswith(b"250 2.0.0 Ok: queued as ")
    finally:
        c.close()
    got = results(stored(tagging, subject_of(msg)))
    assert "dkim=pass" in got and "dmarc=pass" in got, got
