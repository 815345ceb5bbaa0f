"""What checking DKIM costs a peer: Postfix alone and Postfix with OpenDKIM verifying, beside fastsmtp off and on.

Run:  python bench/bench_auth_peers.py [--seconds 5] [--rounds 3] [--sessions 20] [--sizes 1k,100k] [--write]

Needs root (Postfix's private instance, as in bench/compare.py), Debian's
postfix, opendkim and knot.  Every message is bench_auth.py's: signed by
dkimpy (rsa-2048, relaxed/relaxed) for bench.example, whose key, SPF and
DMARC records a Knot DNS server on loopback serves to fastsmtp, started
here; OpenDKIM reads the same key from a file.

Servers, each started once per size on its own loopback port, the rounds
interleaved:

- ``fastsmtp off``: ``--workers 1 --fsync batch`` with every check off;
- ``fastsmtp dkim``: DKIM only (``--spf off --dmarc off --arc off``), what
  OpenDKIM does;
- ``fastsmtp all``: SPF (MAIL FROM and HELO), DKIM, DMARC and ARC, the
  defaults;
- ``postfix``: compare.py's ``postfix-maildir`` (smtpd, cleanup with its
  fsync before the 250, qmgr, virtual(8) into Maildir);
- ``postfix+opendkim``: the same with ``smtpd_milters`` set to Debian's
  OpenDKIM in verify mode on a UNIX socket, which adds its
  Authentication-Results field to every message (``opendkim()`` says how
  it is set up, and why).

Load: bench/loadgen.py with pipelining, ``--sessions`` connections, many
messages per connection.  CPU per message is utime+stime over the server's
process tree from /proc (Postfix's reaped children included, read once
every acknowledged message is delivered), plus OpenDKIM's own process for
``postfix+opendkim``.  Reported: msgs/s, CPU µs per message, each
configuration's ratio to its own server with no check, and the CPU the
checks add per message: the two figures the 0.8× goal of issue 13 is about.

Loopback only; every process is stopped by its PID; the roots live under
one temporary folder removed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH), str(BENCH.parent / "tests"), str(BENCH.parent / "src")]

import bench_auth  # noqa: E402
import benchlib  # noqa: E402
import compare  # noqa: E402
import loadgen  # noqa: E402
from benchlib import cpu_delta, median, start_fastsmtp, stop_server, tree_cpu  # noqa: E402

RCPT = compare.RCPT  # bench@bench.example: Postfix's one virtual mailbox, and ours
CONFIGS = ("fastsmtp off", "fastsmtp dkim", "fastsmtp all", "postfix", "postfix+opendkim")
BASE = {"fastsmtp dkim": "fastsmtp off", "fastsmtp all": "fastsmtp off", "postfix+opendkim": "postfix"}
# Every fastsmtp trusts only ::1: 127.0.0.1 is screened alike, and checked where the checks are on.
COMMON = ("--workers", "1", "--fsync", "batch", "--hostname", "mx.bench.test", "--trusted-networks", "::1/128")
DKIM_ONLY = ("--spf", "off", "--dmarc", "off", "--arc", "off")


class Target:
    """One running server of the run: its port, how to read its CPU, how long delivery takes."""

    def __init__(self, name: str, port: int, cpu: object, new: Path, postfix: compare.Server | None = None,
                 milter_pid: int | None = None) -> None:
        self.name = name
        self.new = new  # the mailbox's new/: what was stored, to see that it was checked
        self.port = port
        self._cpu = cpu
        self.postfix = postfix
        self.milter_pid = milter_pid
        self.acked = 0

    def cpu(self) -> tuple[dict[int, tuple[float, float]], dict[int, tuple[float, float]]]:
        own = self.postfix.cpu() if self.postfix is not None else tree_cpu(self._cpu)  # type: ignore[arg-type]
        return own, (tree_cpu(self.milter_pid) if self.milter_pid else {})

    def settle(self, timeout: float) -> str | None:
        """Wait until Postfix has delivered every acknowledged message (nothing to wait for with fastsmtp)."""
        if self.postfix is None:
            return None
        return compare.wait_delivered(self.postfix, self.acked, 0, timeout)[1]


def drive(target: Target, content: bytes, seconds: float, sessions: int) -> loadgen.Result:
    opts = loadgen.Options(port=target.port, connections=sessions, messages=0, duration=seconds, content=content,
                           pipelining=True, mail_from=bench_auth.SENDER, ehlo=bench_auth.HELO, per_connection=1000,
                           to=[RCPT], timeout=compare.REPLY_TIMEOUT).validate()
    result = loadgen.run_sync(opts)
    target.acked += result.accepted
    return result


def fastsmtp_root(base: Path, name: str) -> Path:
    from fastsmtp.policy import add_mailbox

    root = base / name.replace(" ", "-")
    root.mkdir()
    add_mailbox(str(root), RCPT)
    return root


@contextlib.contextmanager
def opendkim(home: Path, public_b64: str) -> Iterator[tuple[Path, int]]:
    """OpenDKIM verifying, on a UNIX socket: (the socket, its PID).

    The key comes from a file (``TestPublicKeys``), as from a warm cache;
    fastsmtp's resolver is warm too.  Two choices, each measured here:
    through its libunbound resolver (``ResolverConfiguration``, as
    tests/opendkimd.py runs it) OpenDKIM 2.11 loses its listening thread
    within a second of concurrent sessions and every later message is
    tempfailed; and on TCP, Postfix's milter packets meet Nagle and the
    delayed ACK (a macro packet with no reply, then the first header from
    another process), ~40 ms per message, so msgs/s measured latency, not
    work.  A UNIX socket has neither.
    """
    keys = home / "keys"
    keys.write_text(f"{bench_auth.SELECTOR}._domainkey.{bench_auth.DOMAIN} v=DKIM1; k=rsa; p={public_b64}\n")
    sock = home / "milter.sock"
    conf = home / "opendkim.conf"
    conf.write_text(f"Syslog no\nMode v\nAuthservID mx.bench.test\nTestPublicKeys {keys}\n"
                    # 127.0.0.1 is not internal here: its mail is verified, not signed.
                    "InternalHosts 192.0.2.1\nAlwaysAddARHeader yes\n"
                    f"Socket local:{sock}\nUMask 000\nPidFile {home / 'pid'}\nUserID root\nBackground no\n"
                    "RequireSafeKeys false\n")
    home.chmod(0o755)  # smtpd and cleanup run as postfix: they must reach the socket
    proc = benchlib.launch(["opendkim", "-f", "-x", str(conf)], home / "log")
    try:
        deadline = time.monotonic() + 15
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("opendkim did not start: " + (home / "log").read_text(errors="replace")[-500:])
            time.sleep(0.02)
        yield sock, proc.pid
    finally:
        stop_server(proc)


@contextlib.contextmanager
def postfix(base: Path, name: str, sessions: int, milter: Path | None) -> Iterator[compare.Server]:
    """compare.py's private Postfix instance, with the milter on that UNIX socket when one is given."""
    run_dir = base / name
    run_dir.mkdir()
    root = run_dir / "mail"
    root.mkdir()
    cmd, port, queue, _ = compare.prepare_postfix(run_dir, root, sessions)
    if milter is not None:
        with open(run_dir / "postfix-etc" / "main.cf", "a") as cf:
            # Milter protocol 6 (Postfix ≥ 2.6); a milter that fails tempfails the message, never skips it.
            cf.write(f"\nsmtpd_milters = unix:{milter}\nmilter_protocol = 6\nmilter_default_action = tempfail\n")
    log = run_dir / "server.log"
    proc = benchlib.launch(cmd, log, cwd=run_dir)
    server = compare.Server(name, proc, benchlib.wait_listening(proc, log, name, port), log, cmd,
                            root / compare.DOMAIN / "bench" / "new", queue)
    try:
        yield server
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--sizes", default="1k,100k")
    ap.add_argument("--dir", default="/tmp", help="where the roots go (deleted at the end)")
    ap.add_argument("--write", action="store_true", help="put the table into bench/RESULTS.md")
    args = ap.parse_args(argv)
    missing = [tool for tool in ("knotd", "opendkim", "postconf") if compare.sbin_which(tool) is None]
    if missing or os.geteuid() != 0:
        print(f"needs root and {', '.join(missing) or 'nothing else'} (apt-get install postfix opendkim knot)",
              file=sys.stderr)
        return 2
    from dnsserver import KnotServer

    sizes = [bench_auth.parse_size(s) for s in args.sizes.split(",")]
    pem, public = bench_auth.keys()
    base = Path(tempfile.mkdtemp(prefix="bench-auth-peers-", dir=args.dir))
    base.chmod(0o755)  # Postfix's children and virtual(8) (nobody) must reach what lies below (mkdtemp: 0700)
    rows: list[tuple[int, str, float, float, float, int]] = []
    try:
        with KnotServer({bench_auth.DOMAIN: bench_auth.zone(public)}) as knot:
            odk_home = base / "opendkim"
            odk_home.mkdir()
            with opendkim(odk_home, public) as (milter, milter_pid):
                for size in sizes:
                    rows += measure_size(args, base, size, bench_auth.signed_message(size, pem), knot.port,
                                         milter, milter_pid)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    text = report(args, rows)
    print(text)
    if args.write:
        heading = "## Authentication beside a peer: Postfix with OpenDKIM (issue 13)"
        benchlib.write_section(BENCH / "RESULTS.md", heading, heading + "\n\n" + text)
    return 0


