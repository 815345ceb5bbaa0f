"""Side by side: fastsmtp, aiosmtpd and Postfix's smtp-sink, under two load generators.

Run:  /tmp/venv/bin/python bench/compare.py [--quick]      (or: bash bench/compare.sh)

Servers, each started fresh for every run on its own loopback port:

- ``fastsmtp serve --workers 1 --greeting-delay 0`` with ``--fsync off`` and
  with ``--fsync batch``;
- aiosmtpd (stdlib asyncio, as ``python -m aiosmtpd`` runs it) with a sink
  handler (``handle_DATA`` returns "250 OK") and with the Maildir handler a
  Python user would write (``mailbox.Maildir(...).add(envelope.content)`` in
  ``handle_DATA``: no fsync, run on the event loop);
- Postfix's ``smtp-sink``, a C event loop that throws mail away: the speed limit.

Load generators: Postfix's ``smtp-source`` (no pipelining) and bench/loadgen.py
(in this process; it pipelines where the server offers PIPELINING), at 1 and
50 concurrent sessions, 1 KiB and 100 KiB messages, one message per connection
and many per connection.  Recorded per run: messages/s, p50/p99 time from the
end of the content to the 250 (loadgen only; smtp-source does not measure
it), and the server's CPU seconds per 1,000 messages (utime + stime from
/proc/PID/stat, summed over the server process and its children, read before
and after the load).

Rules of this benchmark (DESIGN.md, "Measuring on these machines"):
- Every run has a fresh mail root, and nothing is deleted while measuring:
  every root lives under one base folder that is removed at the very end
  (``--keep`` leaves it), because creating files on this ext4 is up to ~20x
  slower for minutes after many deletions.
- Every run is bounded by a message count and a duration.  smtp-source has
  no duration option: its count is set from the rate of its warm-up run, and
  a run that still overshoots is stopped by its PID (its ``-c`` count is then
  taken, and the run is listed under anomalies).  The whole benchmark has a
  time budget (``--budget``): runs that would not fit are skipped and listed.
- Loopback only; every process is stopped by its own PID.
- With ``--rounds`` above 1 the servers run interleaved within each scenario
  and the tables give medians.

Missing tools are installed first (``--no-install`` skips that): aiosmtpd
with pip into the running interpreter's environment, and Postfix (which
brings smtp-source and smtp-sink) with apt-get, preseeded so that it
configures no mail system.

The report is printed and written into bench/RESULTS.md as the section
"## Side by side: fastsmtp, aiosmtpd, smtp-sink" (``--no-write`` skips that).

The same file serves the aiosmtpd peer: ``compare.py --serve-aiosmtpd
sink|maildir --mail-root DIR`` listens on a free loopback port, prints
"aiosmtpd listening on 127.0.0.1:PORT" and stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import itertools
import os
import platform
import pwd
import re
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchlib import (  # bench/ is on sys.path: the script's own folder
    FASTSMTP_BENCH_FLAGS,
    HERE,
    HOST,
    RESULTS,
    cpu_delta,
    create_probe,
    fastsmtp_command,
    free_port,
    git_commit,
    launch,
    stop_server,
    tree_cpu,
    wait_listening,
    write_section,
)
from benchlib import median as med

SECTION = "## Side by side: fastsmtp, aiosmtpd, smtp-sink"

DOMAIN = "bench.example"
RCPT = f"bench@{DOMAIN}"
MAIL_FROM = "loadgen@example.net"
CLIENT_NAME = "client.bench.example"
REPLY_TIMEOUT = 30.0
KiB = 1024
# fastsmtp's flags besides --fsync (benchlib adds --listen, --mail-root and FASTSMTP_BENCH_FLAGS).
FASTSMTP_ARGS = ("--hostname", "mx.bench.example", "--workers", "1", "--max-connections-per-ip", "10000")

# name -> (table heading, what it is)
SERVERS: dict[str, tuple[str, str]] = {
    "fastsmtp-off": ("fastsmtp off", "fastsmtp serve --workers 1 --fsync off"),
    "fastsmtp-batch": ("fastsmtp batch", "fastsmtp serve --workers 1 --fsync batch"),
    "aiosmtpd-sink": ("aiosmtpd sink", "aiosmtpd, handle_DATA returns 250 OK"),
    "aiosmtpd-maildir": ("aiosmtpd Maildir", "aiosmtpd, handle_DATA does mailbox.Maildir.add (no fsync)"),
    "smtp-sink": ("smtp-sink", "Postfix smtp-sink (C, discards)"),
}
DRIVERS = ("smtp-source", "loadgen")
SESSIONS = (1, 50)
SIZES = (1 * KiB, 100 * KiB)
PER_CONNECTION = {"one": 1, "many": 100}  # loadgen's K; smtp-source has one (no -d) or all (-d)


# -- the aiosmtpd peer (runs in its own process) -------------------------------------


def serve_aiosmtpd(kind: str, mail_root: str | None) -> int:
    """An aiosmtpd server as its documentation shows it, on a free loopback port."""
    import asyncio
    import mailbox

    from aiosmtpd.smtp import SMTP

    class Sink:
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            return "250 OK"

    class MaildirHandler:
        def __init__(self, path: str) -> None:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            self.mailbox = mailbox.Maildir(path, create=True)

        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            self.mailbox.add(envelope.content)
            return "250 OK"

    if kind == "maildir":
        if not mail_root:
            raise SystemExit("--serve-aiosmtpd maildir needs --mail-root")
        handler: Any = MaildirHandler(os.path.join(mail_root, DOMAIN, "bench"))
    else:
        handler = Sink()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: SMTP(handler, hostname="aiosmtpd.bench.example"), HOST, 0)
        port = server.sockets[0].getsockname()[1]
        print(f"aiosmtpd listening on {HOST}:{port} ({kind})", flush=True)
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        await stop.wait()
        server.close()

    asyncio.run(main())
    return 0


# -- installing what is missing ----------------------------------------------------


def sbin_which(tool: str) -> str | None:
    return shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/usr/local/sbin:/sbin")


def ensure_tools(install: bool) -> list[str]:
    """aiosmtpd (pip) and smtp-source/smtp-sink (apt: postfix); returns what was installed."""
    done: list[str] = []
    if importlib.util.find_spec("aiosmtpd") is None:
        if not install:
            raise SystemExit("aiosmtpd is missing (pip install aiosmtpd), and --no-install was given")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "aiosmtpd>=1.4"], check=True, timeout=600)
        done.append("aiosmtpd (pip)")
    if not (sbin_which("smtp-source") and sbin_which("smtp-sink")):
        if not install:
            raise SystemExit("smtp-source/smtp-sink are missing (apt-get install postfix), and --no-install was given")
        if os.geteuid() != 0 or not shutil.which("apt-get"):
            raise SystemExit("smtp-source/smtp-sink are missing: install Postfix (needs root and apt-get)")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, timeout=600, env=env)
        # Without a preseeded answer the package asks; "No configuration" starts no mail system.
        subprocess.run(["debconf-set-selections"], input=b"postfix postfix/main_mailer_type select No configuration\n",
                       check=True, timeout=60)
        subprocess.run(["apt-get", "install", "-y", "-qq", "postfix"], check=True, timeout=900, env=env)
        done.append("postfix (apt-get)")
    return done


# -- processes and CPU ---------------------------------------------------------------


@dataclass
class Server:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log: Path
    cmd: list[str]
    new_dir: Path | None  # where stored messages appear (None: a sink)

    def stored(self) -> int | None:
        if self.new_dir is None:
            return None
        try:
            return len(os.listdir(self.new_dir))
        except OSError:
            return 0


def sink_user() -> str:
    for name in ("nobody", pwd.getpwuid(os.getuid()).pw_name):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    return "root"


def start_server(name: str, run_dir: Path) -> Server:
    """Start ``name`` on a free loopback port with a fresh mail root under ``run_dir``."""
    run_dir.mkdir(parents=True)
    log = run_dir / "server.log"
    root = run_dir / "mail"
    new_dir: Path | None = None
    port: int | None = None
    if name.startswith("fastsmtp-"):
        from fastsmtp.policy import add_mailbox

        root.mkdir()
        add_mailbox(str(root), RCPT)
        new_dir = root / DOMAIN / "bench" / "new"
        cmd = fastsmtp_command(root, *FASTSMTP_ARGS, "--fsync", name.split("-", 1)[1])
    elif name.startswith("aiosmtpd-"):
        kind = name.split("-", 1)[1]
        cmd = [sys.executable, str(Path(__file__).resolve()), "--serve-aiosmtpd", kind]
        if kind == "maildir":
            root.mkdir()
            cmd += ["--mail-root", str(root)]
            new_dir = root / DOMAIN / "bench" / "new"
    elif name == "smtp-sink":
        port = free_port()
        # -u: it refuses to run as root without it.  Backlog 1000: the listen queue.
        cmd = [sbin_which("smtp-sink") or "smtp-sink", "-u", sink_user(), f"{HOST}:{port}", "1000"]
    else:
        raise ValueError(name)
    proc = launch(cmd, log, cwd=run_dir)
    return Server(name, proc, wait_listening(proc, log, name, port), log, cmd, new_dir)


# -- load ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    driver: str
    sessions: int
    size: int
    per_conn: str  # "one" | "many"

    @property
    def label(self) -> str:
        size = f"{self.size // KiB} KiB"
        per = "1/conn" if self.per_conn == "one" else ("many/conn" if self.driver == "smtp-source" else "100/conn")
        return f"{self.driver}, {self.sessions} sess, {size}, {per}"


@dataclass
class Measurement:
    scenario: Scenario
    server: str
    round: int
    accepted: int = 0
    elapsed: float = 0.0
    server_cpu: float = 0.0  # user + system
    server_user: float = 0.0
    client_cpu: float = 0.0
    clock_stopped: bool = False  # smtp-source hit the time cap (its count may be high by up to one per session)
    p50: float | None = None
    p99: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.accepted / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def cpu_per_1k(self) -> float:
        return 1000 * self.server_cpu / self.accepted if self.accepted else float("nan")

    @property
    def user_per_1k(self) -> float:
        return 1000 * self.server_user / self.accepted if self.accepted else float("nan")

    @property
    def client_per_1k(self) -> float:
        return 1000 * self.client_cpu / self.accepted if self.accepted else float("nan")


def smtp_source_header_len() -> int:
    """Bytes smtp-source puts in front of its -l payload (From, To, Date, Message-Id, blank line)."""
    date = "Date: Sat, 28 Nov 2026 17:01:13 +0000 (UTC)\r\n"
    msgid = f"Message-Id: <754e.0003.0001@{CLIENT_NAME}>\r\n"
    return len(f"From: <{MAIL_FROM}>\r\nTo: <{RCPT}>\r\n") + len(date) + len(msgid) + 2


def smtp_source_cmd(sc: Scenario, port: int, count: int) -> list[str]:
    cmd = [sbin_which("smtp-source") or "smtp-source", "-c", "-s", str(sc.sessions),
           "-l", str(max(sc.size - smtp_source_header_len(), 0)), "-m", str(count),
           "-f", MAIL_FROM, "-t", RCPT, "-M", CLIENT_NAME]
    if sc.per_conn == "many":
        cmd.append("-d")  # do not disconnect: every message of a session on one connection
    return cmd + [f"{HOST}:{port}"]


@dataclass
class SourceRun:
    count: int  # messages it finished sending ("." written; its -c counter)
    elapsed: float
    cpu: float  # its own user + system seconds
    stopped: bool  # stopped by the clock rather than by its count
    problem: str | None


def smtp_source_warmup(sc: Scenario, warmup: int) -> int:
    """Messages in smtp-source's warm-up run: long enough to estimate the rate from."""
    return max(warmup * (4 if sc.size <= KiB else 1), 2 * sc.sessions)


