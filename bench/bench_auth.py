"""What authentication costs: msgs/s and CPU per message with the checks on and off, side by side.

Run:  python bench/bench_auth.py [--seconds 6] [--rounds 3] [--sessions 20] [--sizes 1k,100k]

One real DNS server (Knot, tests/dnsserver.py) serves a zone for the
sender's domain: an SPF record that passes 127.0.0.1, an RSA-2048 DKIM key
and a DMARC policy (p=reject).  Every message is DKIM-signed by dkimpy
(relaxed/relaxed, as most senders sign), so each one costs an SPF check
for MAIL FROM and for HELO, a DKIM verification with its streamed body
hash, an ARC look (no ARC headers) and DMARC with alignment.

Two servers run at once, on their own mail roots, with the same flags
(``--workers 1 --fsync batch --trusted-networks ::1/128``: 127.0.0.1 is
screened alike by both, and checked where the checks are on):

- ``off``: ``--spf off --dkim off --dmarc off --arc off``;
- ``on``: every check at ``tag`` (the default), and the resolver pointed
  at Knot (warm after the first message: every answer is cached).

bench/loadgen.py drives each (``--sessions`` connections, pipelining, the
signed message) for about ``--seconds``; the two alternate within each
round, and the table gives medians over the rounds: msgs/s, the ratio
on/off, and server CPU per message (utime+stime of the process tree from
/proc).

Then the cold case: a third server's resolver asks a forwarder that
answers after 5 ms (fastsmtp._testing_dns.DelayingForwarder, in front of
Knot), and every message has a new MAIL FROM domain (a wildcard SPF record
answers for it), so each message needs exactly one cold lookup.  The
client's latency (content sent to 250) is reported, p50/p99, beside the
same load with one sender (all warm).

Results go to stdout and, with ``--write``, to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH), str(BENCH.parent / "tests"), str(BENCH.parent / "src")]

import benchlib  # noqa: E402
import loadgen  # noqa: E402
from benchlib import cpu_delta, median, start_fastsmtp, stop_server, tree_cpu  # noqa: E402

DOMAIN = "bench.example"
SELECTOR = "sel"
SENDER = f"loadgen@{DOMAIN}"
HELO = f"mx.{DOMAIN}"
OFF = ("--spf", "off", "--dkim", "off", "--dmarc", "off", "--arc", "off")


def parse_size(text: str) -> int:
    text = text.strip().lower()
    unit = {"k": 1024, "m": 1024 * 1024}.get(text[-1:], 1)
    return int(text.rstrip("km")) * unit


def signed_message(size: int, key_pem: bytes) -> bytes:
    """A loadgen message of ``size`` octets, DKIM-signed (relaxed/relaxed, rsa-sha256)."""
    import dkim

    plain = loadgen.build_message(size, SENDER, "postmaster@localhost")
    # dkimpy signs what it is given; CRLF lines as on the wire.
    sig = dkim.sign(plain, SELECTOR.encode(), DOMAIN.encode(), key_pem,
                    canonicalize=(b"relaxed", b"relaxed"),
                    include_headers=[b"from", b"to", b"subject", b"date", b"message-id"])
    return sig.replace(b"\n", b"\r\n").replace(b"\r\r\n", b"\r\n") + plain


def zone(public_b64: str) -> str:
    from dnsserver import zone_text

    return zone_text(DOMAIN, [
        ("@", "TXT", "v=spf1 ip4:127.0.0.1 -all"),
        ("mx", "A", "127.0.0.1"),
        ("mx", "TXT", "v=spf1 a -all"),
        ("*.cold", "TXT", "v=spf1 ip4:127.0.0.1 -all"),
        (f"{SELECTOR}._domainkey", "TXT", f"v=DKIM1; k=rsa; p={public_b64}"),
        ("_dmarc", "TXT", "v=DMARC1; p=reject"),
    ])


def keys() -> tuple[bytes, str]:
    import base64

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption())
    der = key.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    return pem, base64.b64encode(der).decode()


def drive(port: int, content: bytes, seconds: float, sessions: int, mail_from: str = SENDER) -> loadgen.Result:
    opts = loadgen.Options(port=port, connections=sessions, messages=0, duration=seconds, content=content,
                           pipelining=True, mail_from=mail_from, ehlo=HELO, per_connection=1000,
                           to=["postmaster@localhost"]).validate()
    return asyncio.run(loadgen.run(opts))


def measure(proc, port: int, content: bytes, seconds: float, sessions: int, mail_from: str = SENDER):  # type: ignore[no-untyped-def]
    before = tree_cpu(proc.pid)
    result = drive(port, content, seconds, sessions, mail_from)
    user, system = cpu_delta(before, tree_cpu(proc.pid))
    per_msg = (user + system) / result.accepted * 1e6 if result.accepted else float("nan")
    return result, per_msg


def make_root(base: Path, name: str) -> Path:
    root = base / name
    box = root / "localhost" / "postmaster"
    for sub in ("tmp", "new", "cur"):
        (box / sub).mkdir(parents=True, exist_ok=True)
    return root


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--sizes", default="1k,100k")
    ap.add_argument("--cold-seconds", type=float, default=8.0)
    ap.add_argument("--cold-sessions", type=int, default=10)
    ap.add_argument("--dir", default="/tmp", help="where the mail roots go (moved aside, deleted at the end)")
    ap.add_argument("--write", action="store_true", help="add the tables to bench/RESULTS.md")
    args = ap.parse_args(argv)
    if shutil.which("knotd") is None:
        print("knotd is not installed (apt-get install knot)", file=sys.stderr)
        return 2
    from dnsserver import KnotServer

    from fastsmtp._testing_dns import DelayingForwarder

    sizes = [parse_size(s) for s in args.sizes.split(",")]
    pem, public = keys()
    base = Path(tempfile.mkdtemp(prefix="bench-auth-", dir=args.dir))
    lines: list[str] = []
    procs = []
    try:
        with KnotServer({DOMAIN: zone(public)}) as knot, DelayingForwarder(knot.server, delay=0.005) as slow:
            dns = f"127.0.0.1:{knot.port}"
            # Both trust only ::1: 127.0.0.1 is screened alike (and checked, with the checks on).
            common = ("--workers", "1", "--fsync", "batch", "--hostname", "mx.bench.test", "--trusted-networks", "::1/128")
            on_flags = ("--dns-server", dns)
            off, off_port, _ = start_fastsmtp(make_root(base, "off"), base / "off.log", *common, *OFF)
            procs.append(off)
            on, on_port, _ = start_fastsmtp(make_root(base, "on"), base / "on.log", *common, *on_flags)
            procs.append(on)
            rows = []
            for size in sizes:
                content = signed_message(size, pem)
                # Warm both (and the resolver's cache) before measuring.
                drive(off_port, content, 1.0, 2)
                drive(on_port, content, 1.0, 2)
                rates: dict[str, list[float]] = {"off": [], "on": []}
                cpus: dict[str, list[float]] = {"off": [], "on": []}
                failures = 0
                for r in range(args.rounds):
                    order = [("off", off, off_port), ("on", on, on_port)]
                    if r % 2:
                        order.reverse()
                    for name, proc, port in order:
                        result, per_msg = measure(proc, port, content, args.seconds, args.sessions)
                        failures += result.failures
                        rates[name].append(result.messages_per_s)
                        cpus[name].append(per_msg)
                        print(f"{size:>7} {name:>3} round {r + 1}: {result.messages_per_s:8.0f} msgs/s "
                              f"{per_msg:6.0f} µs CPU/msg  failures {result.failures}", flush=True)
                off_rate, on_rate = median(rates["off"]), median(rates["on"])
                rows.append((size, off_rate, on_rate, median(cpus["off"]), median(cpus["on"]), failures))
            stop_server(off)
            # The cold case: one new sender domain per message, DNS answers in 5 ms.
            cold, cold_port, _ = start_fastsmtp(
                make_root(base, "cold"), base / "cold.log", *common,
                "--dns-server", f"{slow.server[0]}:{slow.server[1]}")
            procs.append(cold)
            content = signed_message(1024, pem)
            drive(cold_port, content, 1.0, 2)  # warm what is shared (key, DMARC, HELO)
            warm_result, _ = measure(cold, cold_port, content, args.cold_seconds, args.cold_sessions)
            asked = slow.queries
            tag = int(time.time())
            cold_result, _ = measure(cold, cold_port, content, args.cold_seconds, args.cold_sessions,
                                     mail_from=f"u@m{tag}x{{n}}.cold.{DOMAIN}")
            cold_queries = slow.queries - asked
        lines.append(f"Run: `python bench/bench_auth.py --seconds {args.seconds:g} --rounds {args.rounds} "
                     f"--sessions {args.sessions} --sizes {args.sizes}` at {benchlib.git_commit()}, "
                     f"{time.strftime('%Y-%m-%d')}; one worker each, `--fsync batch`, loadgen with pipelining, "
                     "every message DKIM-signed (rsa-2048, relaxed/relaxed), DNS warm.")
        lines.append("")
        lines.append("| size | off msgs/s | on msgs/s | on ÷ off | CPU µs/msg off | CPU µs/msg on | failures |")
        lines.append("|---|---|---|---|---|---|---|")
        for size, off_rate, on_rate, off_cpu, on_cpu, failures in rows:
            lines.append(f"| {size // 1024} KiB | {off_rate:,.0f} | {on_rate:,.0f} | {on_rate / off_rate:.2f}× | "
                         f"{off_cpu:,.0f} | {on_cpu:,.0f} | {failures} |")
        lines.append("")
        lines.append(f"Cold: 1 KiB, {args.cold_sessions} sessions, a DNS server answering in 5 ms; each message "
                     "a new MAIL FROM domain (one cold SPF lookup each).")
        lines.append("")
        lines.append("| case | msgs/s | p50 ms | p99 ms | DNS queries | failures |")
        lines.append("|---|---|---|---|---|---|")
        for name, res, queries in (("warm", warm_result, 0), ("one cold lookup each", cold_result, cold_queries)):
            lat = res.latency_ms
            lines.append(f"| {name} | {res.messages_per_s:,.0f} | {lat.get('p50', float('nan')):.1f} | "
                         f"{lat.get('p99', float('nan')):.1f} | {queries if queries else '—'} | {res.failures} |")
        text = "\n".join(lines)
        print()
        print(text)
        if args.write:
            heading = "## Authentication: SPF, DKIM, DMARC and ARC, on vs off (issue 13)"
            benchlib.write_section(BENCH / "RESULTS.md", heading, heading + "\n\n" + text + "\n")
        return 0
    finally:
        for proc in procs:
            stop_server(proc)
        aside = base.with_name(base.name + ".done")
        os.rename(base, aside)
        shutil.rmtree(aside, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