def measure_size(args: argparse.Namespace, base: Path, size: int, content: bytes, dns_port: int, milter: Path,
                 milter_pid: int) -> list[tuple[int, str, float, float, float, int]]:
    """Every configuration at one size: (size, name, msgs/s, server CPU µs/msg, milter CPU µs/msg, failures)."""
    here = base / str(size)
    here.mkdir()
    procs = []
    with contextlib.ExitStack() as stack:
        targets: list[Target] = []
        for name, flags in (("fastsmtp off", bench_auth.OFF), ("fastsmtp dkim", DKIM_ONLY), ("fastsmtp all", ())):
            dns = () if flags == bench_auth.OFF else ("--dns-server", f"127.0.0.1:{dns_port}")
            root = fastsmtp_root(here, name)
            proc, port, _ = start_fastsmtp(root, here / f"{name.replace(' ', '-')}.log", *COMMON, *flags, *dns)
            procs.append(proc)
            targets.append(Target(name, port, proc.pid, root / compare.DOMAIN / "bench" / "new"))
        for name, socket in (("postfix", None), ("postfix+opendkim", milter)):
            server = stack.enter_context(postfix(here, name.replace("+", "-"), args.sessions, socket))
            assert server.new_dir is not None
            targets.append(Target(name, server.port, None, server.new_dir, server, milter_pid if socket else None))
        try:
            for target in targets:  # warm-up: imports, first files, the caches, Postfix's processes
                drive(target, content, 1.0, 2)
                target.settle(60)
            got: dict[str, list[tuple[float, float, float]]] = {t.name: [] for t in targets}
            failures = dict.fromkeys(got, 0)
            for r in range(args.rounds):
                for target in (targets if r % 2 == 0 else targets[::-1]):
                    before, mbefore = target.cpu()
                    result = drive(target, content, args.seconds, args.sessions)
                    why = target.settle(2 * args.seconds + 30)
                    after, mafter = target.cpu()
                    cpu = sum(cpu_delta(before, after))
                    mcpu = sum(cpu_delta(mbefore, mafter)) if mbefore else 0.0
                    n = max(result.accepted, 1)
                    got[target.name].append((result.messages_per_s, cpu / n * 1e6, mcpu / n * 1e6))
                    failures[target.name] += result.failures + (1 if why else 0)
                    print(f"{size:>7} {target.name:>16} round {r + 1}: {result.messages_per_s:7.0f} msgs/s "
                          f"{cpu / n * 1e6:6.0f} µs/msg server {mcpu / n * 1e6:6.0f} µs/msg milter "
                          f"failures {result.failures}{'  ' + why if why else ''}", flush=True)
        finally:
            for proc in procs:
                stop_server(proc)
        for target in targets:
            if target.name in BASE and not checked(target.new):
                print(f"{target.name}: the last message stored has no dkim=pass", flush=True)
                failures[target.name] += 1
    return [(size, name, median(v[0] for v in values), median(v[1] for v in values), median(v[2] for v in values),
             failures[name]) for name, values in got.items()]