def run_smtp_source(sc: Scenario, port: int, count: int, cap: float, out: Path) -> SourceRun:
    """smtp-source until it has sent ``count`` messages, stopped by its PID after ``cap`` seconds.

    Its ``-c`` counter goes up when the "." is written, before the 250 is
    read, so after a stop by the clock it may count up to one message per
    session that was never acknowledged; a run that ends by itself (exit 0)
    had every message acknowledged (it exits on any unexpected reply).
    """
    cmd = smtp_source_cmd(sc, port, count)
    with open(out, "wb") as f:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    deadline = start + cap
    stopped_at: float | None = None
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)  # wait4: its rusage too
        if pid:
            break
        if stopped_at is None and time.perf_counter() >= deadline:
            proc.send_signal(signal.SIGTERM)  # by its PID; it has no duration option of its own
            stopped_at = time.perf_counter()
        time.sleep(0.002)
    end = stopped_at if stopped_at is not None else time.perf_counter()
    proc.returncode = os.waitstatus_to_exitcode(status)
    text = out.read_bytes().decode("ascii", "replace")
    counts = re.findall(r"(\d+)", text.replace("\r", "\n"))
    problem = None
    if stopped_at is None and proc.returncode != 0:
        problem = f"smtp-source exit {proc.returncode}: {' '.join(text.split())[-200:]!r}"
    elif "fatal" in text or "warning" in text:
        problem = f"smtp-source said: {' '.join(text.split())[-200:]!r}"
    sent = count if stopped_at is None and proc.returncode == 0 else (int(counts[-1]) if counts else 0)
    return SourceRun(sent, end - start, usage.ru_utime + usage.ru_stime, stopped_at is not None, problem)


