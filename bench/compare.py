"""Side by side: fastsmtp, aiosmtpd, Postfix and its smtp-sink, under two load generators.

Run:  /tmp/venv/bin/python bench/compare.py [--quick]      (or: bash bench/compare.sh)

Servers, each started fresh for every run on its own loopback port:

- ``fastsmtp serve --workers 1 --greeting-delay 0 --max-connections-per-ip 0
  --log-level info`` with ``--fsync off`` and with ``--fsync batch``, and
  (only when named in ``--servers``) ``fastsmtp-always``: ``--fsync always``;
- with ``--baseline TREE``, also ``fastsmtp-base-off``: the same ``--fsync off``
  command, same interpreter and flags, with PYTHONPATH=TREE/src (an older
  checkout or unpacked tree with its extension built in place);
- aiosmtpd (stdlib asyncio, as ``python -m aiosmtpd`` runs it) with a sink
  handler (``handle_DATA`` returns "250 OK") and with the Maildir handler a
  Python user would write (``mailbox.Maildir(...).add(envelope.content)`` in
  ``handle_DATA``: no fsync, run on the event loop);
- Postfix's ``smtp-sink``, a C event loop that throws mail away: the speed limit;
- ``postfix-maildir`` (only when named in ``--servers``; needs root): Postfix
  itself, durable, as a mail server ships: smtpd → cleanup (fsync of the
  queue file before the 250) → qmgr → virtual(8) into the same Maildir
  (fsync of every file before its link into new/).  A private instance,
  not the system's: for every run the benchmark writes ETC/main.cf and
  ETC/master.cf into the run's folder (its own ``queue_directory`` and
  ``data_directory`` there too), runs ``postfix -c ETC check`` (which makes
  the queue's folders) and starts ``master -c ETC -s`` as its own child
  (it stays in the foreground, in a process group of its own; ``-s`` keeps
  its stdout, where ``maillog_file = /dev/stdout`` sends the log).  smtpd
  listens on one free loopback port and nothing else does;
  ``mydestination`` is empty and the test domain is a
  ``virtual_mailbox_domains`` entry, delivered by virtual(8) as ``nobody``
  (who owns the mail root) through a ``texthash:`` map to ``DOMAIN/bench/``.
  Turned off, as not durability but in a local benchmark's way: DNS and
  peer-name lookups, connection count and rate limits, alias and local
  recipient lookups, chroot.  How cleanup and virtual write and fsync is
  left as shipped, and so is ``in_flow_delay`` (cleanup waits up to 1 s per
  message when delivery falls behind).  Its log goes through postlogd, a
  child of the master, so its CPU is counted, as fastsmtp's own log lines
  (``--log-level info``) are.  Stopped by SIGTERM to the master's PID (the
  master then signals its process group); a child still there after 5 s
  gets SIGKILL by its PID.

Load generators: Postfix's ``smtp-source`` (no pipelining) and bench/loadgen.py
(in this process; it pipelines where the server offers PIPELINING), at 1 and
50 concurrent sessions, 1 KiB and 100 KiB messages, one message per connection
and many per connection.  Recorded per run: messages/s, p50/p99 time from the
end of the content to the 250 (loadgen only; smtp-source does not measure
it), and the server's CPU seconds per 1,000 messages (utime + stime from
/proc/PID/stat, summed over the server process and its children, read before
and after the load).

Postfix goes on delivering after the load: smtpd's 250 means the message is
in the queue, and virtual(8) puts it into new/ afterwards.  So for every
Maildir server each CPU reading (the one before the load too, after the
warm-up) waits, bounded in time, until every acknowledged message is in new/
and, for Postfix, its queue (incoming/, active/, deferred/) is empty; the
time that takes after the load is reported as "Delivery" with the messages/s
counted to that point.  Messages/s in every other table is acceptance, as the
load generator sees it, for every server alike.  Postfix's children (smtpd,
cleanup, qmgr, trivial-rewrite, virtual) come and go, and an exited child's
CPU shows only in the master's cutime/cstime, once reaped: its reading is the
master's utime + stime + cutime + cstime plus every live child's utime +
stime, a total that only grows.  Postfix deletes every queue file once it is
delivered; that is how it works, and it is the one deletion while measuring
(see the rules below): the servers' order rotates over scenarios and rounds,
and the file-creation probe before and after the runs shows the state met.

Rules of this benchmark (DESIGN.md, "Measuring on these machines"):
- Every run has a fresh mail root (and Postfix a fresh queue), and nothing
  is deleted while measuring but Postfix's own queue files:
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
brings smtp-source, smtp-sink and the Postfix peer) with apt-get, preseeded
so that it configures no mail system.

The report is printed and written into bench/RESULTS.md as the section
"## Side by side: fastsmtp, aiosmtpd, smtp-sink" (``--no-write`` skips that).

The key figure, before and after, in one run (the scenario of the speed
issue: smtp-source, 20 sessions, 1 KiB, many messages per connection)::

    PYTHONPATH=$PWD/src python bench/compare.py --scenarios smtp-source:20:1k:many \\
        --servers fastsmtp-off,fastsmtp-base-off,aiosmtpd-maildir,smtp-sink \\
        --baseline /path/to/old/tree --baseline-label e1de444 --rounds 3 --duration 5

``--scenarios`` takes DRIVER:SESSIONS:SIZE:PER items, comma-separated
(SIZE like 1k, 100k or bytes; PER one or many; ``*`` in a field means that
field's default values), in place of the default set.  ``--baseline-label``
names the baseline where TREE is not a git checkout (else its short HEAD is
used, else the folder's name).  Which fastsmtp each server imports (folder
and parser) is checked before the runs and written in the report: without
PYTHONPATH, fastsmtp-off runs whatever copy the interpreter has installed.
Whenever ``--scenarios`` or ``--baseline`` is given, the report adds "The key
figure": per scenario, every server's messages/s, messages per server
CPU-second and µs of server CPU per message, with fastsmtp off's ratio to
each (goals: ≥ 3× the baseline and ≥ 4× aiosmtpd Maildir per CPU-second).

The journal issue's goals (fastsmtp ``--fsync batch`` as a write-ahead
journal) are reported whenever their scenarios and servers ran: smtp-source,
20 sessions, many messages per connection, in messages/s: (a) fastsmtp batch
≥ 0.8× fastsmtp off at 1 KiB and 100 KiB, (b) ≥ 5× Postfix durable Maildir at
1 KiB, (c) ≥ smtp-sink at 100 KiB::

    PYTHONPATH=$PWD/src python bench/compare.py \\
        --scenarios smtp-source:20:1k:many,smtp-source:20:100k:many \\
        --servers fastsmtp-off,fastsmtp-batch,fastsmtp-always,postfix-maildir,smtp-sink \\
        --rounds 3 --duration 3

The scenarios, the measurements and the report's tables are in
bench/comparelib.py; this file starts the servers and drives the load.

The same file serves the aiosmtpd peer: ``compare.py --serve-aiosmtpd
sink|maildir --mail-root DIR`` listens on a free loopback port, prints
"aiosmtpd listening on 127.0.0.1:PORT" and stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import itertools
import os
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
    CLK_TCK,
    HERE,
    HOST,
    RESULTS,
    cpu_delta,
    create_probe,
    fastsmtp_command,
    free_port,
    launch,
    process_tree,
    stop_server,
    tree_cpu,
    wait_listening,
    write_section,
)
from comparelib import (
    BASE_HEADING,
    BASE_SERVER,
    CLIENT_NAME,
    DEFAULT_SERVERS,
    DOMAIN,
    DRIVERS,
    FASTSMTP_ARGS,
    KiB,
    MAIL_FROM,
    PER_CONNECTION,
    POSTFIX_MAILBOXES,
    POSTFIX_SERVER,
    RCPT,
    REPLY_TIMEOUT,
    SECTION,
    SERVERS,
    SESSIONS,
    SIZES,
    Baseline,
    Measurement,
    RunInfo,
    Scenario,
    parse_scenarios,
    postfix_main_cf,
    postfix_master_cf,
    report,
    sink_user,
    smtp_source_header_len,
)


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
    """aiosmtpd (pip) and smtp-source/smtp-sink/postfix (apt: postfix); returns what was installed."""
    done: list[str] = []
    if importlib.util.find_spec("aiosmtpd") is None:
        if not install:
            raise SystemExit("aiosmtpd is missing (pip install aiosmtpd), and --no-install was given")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "aiosmtpd>=1.4"], check=True, timeout=600)
        done.append("aiosmtpd (pip)")
    if not (sbin_which("smtp-source") and sbin_which("smtp-sink") and sbin_which("postfix")):
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


def reaping_tree_cpu(root: int) -> dict[int, tuple[float, float]]:
    """The CPU of a process tree whose children come and go (Postfix's), as one total keyed by ``root``.

    utime + stime of ``root`` and of every live descendant, plus ``root``'s
    cutime + cstime: an exited child's CPU shows there once it is reaped,
    and only there (it is gone from /proc then).  A total that only grows,
    so ``cpu_delta`` of two readings is what the tree used in between,
    children that came and went included.  (Postfix's children fork
    nothing of their own here; a grandchild's CPU would show in its
    parent's cutime, which is not read.)
    """
    user = system = 0
    for pid in process_tree(root):
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
            fields = stat[stat.rindex(b")") + 2:].split()  # after comm, which may hold spaces and ")"
            user += int(fields[11]) + (int(fields[13]) if pid == root else 0)  # utime (14), cutime (16)
            system += int(fields[12]) + (int(fields[14]) if pid == root else 0)  # stime (15), cstime (17)
        except (OSError, ValueError, IndexError):
            pass  # it ended meanwhile (its CPU is in the master's cutime once reaped)
    return {root: (user / CLK_TCK, system / CLK_TCK)}


def count_files(folder: Path) -> int:
    """Files under ``folder``, subfolders included (deferred/ is hashed into subfolders)."""
    return sum(len(files) for _, _, files in os.walk(folder))


def stop_children(group: int, pids: list[int], timeout: float = 5.0) -> list[int]:
    """Wait for ``pids`` (children of a master that was stopped) to end; SIGKILL, by PID, those left after ``timeout``.

    A PID counts as still there while /proc has it, not as a zombie, in the
    process group ``group`` (the master's own): a reused PID is not touched.
    Returns the PIDs that had to be killed.
    """
    def there(pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
            fields = stat[stat.rindex(b")") + 2:].split()
            return fields[0] != b"Z" and int(fields[2]) == group  # state (3), pgrp (5)
        except (OSError, ValueError, IndexError):
            return False

    deadline = time.monotonic() + timeout
    left = [p for p in pids if there(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = [p for p in left if there(p)]
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return left


@dataclass
class Server:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log: Path
    cmd: list[str]
    new_dir: Path | None  # where stored messages appear (None: a sink)
    queue_dir: Path | None = None  # Postfix's queue (None: not Postfix)
    notes: list[str] = field(default_factory=list)  # from its start (postfix check's warnings)

    def stored(self) -> int | None:
        if self.new_dir is None:
            return None
        try:
            return len(os.listdir(self.new_dir))
        except OSError:
            return 0

    def queued(self) -> tuple[int, int]:
        """(messages waiting in Postfix's incoming/ and active/, messages in deferred/); (0, 0) for the others."""
        if self.queue_dir is None:
            return 0, 0
        q = self.queue_dir
        return count_files(q / "incoming") + count_files(q / "active"), count_files(q / "deferred")

    def cpu(self) -> dict[int, tuple[float, float]]:
        """A reading for ``cpu_delta``: by PID over the tree, or Postfix's one total (``reaping_tree_cpu``)."""
        return reaping_tree_cpu(self.proc.pid) if self.queue_dir is not None else tree_cpu(self.proc.pid)

    def stop(self) -> tuple[int | None, list[int]]:
        """SIGTERM by PID: (exit code, PIDs of Postfix children that needed SIGKILL).

        Postfix's master, on SIGTERM, signals its process group and exits at
        once, without waiting for its children: they are waited for here.
        """
        kids = process_tree(self.proc.pid)[1:] if self.queue_dir is not None else []
        _, code = stop_server(self.proc)
        return code, stop_children(self.proc.pid, kids) if kids else []


# -- which fastsmtp runs ---------------------------------------------------------------

# Run with the server's own interpreter and environment: the folder of the
# fastsmtp it imports, and which parser (compiled or the twin) it picked.
ORIGIN_PROBE = ("import os, fastsmtp, fastsmtp.parser as p; "
                "print(os.path.dirname(os.path.realpath(fastsmtp.__file__))); "
                "print(getattr(p, 'IMPLEMENTATION', '?'))")


def tree_label(tree: Path) -> str:
    """Short HEAD of ``tree`` when it is a git checkout's top folder, else the folder's name."""
    try:
        top = subprocess.run(["git", "-C", str(tree), "rev-parse", "--show-toplevel"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        if top and Path(top).resolve() == tree.resolve():
            head = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True,
                                  text=True, timeout=10).stdout.strip()
            if head:
                return head
    except (OSError, subprocess.SubprocessError):
        pass
    return tree.resolve().name


def fastsmtp_origin(env: dict[str, str] | None = None) -> tuple[str, str]:
    """(folder of the fastsmtp package, parser implementation) as a server with ``env`` would import them."""
    out = subprocess.run([sys.executable, "-c", ORIGIN_PROBE], capture_output=True, text=True, timeout=60,
                         env={**os.environ, **(env or {})}, cwd=tempfile.gettempdir())
    if out.returncode != 0:
        raise SystemExit(f"cannot import fastsmtp with {env or 'this environment'}: {out.stderr.strip()[-500:]}")
    folder, impl = (out.stdout.split("\n") + ["", ""])[:2]
    return folder, impl


def check_origins(servers: list[str], baseline: Baseline | None) -> dict[str, str]:
    """What each fastsmtp server of the run imports, as report lines by server; refuses a wrong baseline."""
    origins: dict[str, tuple[str, str]] = {}
    if any(s.startswith("fastsmtp-") and s != BASE_SERVER for s in servers):
        origins["fastsmtp"] = fastsmtp_origin()
    if baseline is not None and BASE_SERVER in servers:
        folder, impl = origins[BASE_SERVER] = fastsmtp_origin(baseline.env)
        if Path(folder) != (baseline.src / "fastsmtp").resolve():
            raise SystemExit(f"--baseline: PYTHONPATH={baseline.src} imports fastsmtp from {folder}")
        if impl != "cython" and not os.environ.get("FASTSMTP_PUREPYTHON"):
            raise SystemExit(f"--baseline: {baseline.src} has no compiled parser (parser: {impl}); build it "
                             "in place: python setup.py build_ext --inplace")
        if "fastsmtp" in origins and origins["fastsmtp"][0] == folder:
            raise SystemExit(f"--baseline: the baseline and the tree under test are both {folder}")
        if "fastsmtp" in origins and origins["fastsmtp"][1] != impl:
            raise SystemExit(f"--baseline: its parser is {impl}, the tree under test's is {origins['fastsmtp'][1]} "
                             f"({origins['fastsmtp'][0]}): build the extension in place there, or compare twins")
    mine = HERE.parent / "src" / "fastsmtp"
    if "fastsmtp" in origins and mine.is_dir() and Path(origins["fastsmtp"][0]) != mine.resolve():
        print(f"note: fastsmtp-off/-batch import {origins['fastsmtp'][0]}, not this checkout's {mine} "
              f"(PYTHONPATH={mine.parent} runs this one)", flush=True)
    return {k: f"`{folder}` (parser: {impl})" for k, (folder, impl) in origins.items()}


# -- the private Postfix instance ------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def postconf_default(name: str) -> str:
    """A parameter's built-in default (``postconf -d -h``): where this Postfix keeps its daemons, its version."""
    out = subprocess.run([sbin_which("postconf") or "postconf", "-d", "-h", name], capture_output=True, text=True,
                         timeout=60)
    if out.returncode != 0 or not out.stdout.strip():
        raise RuntimeError(f"postconf -d -h {name}: {out.stderr.strip()[-300:]}")
    return out.stdout.strip()


def postfix_compatibility_level() -> str:
    """The installed version's compatibility level: "MAJOR.MINOR" from Postfix 3.6 on, else "2"."""
    major, minor = (int(x) for x in postconf_default("mail_version").split(".")[:2])
    return f"{major}.{minor}" if (major, minor) >= (3, 6) else "2"


def prepare_postfix(run_dir: Path, root: Path, sessions: int) -> tuple[list[str], int, Path, list[str]]:
    """Write a private instance's configuration under ``run_dir`` and make its queue.

    Returns (the master's command, smtpd's port, the queue folder, warnings
    of ``postfix check``).  The mail root is given to the user virtual(8)
    delivers as (``sink_user``: nobody), with the Maildir folder made in it.
    """
    user = pwd.getpwnam(sink_user())
    if user.pw_uid == 0:
        raise RuntimeError("postfix-maildir: no unprivileged user for virtual(8) to deliver as (nobody)")
    etc, queue, data = run_dir / "postfix-etc", run_dir / "postfix-queue", run_dir / "postfix-data"
    box = root / DOMAIN / RCPT.split("@")[0]
    for sub in ("cur", "new", "tmp"):
        (box / sub).mkdir(parents=True)
    for folder in (root, root / DOMAIN, box, box / "cur", box / "new", box / "tmp"):
        os.chown(folder, user.pw_uid, user.pw_gid)
    etc.mkdir()
    queue.mkdir(mode=0o755)  # root's, as Postfix wants it; postfix check makes the folders in it
    port = free_port()
    (etc / "main.cf").write_text(postfix_main_cf(
        compat=postfix_compatibility_level(), queue=queue, data=data, config=etc, mail_root=root,
        uid=user.pw_uid, gid=user.pw_gid, sessions=sessions))
    (etc / "master.cf").write_text(postfix_master_cf(HOST, port))
    (etc / "vmailbox").write_text(POSTFIX_MAILBOXES)
    check = subprocess.run([sbin_which("postfix") or "postfix", "-c", str(etc), "check"], capture_output=True,
                           text=True, timeout=120, cwd=run_dir)
    said = [" ".join(line.split()) for line in (check.stdout + check.stderr).splitlines() if line.strip()]
    if check.returncode != 0:
        raise RuntimeError(f"postfix -c {etc} check: exit {check.returncode}: {' | '.join(said)[-500:]}")
    master = Path(postconf_default("daemon_directory")) / "master"
    # -s: in the foreground (our child; it makes its own process group) with its stdout kept for the log.
    return [str(master), "-c", str(etc), "-s"], port, queue, [f"postfix check: {x}"[:200] for x in said]


def start_server(name: str, run_dir: Path, baseline: Baseline | None = None, sessions: int = 50) -> Server:
    """Start ``name`` on a free loopback port with a fresh mail root under ``run_dir``.

    ``sessions``: the scenario's, for Postfix's process limit.
    """
    run_dir.mkdir(parents=True)
    log = run_dir / "server.log"
    root = run_dir / "mail"
    new_dir: Path | None = None
    port: int | None = None
    env: dict[str, str] | None = None
    queue: Path | None = None
    notes: list[str] = []
    if name.startswith("fastsmtp-"):
        from fastsmtp.policy import add_mailbox  # a Maildir folder (cur/, new/, tmp/): the same in every tree

        root.mkdir()
        add_mailbox(str(root), RCPT)
        new_dir = root / DOMAIN / "bench" / "new"
        cmd = fastsmtp_command(root, *FASTSMTP_ARGS, "--fsync", name.rsplit("-", 1)[1])
        if name == BASE_SERVER:
            if baseline is None:
                raise ValueError(f"{name} needs --baseline")
            env = baseline.env
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
    elif name == POSTFIX_SERVER:
        root.mkdir()
        cmd, port, queue, notes = prepare_postfix(run_dir, root, sessions)
        new_dir = root / DOMAIN / "bench" / "new"
    else:
        raise ValueError(name)
    proc = launch(cmd, log, env=env, cwd=run_dir)
    return Server(name, proc, wait_listening(proc, log, name, port), log, cmd, new_dir, queue, notes)


def wait_delivered(server: Server, acked: int, slack: int, timeout: float) -> tuple[float | None, str | None]:
    """Seconds until every acknowledged message is in new/ and Postfix's queue is empty; (None, why) if not.

    ``slack``: how many of ``acked`` may never have been acknowledged (a run
    stopped by the clock).  Polled every 20 ms, the queue first (small
    folders), new/ once the queue is empty; gives up after ``timeout``
    seconds, or at once when what is left in the queue is deferred (its
    retry is minutes away).  (None, None) for a sink.
    """
    if server.new_dir is None:
        return None, None
    start = time.perf_counter()
    while True:
        waiting, deferred = server.queued()
        stored = server.stored() if waiting == 0 else None
        if waiting == 0 and deferred:
            return None, f"{deferred} message(s) deferred in Postfix's queue (see its log)"
        if stored is not None and stored >= acked - slack:
            return time.perf_counter() - start, None
        if time.perf_counter() - start > timeout:
            return None, (f"not delivered {timeout:g} s after the load: {waiting} in Postfix's queue, "
                          f"{server.stored()} in new/ for {acked} acknowledged")
        time.sleep(0.02)


# -- load ------------------------------------------------------------------------------

# A line of Postfix's log that is not routine.
POSTFIX_PROBLEM = r"postfix/[\w/.-]+\[\d+\]: (?:fatal|panic|error|warning):"


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
    server = start_server(server_name, run_dir, args.baseline_tree, sc.sessions)
    m.notes += server.notes
    drain_timeout = 2 * args.duration + 10  # Postfix may deliver slower than it accepts
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
        # Postfix delivers after its 250: let the warm-up's messages land first, so that
        # neither their delivery's CPU nor their files fall into the measured run.
        _, why = wait_delivered(server, warm_accepted, slack, drain_timeout)
        if why:
            m.notes.append(f"warm-up: {why}")
        before = server.cpu()
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
        # The CPU of delivering what was accepted belongs to the run (Postfix's virtual(8)).
        m.drain, why = wait_delivered(server, warm_accepted + m.accepted, slack, drain_timeout)
        if why:
            m.notes.append(why)
        after = server.cpu()
        m.server_user, system = cpu_delta(before, after)
        m.server_cpu = m.server_user + system
    finally:
        code, killed = server.stop()
    if code not in (0, -signal.SIGTERM):
        m.notes.append(f"server exit code {code} after SIGTERM")
    if killed:
        m.notes.append(f"{len(killed)} Postfix process(es) still there 5 s after the master's exit: SIGKILL")
    stored = server.stored()
    if stored is not None:
        acked = warm_accepted + m.accepted
        # A stop by the clock may count up to one unacknowledged message per session.
        if not acked - slack <= stored <= acked:
            m.notes.append(f"stored {stored} files for {acked} acknowledged messages")
    problem = POSTFIX_PROBLEM if server.queue_dir is not None else r"ERROR|CRITICAL|Traceback"
    for line in server.log.read_text(errors="replace").splitlines():
        if re.search(problem, line):
            m.notes.append(f"server log: {line.strip()[:160]}")
            break
    return m


# -- main ------------------------------------------------------------------------------


def load_loadgen() -> Any:
    sys.path.insert(0, str(HERE))
    import loadgen  # bench/ is not a package

    return loadgen


def select(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The baseline, servers and drivers of the run, checked (``ap.error`` on a bad one)."""
    args.baseline_tree = None
    if args.baseline:
        tree = Path(args.baseline).resolve()
        if not (tree / "src" / "fastsmtp" / "__init__.py").is_file():
            ap.error(f"--baseline {args.baseline}: no src/fastsmtp/ in it")
        args.baseline_tree = Baseline(tree / "src", args.baseline_label or tree_label(tree))
    elif args.baseline_label:
        ap.error("--baseline-label needs --baseline")
    default = [*DEFAULT_SERVERS, BASE_SERVER] if args.baseline_tree else list(DEFAULT_SERVERS)
    args.server_list = [s for s in (args.servers or ",".join(default)).split(",") if s]
    args.driver_list = [d for d in args.drivers.split(",") if d]
    unknown = [s for s in args.server_list if s not in [*SERVERS, BASE_SERVER]]
    unknown += [d for d in args.driver_list if d not in DRIVERS]
    if unknown:
        ap.error(f"unknown: {', '.join(unknown)}")
    if BASE_SERVER in args.server_list and args.baseline_tree is None:
        ap.error(f"{BASE_SERVER} needs --baseline TREE")
    if POSTFIX_SERVER in args.server_list and os.geteuid() != 0:
        ap.error(f"{POSTFIX_SERVER} needs root: Postfix's master starts as root and drops privileges")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
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
    ap.add_argument("--servers", default=None,
                    help=f"comma-separated subset of {','.join(SERVERS)},{BASE_SERVER} "
                    f"(default: {','.join(DEFAULT_SERVERS)}, and {BASE_SERVER} with --baseline; "
                    f"{POSTFIX_SERVER} needs root)")
    ap.add_argument("--drivers", default=",".join(DRIVERS))
    ap.add_argument("--scenarios", default=None, metavar="LIST",
                    help="DRIVER:SESSIONS:SIZE:PER,... in place of the default set, e.g. smtp-source:20:1k:many "
                    "(SIZE: 1k, 100k or bytes; PER: one|many; * in a field: its default values)")
    ap.add_argument("--baseline", default=None, metavar="TREE",
                    help=f"add {BASE_SERVER}: fastsmtp --fsync off from TREE/src (its extension built in place)")
    ap.add_argument("--baseline-label", default=None, metavar="NAME",
                    help="the baseline's name in the tables (default: TREE's short git HEAD, else its folder name)")
    ap.add_argument("--dir", default=None, help="parent folder of the mail roots (default: system tmp)")
    ap.add_argument("--keep", action="store_true", help="leave the mail roots in place")
    ap.add_argument("--no-write", action="store_true", help=f"do not update {RESULTS.name}")
    ap.add_argument("--no-install", action="store_true", help="fail instead of installing missing tools")
    ap.add_argument("--serve-aiosmtpd", choices=("sink", "maildir"), help=argparse.SUPPRESS)
    ap.add_argument("--mail-root", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve_aiosmtpd:
        return args
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.duration = args.duration or (1.0 if args.quick else 2.5)
    args.count_1k = args.count_1k or 30_000
    args.count_100k = args.count_100k or (500 if args.quick else 1500)
    args.budget = args.budget or (240.0 if args.quick else 1140.0)
    select(ap, args)
    try:
        args.scenario_list = (parse_scenarios(args.scenarios, args.driver_list) if args.scenarios else
                              [Scenario(*x) for x in itertools.product(args.driver_list, SESSIONS, SIZES,
                                                                       PER_CONNECTION)])
    except ValueError as exc:
        ap.error(str(exc))
    return args


def run_rounds(args: argparse.Namespace, loadgen: Any, base: Path, info: RunInfo,
               started: float) -> list[Measurement]:
    """Every scenario, round by round, the servers in a rotating order; skips what the budget cannot fit."""
    servers, scenarios, runs = args.server_list, args.scenario_list, []
    per_run = args.duration + 1.5  # start, warm-up and stop besides the measured load
    for rnd in range(1, args.rounds + 1):
        for i, sc in enumerate(scenarios):
            k = (rnd - 1 + i) % len(servers)  # rotate the order from scenario to scenario and round to round
            for name in servers[k:] + servers[:k]:
                if time.monotonic() - started + per_run > args.budget:
                    info.skipped.append(f"r{rnd} {sc.label} {name}")
                    continue
                try:
                    m = one_run(loadgen, base, rnd, sc, name, args)
                except (RuntimeError, OSError) as exc:
                    m = Measurement(sc, name, rnd, notes=[f"run failed: {exc}"[:300]])
                runs.append(m)
                lat = f"  p50 {m.p50:6.2f} ms  p99 {m.p99:6.2f} ms" if m.p50 is not None else ""
                drain = f"  in new/ +{m.drain:.2f} s" if m.drain is not None else ""
                print(f"r{rnd} {sc.label:<38} {info.headings[name]:<23} {m.rate:9,.0f} msg/s "
                      f"({m.accepted} in {m.elapsed:.2f} s)  "
                      f"server {m.cpu_per_1k:.3f} s/1k  client {m.client_per_1k:.3f} s/1k{lat}{drain}"
                      + ("  | " + "; ".join(m.notes) if m.notes else ""), flush=True)
    return runs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_aiosmtpd:
        return serve_aiosmtpd(args.serve_aiosmtpd, args.mail_root)
    given = sys.argv[1:] if argv is None else argv
    headings = {name: head for name, (head, _) in SERVERS.items()}
    if args.baseline_tree is not None:
        headings[BASE_SERVER] = BASE_HEADING.format(label=args.baseline_tree.label)
    pythonpath = os.environ.get("PYTHONPATH")
    command = shlex.join([sys.executable, "bench/compare.py", *given])
    info = RunInfo((f"PYTHONPATH={shlex.quote(pythonpath)} " if pythonpath else "") + command, headings,
                   check_origins(args.server_list, args.baseline_tree), [])

    started = time.monotonic()
    load_before = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    info.installed = ensure_tools(not args.no_install)
    loadgen = load_loadgen()
    # Each run holds up to 50 sessions plus smtp-source's descriptors: plenty, but be sure.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(soft, 4096), hard), hard))

    base = Path(tempfile.mkdtemp(prefix="fastsmtp-compare-", dir=args.dir))
    if POSTFIX_SERVER in args.server_list:
        base.chmod(0o755)  # virtual(8) delivers as nobody, who must reach the mail roots below (mkdtemp: 0700)
    try:
        probe_before = create_probe(base / "probe-before")
        runs = run_rounds(args, loadgen, base, info, started)
        info.probes = (probe_before, create_probe(base / "probe-after"))
        info.loads = (load_before, " ".join(Path("/proc/loadavg").read_text().split()[:3]))
        info.wall = time.monotonic() - started
        section = report(runs, args.scenario_list, args.server_list, args, info)
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