def checked(new: Path) -> bool:
    """Whether the newest message in ``new`` carries an Authentication-Results field with dkim=pass."""
    files = sorted(new.iterdir(), key=lambda f: f.stat().st_mtime)
    if not files:
        return False
    head = files[-1].read_bytes().partition(b"\r\n\r\n")[0].replace(b"\r\n\t", b" ").replace(b"\r\n ", b" ")
    head = head.replace(b"\n\t", b" ").replace(b"\n ", b" ")  # virtual(8) stores LF lines
    return any(line.lower().startswith(b"authentication-results:") and b"dkim=pass" in line
               for line in head.replace(b"\r\n", b"\n").split(b"\n"))


def report(args: argparse.Namespace, rows: list[tuple[int, str, float, float, float, int]]) -> str:
    by = {(size, name): (rate, cpu, mcpu) for size, name, rate, cpu, mcpu, _ in rows}
    lines = [
        f"Run: `python bench/bench_auth_peers.py --seconds {args.seconds:g} --rounds {args.rounds} "
        f"--sessions {args.sessions} --sizes {args.sizes}` at {benchlib.git_commit()}, {time.strftime('%Y-%m-%d')}; "
        "loadgen with pipelining, every message DKIM-signed (rsa-2048, relaxed/relaxed), DNS warm; medians.",
        "",
        "| size | server | msgs/s | ÷ its own with no check | CPU µs/msg (milter included) | added by the checks | "
        "failures |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for size, name, rate, cpu, mcpu, failed in rows:
        total = cpu + mcpu
        base = BASE.get(name)
        if base is None:
            ratio, added = "1.00×", "—"
        else:
            brate, bcpu, bmcpu = by[(size, base)]
            ratio, added = f"{rate / brate:.2f}×", f"{total - bcpu - bmcpu:,.0f}"
        milter = f" ({mcpu:,.0f} in OpenDKIM)" if mcpu else ""
        lines.append(f"| {size // 1024} KiB | {name} | {rate:,.0f} | {ratio} | {total:,.0f}{milter} | {added} | "
                     f"{failed} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