def loadgen_options(loadgen: Any, sc: Scenario, port: int, count: int, duration: float) -> Any:
    return loadgen.Options(
        host=HOST, port=port, connections=sc.sessions, messages=count, duration=duration, size=sc.size,
        per_connection=PER_CONNECTION[sc.per_conn], pipelining=True, mail_from=MAIL_FROM, to=[RCPT],
        timeout=REPLY_TIMEOUT,
    )


def one_run(loadgen: Any, base: Path, rnd: int, sc: Scenario, server_name: str, args: argparse.Namespace) -> Measurement:
    m = Measurement(sc, server_name, rnd)
    run_dir = base / f"r{rnd}" / f"{sc.driver}-s{sc.sessions}-{sc.size}-{sc.per_conn}" / server_name
    count = args.count_1k if sc.size <= KiB else args.count_100k
    server = start_server(server_name, run_dir)
    warm_accepted, slack = 0, 0
    try:
        # Warm-up (imports, first connections, the first files of a fresh root) with the
        # run's own generator.  For smtp-source it is also the calibration: it has no
        # duration option, so the measured run gets the count that fills the duration
        # at the warm-up's rate, and the clock only stops it when that estimate is far off.
        if sc.driver == "smtp-source":
            warm_s = run_smtp_source(sc, server.port, smtp_source_warmup(sc, args.warmup), 2.0,
                                     run_dir / "warmup.out")
            warm_accepted, slack = warm_s.count, sc.sessions if warm_s.stopped else 0
            rate = warm_s.count / warm_s.elapsed if warm_s.elapsed > 0 else 0.0
            # The warm-up's rate is low (it includes smtp-source's start and the
            # first connections): aim 30% over; the clock stops a run that overshoots.
            count = max(sc.sessions, min(count, int(1.3 * rate * args.duration)))
            if warm_s.problem:
                m.notes.append(f"warm-up: {warm_s.problem}")
        else:
            warm = loadgen.run_sync(loadgen.Options(
                host=HOST, port=server.port, connections=min(sc.sessions, 5), messages=args.warmup, duration=2.0,
                size=sc.size, per_connection=10, pipelining=True, mail_from=MAIL_FROM, to=[RCPT],
                timeout=REPLY_TIMEOUT))
            warm_accepted = warm.accepted
            if warm.failures:
                m.notes.append(f"warm-up failures: {warm.failures} {warm.errors}")
        before = tree_cpu(server.proc.pid)
        if sc.driver == "smtp-source":
            src = run_smtp_source(sc, server.port, count, 2 * args.duration + 2, run_dir / "smtp-source.out")
            m.accepted, m.elapsed, m.client_cpu, m.clock_stopped = src.count, src.elapsed, src.cpu, src.stopped
            if src.stopped:
                slack += sc.sessions
                m.notes.append(f"smtp-source stopped by the clock after {src.elapsed:.1f} s "
                               f"(count may be high by up to {sc.sessions})")
            if src.problem:
                m.notes.append(src.problem)
        else:
            client0 = time.process_time()
            res = loadgen.run_sync(loadgen_options(loadgen, sc, server.port, count, args.duration))
            m.client_cpu = time.process_time() - client0
            m.accepted, m.elapsed = res.accepted, res.elapsed
            m.p50, m.p99 = res.latency_ms.get("p50"), res.latency_ms.get("p99")
            if res.failures:
                m.notes.append(f"loadgen failures: 4xx {res.temp_failures}, 5xx {res.perm_failures}, "
                               f"connection errors {res.connection_errors} {res.errors}")
        after = tree_cpu(server.proc.pid)
        m.server_user, system = cpu_delta(before, after)
        m.server_cpu = m.server_user + system
    finally:
        _, code = stop_server(server.proc)
    if code not in (0, -signal.SIGTERM):
        m.notes.append(f"server exit code {code} after SIGTERM")
    stored = server.stored()
    if stored is not None:
        acked = warm_accepted + m.accepted
        # A stop by the clock may count up to one unacknowledged message per session.
        if not acked - slack <= stored <= acked:
            m.notes.append(f"stored {stored} files for {acked} acknowledged messages")
    for line in server.log.read_text(errors="replace").splitlines():
        if re.search(r"ERROR|CRITICAL|Traceback", line):
            m.notes.append(f"server log: {line.strip()[:160]}")
            break
    return m


# -- report ----------------------------------------------------------------------------


def fmt_rate(x: float) -> str:
    return "–" if x != x else f"{x:,.0f}"


def fmt_num(x: float | None, digits: int = 3) -> str:
    return "–" if x is None or x != x else f"{x:.{digits}f}"


def report(runs: list[Measurement], scenarios: list[Scenario], servers: list[str], args: argparse.Namespace,
           command: str, wall: float, skipped: list[str], installed: list[str], probes: tuple[float, float],
           loads: tuple[str, str]) -> str:
    cell: dict[tuple[Scenario, str], dict[str, float]] = {}
    for sc in scenarios:
        for s in servers:
            rs = [r for r in runs if r.scenario == sc and r.server == s]
            if not rs:
                continue
            cell[sc, s] = {
                "rate": med([r.rate for r in rs]),
                "cpu": med([r.cpu_per_1k for r in rs]),
                "user": med([r.user_per_1k for r in rs]),
                "client": med([r.client_per_1k for r in rs]),
                "p50": med([r.p50 for r in rs if r.p50 is not None]),
                "p99": med([r.p99 for r in rs if r.p99 is not None]),
            }
    heads = [SERVERS[s][0] for s in servers]
    now = datetime.datetime.now(datetime.timezone.utc)
    count_text = f"{args.count_1k:,} (1 KiB) / {args.count_100k:,} (100 KiB)"
    lines = [
        SECTION,
        "",
        f"Date: {now:%Y-%m-%d %H:%M} UTC. Commit: `{git_commit()}`. nproc: {os.cpu_count()}. "
        f"Linux {platform.release()}, Python {platform.python_version()}. Total run time {wall:.0f} s "
        "(before the final deletion of the mail roots)"
        f"{' (quick mode)' if args.quick else ''}.",
        "",
        "Command:",
        "",
        f"    {command}",
        "",
        "What it ran, each server fresh for every run (fresh mail root, its own loopback port), "
        f"{args.rounds} round(s){', servers interleaved within each scenario, medians shown' if args.rounds > 1 else ''}:",
        "",
        f"- fastsmtp: `python -m fastsmtp serve --listen 127.0.0.1:0 --mail-root ROOT "
        f"{' '.join(FASTSMTP_BENCH_FLAGS + FASTSMTP_ARGS)} --fsync off|batch` (uvloop; a supervisor and one worker; "
        "no greeting delay, else one-message-per-connection runs would measure it).",
        "- aiosmtpd: `python bench/compare.py --serve-aiosmtpd sink|maildir --mail-root ROOT`: "
        "`loop.create_server(lambda: SMTP(handler), ...)` on stdlib asyncio; the sink's `handle_DATA` returns "
        "`\"250 OK\"`, the Maildir one calls `mailbox.Maildir(ROOT/...).add(envelope.content)` "
        "(no fsync, on the event loop). aiosmtpd does not offer PIPELINING, so loadgen waits for every reply there.",
        f"- smtp-sink: `smtp-sink -u {sink_user()} 127.0.0.1:PORT 1000`.",
        f"- smtp-source: `smtp-source -c -s SESSIONS -l LEN -m COUNT [-d] -f {MAIL_FROM} -t {RCPT} "
        f"-M {CLIENT_NAME} 127.0.0.1:PORT`; LEN is the size minus its {smtp_source_header_len()} header bytes; "
        "it sends HELO, so no pipelining; `-d` (many per connection) keeps each session on one connection for "
        "the whole run. It has no duration option, so COUNT is 1.3 × what the warm-up's rate gives in "
        f"{args.duration:g} s (capped as below; the warm-up is an unmeasured smtp-source run of "
        f"max({4 * args.warmup} at 1 KiB or {args.warmup} at 100 KiB, 2 × sessions) messages); a run still "
        f"going after {2 * args.duration + 2:g} s is stopped by its PID and its `-c` count is taken "
        "(listed under anomalies). Messages/s is its count over its run time.",
        f"- loadgen: `python bench/loadgen.py --port PORT --connections SESSIONS --messages COUNT "
        f"--duration {args.duration:g} --size SIZE --per-connection 1|100 --pipelining --from {MAIL_FROM} "
        f"--to {RCPT}`, run in the benchmark's process (`loadgen.run_sync`).",
        f"- COUNT: at most {count_text}; loadgen also stops claiming messages after {args.duration:g} s "
        f"(and finishes those in flight). Its warm-up: {args.warmup} unmeasured messages over up to 5 sessions.",
        "- Server CPU: utime+stime from /proc/PID/stat over the server process and its children "
        "(fastsmtp's supervisor plus worker), read before and after the measured load.",
        "- The machine is shared (2 cores; other test runs were going on): trust only differences "
        "over ~20%. Client and server share the two cores, so the client's CPU slows the server too.",
        f"- Load average (1, 5, 15 min) before: {loads[0]}; after: {loads[1]}. Creating a 1 KiB file in a new "
        f"folder took {probes[0]:.3f} ms before the runs and {probes[1]:.3f} ms after them (the ext4 "
        "state after deletions, DESIGN.md).",
    ]
    if installed:
        lines.append(f"- Installed first: {', '.join(installed)}.")
    lines += ["", "### Messages per second", "",
              "| scenario | " + " | ".join(heads) + " |", "|---|" + "---:|" * len(heads)]
    for sc in scenarios:
        lines.append(f"| {sc.label} | " + " | ".join(
            fmt_rate(cell[sc, s]["rate"]) if (sc, s) in cell else "–" for s in servers) + " |")
    lines += ["", "### Server CPU seconds per 1,000 messages", "",
              "| scenario | " + " | ".join(heads) + " |", "|---|" + "---:|" * len(heads)]
    for sc in scenarios:
        lines.append(f"| {sc.label} | " + " | ".join(
            fmt_num(cell[sc, s]["cpu"]) if (sc, s) in cell else "–" for s in servers) + " |")
    lines += ["", "### Of which user-mode CPU (the rest is system time: sockets, file creation)", "",
              "| scenario | " + " | ".join(heads) + " |", "|---|" + "---:|" * len(heads)]
    for sc in scenarios:
        lines.append(f"| {sc.label} | " + " | ".join(
            fmt_num(cell[sc, s]["user"]) if (sc, s) in cell else "–" for s in servers) + " |")
    lines += ["", "### Time to 250 after the end of the content, p50 / p99 (loadgen)", "",
              "| scenario | " + " | ".join(heads) + " |", "|---|" + "---:|" * len(heads)]
    for sc in scenarios:
        if sc.driver != "loadgen":
            continue
        lines.append(f"| {sc.label} | " + " | ".join(
            f"{cell[sc, s]['p50']:.2f} / {cell[sc, s]['p99']:.2f} ms" if (sc, s) in cell else "–"
            for s in servers) + " |")
    lines += ["", "### Load generator CPU seconds per 1,000 messages", "",
              "| scenario | " + " | ".join(heads) + " |", "|---|" + "---:|" * len(heads)]
    for sc in scenarios:
        lines.append(f"| {sc.label} | " + " | ".join(
            fmt_num(cell[sc, s]["client"]) if (sc, s) in cell else "–" for s in servers) + " |")
    lines += goals(cell, scenarios, servers)
    notes = [f"round {r.round}, {r.scenario.label}, {SERVERS[r.server][0]}: {n}" for r in runs for n in r.notes]
    lines += ["", "Anomalies: " + ("none (no failures, stored = acknowledged, no server errors)." if not notes else "")]
    lines += [f"- {n}" for n in notes]
    if skipped:
        lines += ["", f"Skipped for the time budget ({args.budget:g} s): {len(skipped)} run(s): "
                  + "; ".join(skipped[:10]) + (" …" if len(skipped) > 10 else "")]
    return "\n".join(lines) + "\n"


def goals(cell: dict[tuple[Scenario, str], dict[str, float]], scenarios: list[Scenario],
          servers: list[str]) -> list[str]:
    """Per scenario: the three ratios the issue sets goals for."""
    want = {"fastsmtp-off", "fastsmtp-batch", "aiosmtpd-sink", "aiosmtpd-maildir", "smtp-sink"}
    if not want <= set(servers):
        return []
    lines = ["", "### Against the goals", "",
             "Messages per server CPU-second are 1000 / (CPU s per 1k). Goals: fastsmtp off ≥ 3× aiosmtpd's "
             "messages per server CPU-second (A: against the sink handler, B: against the Maildir handler); "
             "fastsmtp off ≥ 0.5× smtp-sink's messages/s (C); fastsmtp batch ahead of aiosmtpd Maildir in "
             "messages/s (D).",
             "",
             "| scenario | A: off / aiosmtpd sink, msgs per CPU-s | B: off / aiosmtpd Maildir, msgs per CPU-s | "
             "C: off / smtp-sink, msgs/s | D: batch / aiosmtpd Maildir, msgs/s |",
             "|---|---:|---:|---:|---:|"]
    tally = {"A": [0, 0], "B": [0, 0], "C": [0, 0], "D": [0, 0]}

    def ratio(key: str, num: float, den: float, goal: float, strict: bool = False) -> str:
        if not (num == num and den == den) or den == 0:
            return "–"
        r = num / den
        ok = r > goal if strict else r >= goal
        tally[key][0] += ok
        tally[key][1] += 1
        return f"{r:.2f}×" + ("" if ok else " ✗")

    for sc in scenarios:
        if not all((sc, s) in cell for s in want):
            continue
        c = {s: cell[sc, s] for s in want}
        lines.append(
            f"| {sc.label} | "
            f"{ratio('A', c['aiosmtpd-sink']['cpu'], c['fastsmtp-off']['cpu'], 3)} | "
            f"{ratio('B', c['aiosmtpd-maildir']['cpu'], c['fastsmtp-off']['cpu'], 3)} | "
            f"{ratio('C', c['fastsmtp-off']['rate'], c['smtp-sink']['rate'], 0.5)} | "
            f"{ratio('D', c['fastsmtp-batch']['rate'], c['aiosmtpd-maildir']['rate'], 1, strict=True)} |")
    lines += ["", "✗ marks a scenario where the goal is not met. Met in: "
              + ", ".join(f"{k} {v[0]} of {v[1]}" for k, v in tally.items()) + "."]
    return lines


# -- main ------------------------------------------------------------------------------


def load_loadgen() -> Any:
    sys.path.insert(0, str(HERE))
    import loadgen  # bench/ is not a package

    return loadgen


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 round of 1 s runs (a few minutes)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds (default 3; --quick 1)")
    ap.add_argument("--duration", type=float, default=None, help="seconds per run (default 2.5; --quick 1)")
    ap.add_argument("--count-1k", type=int, default=None, help="message bound per run at 1 KiB (default 30000)")
    ap.add_argument("--count-100k", type=int, default=None,
                    help="message bound per run at 100 KiB (default 1500; --quick 500): caps the disk used")
    ap.add_argument("--warmup", type=int, default=50, help="unmeasured loadgen messages per run")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds for the whole benchmark; runs that would not fit are skipped (default 1140; --quick 240)")
    ap.add_argument("--servers", default=",".join(SERVERS), help="comma-separated subset of " + ",".join(SERVERS))
    ap.add_argument("--drivers", default=",".join(DRIVERS))
    ap.add_argument("--dir", default=None, help="parent folder of the mail roots (default: system tmp)")
    ap.add_argument("--keep", action="store_true", help="leave the mail roots in place")
    ap.add_argument("--no-write", action="store_true", help=f"do not update {RESULTS.name}")
    ap.add_argument("--no-install", action="store_true", help="fail instead of installing missing tools")
    ap.add_argument("--serve-aiosmtpd", choices=("sink", "maildir"), help=argparse.SUPPRESS)
    ap.add_argument("--mail-root", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve_aiosmtpd:
        return serve_aiosmtpd(args.serve_aiosmtpd, args.mail_root)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.duration = args.duration or (1.0 if args.quick else 2.5)
    args.count_1k = args.count_1k or 30_000
    args.count_100k = args.count_100k or (500 if args.quick else 1500)
    args.budget = args.budget or (240.0 if args.quick else 1140.0)
    servers = [s for s in args.servers.split(",") if s]
    drivers = [d for d in args.drivers.split(",") if d]
    unknown = [s for s in servers if s not in SERVERS] + [d for d in drivers if d not in DRIVERS]
    if unknown:
        ap.error(f"unknown: {', '.join(unknown)}")
    given = sys.argv[1:] if argv is None else argv
    command = shlex.join([sys.executable, "bench/compare.py", *given])

    started = time.monotonic()
    load_before = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    installed = ensure_tools(not args.no_install)
    loadgen = load_loadgen()
    # Each run holds up to 50 sessions plus smtp-source's descriptors: plenty, but be sure.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(soft, 4096), hard), hard))

    scenarios = [Scenario(d, s, z, p) for d, s, z, p in itertools.product(drivers, SESSIONS, SIZES, PER_CONNECTION)]
    base = Path(tempfile.mkdtemp(prefix="fastsmtp-compare-", dir=args.dir))
    runs: list[Measurement] = []
    skipped: list[str] = []
    per_run = args.duration + 1.5  # start, warm-up and stop besides the measured load
    try:
        probe_before = create_probe(base / "probe-before")
        for rnd in range(1, args.rounds + 1):
            for i, sc in enumerate(scenarios):
                k = (rnd - 1 + i) % len(servers)  # rotate the order from scenario to scenario and round to round
                for name in servers[k:] + servers[:k]:
                    if time.monotonic() - started + per_run > args.budget:
                        skipped.append(f"r{rnd} {sc.label} {name}")
                        continue
                    try:
                        m = one_run(loadgen, base, rnd, sc, name, args)
                    except (RuntimeError, OSError) as exc:
                        m = Measurement(sc, name, rnd, notes=[f"run failed: {exc}"[:300]])
                    runs.append(m)
                    lat = f"  p50 {m.p50:6.2f} ms  p99 {m.p99:6.2f} ms" if m.p50 is not None else ""
                    print(f"r{rnd} {sc.label:<38} {SERVERS[name][0]:<17} {m.rate:9,.0f} msg/s "
                          f"({m.accepted} in {m.elapsed:.2f} s)  "
                          f"server {m.cpu_per_1k:.3f} s/1k  client {m.client_per_1k:.3f} s/1k{lat}"
                          + ("  | " + "; ".join(m.notes) if m.notes else ""), flush=True)
        probe_after = create_probe(base / "probe-after")
        load_after = " ".join(Path("/proc/loadavg").read_text().split()[:3])
        section = report(runs, scenarios, servers, args, command, time.monotonic() - started, skipped, installed,
                         (probe_before, probe_after), (load_before, load_after))
        print()
        print(section)
        if not args.no_write:
            write_section(RESULTS, SECTION, section)  # re-reads the file right before writing
            print(f"written to {RESULTS}")
    finally:
        # Deleting only now, after every measurement (see the module docstring).
        if args.keep:
            print(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
