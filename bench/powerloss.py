"""Power-loss check: is every acknowledged message still there after a power cut?

Run as root (it makes loop devices):

    PYTHONPATH=src python bench/powerloss.py --moments 20 --fsync batch
    PYTHONPATH=src python bench/powerloss.py --moments 5 --fsync off --workers 1,2

A power cut is simulated as DESIGN.md ("Measuring on these machines")
prescribes; a plain copy of a busy image is not one:

- An outer XFS (reflink) on a loop device holds, per moment, a fresh inner
  image with ext4 on it (default options, with its journal), on a loop
  device of its own.  The server's mail root, and so its default journal
  folder, are on the inner ext4.
- The server runs with ``--workers N`` under a load of several concurrent
  sessions, each sending unique messages (a token in the Message-ID and the
  body, 200 B to 100 KiB, a quarter of them to two recipients), recording
  for each the moment its 250 was read.
- At a random moment T0 the inner image is cloned with ``cp
  --reflink=always`` (FICLONE: XFS flushes the image's page cache and locks
  it for an instant), while the load goes on.  The clone is the disk as a
  power cut at that instant would leave it: what ext4 had written to its
  device is there, what was only in ext4's page cache is not.  Everything
  whose 250 was read before T0 had been acknowledged before the clone, so it
  must survive.  The server is then killed; what it does after T0 does not
  matter.
- The clone is checked with ``e2fsck -fy`` (exit 0 or 1 is fine), mounted
  where the inner file system was, and the server started on it: it recovers (the journal of ``--fsync
  batch``) before its port opens.  Once it listens it is stopped, and the
  mailboxes are compared with what was sent.

Counted per moment: ``acked`` (250 read before T0), ``lost`` (of those, the
ones missing from some recipient's ``new/`` or not byte-exact there),
``dup`` (a message more than once in one ``new/``), ``partial`` (a file in
``new/`` that is not byte-exact some message sent to that mailbox: cut
short, empty, corrupt, unknown), and ``unacked`` (delivered without a 250
read before T0: fine, the 250 was lost with the power).  A file's content is
compared after the Return-Path and Received headers the server prepends.
The same check on the clone before the restart (``before recovery:
missing``, ``partial``) shows how much the recovery had to do: under
``--fsync batch`` a message is in ``new/`` only a moment after its 250.

Exit status: 0 when nothing was lost, duplicated or partial in any moment,
1 when something was, 2 when the run proves nothing (no message was
acknowledged before a cut, or a harness step failed).  ``--fsync off`` is
expected to exit 1: it shows that the method does catch losses.  With
``--json FILE`` the moments and totals are also written as JSON
(tests/test_powerloss.py reads them).

Bounded: every session, read and process wait has a timeout; every mount,
loop device, image and server process is undone in ``finally``, on Ctrl-C
and SIGTERM too.  Servers are killed by their own process group (each is
started in a new session), nothing else.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import benchlib
import loopfs

HOST = benchlib.HOST
RECIPIENTS = ("alice@example.com", "bob@example.com")
OUTER_SIZE = 4 << 30  # sparse; holds one inner image and its clone at a time
INNER_SIZE = 1 << 30  # sparse; ext4 on it; room for seconds of --fsync off load
SIZES = (200, 100 * 1024)  # message sizes, log-uniform between these
TWO_RECIPIENTS = 0.25
REPLY_TIMEOUT = 20.0
START_TIMEOUT = 60.0  # recovery of a large journal runs before the port opens
EXAMPLES = 3  # lost and partial messages named per moment


# -- the load ------------------------------------------------------------------------


@dataclass
class Sent:
    """One message whose content the load began sending."""

    rcpts: tuple[str, ...]
    digest: bytes  # sha256 of the content, as it must be stored
    acked_at: float | None = None  # time.monotonic() once its 250 was read


def make_body(token: str, size: int, rng: random.Random) -> bytes:
    """A message of about ``size`` octets that names ``token``; no line starts with '.'."""
    head = f"Message-ID: <{token}@powerloss.test>\r\nSubject: power loss {token}\r\n\r\n{token}\r\n".encode()
    text = base64.b64encode(rng.randbytes(max(0, size - len(head)) * 3 // 4 + 3))
    return head + b"".join(text[i:i + 76] + b"\r\n" for i in range(0, len(text), 76))


class Load:
    """Concurrent SMTP sessions on a thread of their own, until ``stop()``."""

    def __init__(self, port: int, connections: int, prefix: str, seed: int) -> None:
        self.port = port
        self.connections = connections
        self.prefix = prefix
        self.seed = seed
        self.sent: dict[str, Sent] = {}
        self.refused: Counter[str] = Counter()  # first reply other than 250/354 per message, by code
        self._loop = asyncio.new_event_loop()
        self._stopping = asyncio.Event()
        self._thread = threading.Thread(target=self._run, name="powerloss-load", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Ask the sessions to end after their message; a dead server ends them too."""
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise RuntimeError("the load did not stop")

    def _run(self) -> None:
        async def sessions() -> None:
            await asyncio.gather(*(self._session(i) for i in range(self.connections)))

        try:
            self._loop.run_until_complete(sessions())
        finally:
            self._loop.close()

    async def _session(self, conn: int) -> None:
        rng = random.Random(f"{self.seed}-{self.prefix}-{conn}")
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, self.port), REPLY_TIMEOUT)
        except (OSError, asyncio.TimeoutError):
            return
        try:
            await self._reply(reader, b"220")
            writer.write(b"EHLO powerloss.test\r\n")
            await self._reply(reader, b"250")
            n = 0
            while not self._stopping.is_set():
                token = f"{self.prefix}-{conn}-{n}"
                n += 1
                rcpts = tuple(rng.sample(RECIPIENTS, 2 if rng.random() < TWO_RECIPIENTS else 1))
                size = int(math.exp(rng.uniform(math.log(SIZES[0]), math.log(SIZES[1]))))
                body = make_body(token, size, rng)
                # PIPELINING (RFC 2920): the envelope and DATA in one write.
                writer.write(b"MAIL FROM:<load@powerloss.test>\r\n"
                             + b"".join(b"RCPT TO:<%s>\r\n" % r.encode() for r in rcpts) + b"DATA\r\n")
                envelope = [await self._reply(reader) for _ in range(len(rcpts) + 2)]
                if [r[:3] for r in envelope] != [b"250"] * (len(rcpts) + 1) + [b"354"]:
                    self.refused[_code(next(r for r in envelope if not r.startswith(b"250")))] += 1
                    writer.write(b"RSET\r\n")
                    await self._reply(reader)
                    continue
                self.sent[token] = sent = Sent(rcpts, hashlib.sha256(body).digest())
                writer.write(body + b".\r\n")
                reply = await self._reply(reader)
                if reply.startswith(b"250 "):
                    sent.acked_at = time.monotonic()
                else:
                    self.refused[_code(reply)] += 1
        except (OSError, EOFError, asyncio.IncompleteReadError, asyncio.TimeoutError):
            pass  # the server was killed under us: that is the point
        finally:
            writer.close()

    @staticmethod
    async def _reply(reader: asyncio.StreamReader, expect: bytes = b"") -> bytes:
        """One whole reply (the last line of a multiline one)."""
        while True:
            line = await asyncio.wait_for(reader.readuntil(b"\r\n"), REPLY_TIMEOUT)
            if line[3:4] != b"-":
                break
        if expect and not line.startswith(expect):
            raise EOFError(f"expected {expect!r}, got {line!r}")
        return line


def _code(reply: bytes) -> str:
    """The reply code and enhanced code of a reply line, e.g. "452 4.3.1"."""
    return " ".join(reply.decode("ascii", "replace").split()[:2])


# -- the server ----------------------------------------------------------------------


class Server:
    """``fastsmtp serve`` in a process group of its own, output to a log file."""

    def __init__(self, root: Path, log: Path, mode: str, workers: int) -> None:
        cmd = benchlib.fastsmtp_command(
            root, "--hostname", "mx.powerloss.test", "--max-connections-per-ip", "0",
            "--workers", str(workers), "--fsync", mode, "--log-level", "warning")
        self.log = log
        with open(log, "ab") as out:
            # A new session: its workers are in its process group, and the
            # terminal's Ctrl-C reaches this script only, which cleans up.
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
        self.port = 0

    def wait_listening(self) -> int:
        self.port = benchlib.wait_listening(self.proc, self.log, "fastsmtp", timeout=START_TIMEOUT)
        return self.port

    def kill(self) -> None:
        """SIGKILL the whole process group, and wait until none of it is left."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(10)
        self._wait_group_gone()

    def terminate(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, as an operator stops it; SIGKILL after ``timeout``."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        code = self.proc.poll()
        self.kill()
        return code

    def _wait_group_gone(self, timeout: float = 10.0) -> None:
        # Until /proc forgets them: a worker still exiting keeps its files
        # open and the file system busy.
        deadline = time.monotonic() + timeout
        while _group_members(self.proc.pid) and time.monotonic() < deadline:
            time.sleep(0.02)


def _group_members(pgid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            # Fields after the command name, which may hold spaces: state, ppid, pgrp.
            if int(stat.rsplit(")", 1)[1].split()[2]) == pgid:
                found.append(int(entry))
    return found


# -- one moment ----------------------------------------------------------------------


@dataclass
class Moment:
    index: int
    workers: int
    delay: float  # seconds of load before T0
    snapshot_ms: float = 0.0
    sent: int = 0
    acked: int = 0  # 250 read before T0: must survive
    lost: int = 0
    dup: int = 0
    partial: int = 0
    unacked: int = 0  # delivered, no 250 read before T0
    acked_after: int = 0  # 250 read after T0 (not required)
    refused: dict[str, int] = field(default_factory=dict)
    tmp_left: int = 0  # files left in tmp/ after the restart (informational)
    missing_before: int = 0  # acked, not (byte-exact) in new/ on the clone before the restart
    partial_before: int = 0  # partial files in new/ on the clone before the restart
    fsck: int = 0
    restart_exit: int | None = None
    errors: list[str] = field(default_factory=list)
    examples: list[str] = field(default_factory=list)  # the first lost and partial ones, for the reader
    log_tail: list[str] = field(default_factory=list)  # the restarted server's last words, when it went wrong

    def line(self) -> str:
        refused = ",".join(f"{v}x{k!r}" for k, v in sorted(self.refused.items())) or "-"
        text = (f"moment {self.index:2d}  workers={self.workers} cut at {self.delay:4.2f}s "
                f"(clone {self.snapshot_ms:5.1f} ms)  sent={self.sent:5d} acked={self.acked:5d} "
                f"lost={self.lost} dup={self.dup} partial={self.partial} unacked={self.unacked} "
                f"refused={refused} fsck={self.fsck} tmp_left={self.tmp_left}  "
                f"before recovery: missing={self.missing_before} partial={self.partial_before}")
        if self.errors:
            text += "  ERRORS: " + "; ".join(self.errors)
        if self.examples:
            text += "\n    e.g. " + "\n    e.g. ".join(self.examples)
        if self.log_tail:
            text += "\n    log: " + "\n    log: ".join(self.log_tail)
        return text


def mailbox(root: Path, address: str) -> Path:
    user, domain = address.split("@")
    return root / domain / user


def make_mailboxes(root: Path) -> None:
    for address in RECIPIENTS:
        for sub in ("tmp", "new", "cur"):
            (mailbox(root, address) / sub).mkdir(parents=True, exist_ok=True)


def content_of(data: bytes) -> bytes | None:
    """The message as it was sent: the file without the prepended trace headers, or None."""
    # Return-Path, then Received over one line and its continuation lines
    # (tests/helpers.py body_of; tolerant here, a cut file is counted, not raised).
    lines = data.split(b"\r\n")
    if len(lines) < 3 or not lines[0].startswith(b"Return-Path: <") or not lines[1].startswith(b"Received: "):
        return None
    i = 2
    while i < len(lines) and lines[i].startswith(b"\t"):
        i += 1
    return b"\r\n".join(lines[i:])


def token_of(content: bytes) -> str:
    head = content.split(b"\r\n", 1)[0]
    if head.startswith(b"Message-ID: <") and b"@" in head:
        return head[len(b"Message-ID: <"):].split(b"@", 1)[0].decode("ascii", "replace")
    return ""


def check(root: Path, sent: dict[str, Sent], t0: float, moment: Moment) -> None:
    """Compare the mailboxes with what was sent; fill in the counts of ``moment``."""
    copies: Counter[tuple[str, str]] = Counter()  # (address, token) -> byte-exact files
    for address in RECIPIENTS:
        for path in sorted((mailbox(root, address) / "new").iterdir()):
            content = content_of(path.read_bytes())
            token = token_of(content) if content is not None else ""
            s = sent.get(token)
            if s is None or address not in s.rcpts or hashlib.sha256(content or b"").digest() != s.digest:
                moment.partial += 1
                if moment.partial <= EXAMPLES:
                    moment.examples.append(f"partial {address} {path.name} ({path.stat().st_size} octets, {token!r})")
            else:
                copies[address, token] += 1
        moment.tmp_left += len(list((mailbox(root, address) / "tmp").iterdir()))
    moment.dup = sum(1 for n in copies.values() if n > 1)
    for token, s in sent.items():
        if s.acked_at is not None and s.acked_at < t0:
            moment.acked += 1
            missing = [a for a in s.rcpts if copies[a, token] == 0]
            if missing:
                moment.lost += 1
                if moment.lost <= EXAMPLES:
                    moment.examples.append(f"lost {token} for {','.join(missing)}")
        else:
            moment.acked_after += s.acked_at is not None
            moment.unacked += any(copies[a, token] for a in s.rcpts)


def run_moment(work: Path, outer: Path, moment: Moment, args: argparse.Namespace) -> None:
    inner_img, clone_img = outer / "inner.img", outer / f"clone-{moment.index}.img"
    # The disk comes back where it was: the clone is mounted on the same
    # point (the journal may name the Maildirs by their absolute paths).
    mnt = work / "mail-fs"
    try:
        loopfs.make_image(inner_img, INNER_SIZE, "ext4")
        with loopfs.mounted(inner_img, mnt):
            root = mnt / "mail"
            make_mailboxes(root)
            os.sync()  # the mailboxes are on the device before the server starts
            server = Server(root, work / f"server-{moment.index}.log", args.fsync, moment.workers)
            load = None
            try:
                load = Load(server.wait_listening(), args.connections, f"m{moment.index}", args.seed)
                load.start()
                time.sleep(moment.delay)
                t0 = time.monotonic()  # before the clone starts: a 250 read before this preceded it
                loopfs.sh("cp", "--reflink=always", str(inner_img), str(clone_img))
                moment.snapshot_ms = (time.monotonic() - t0) * 1000
                time.sleep(0.1)  # the load goes on through and after the clone
            finally:
                server.kill()
                if load is not None:
                    load.stop()
        inner_img.unlink()
        sent = load.sent
        moment.sent = len(sent)
        moment.refused = dict(load.refused)

        # The power comes back: the clone is the disk.
        moment.fsck = loopfs.sh("e2fsck", "-fy", str(clone_img), ok=range(256)).returncode
        if moment.fsck not in (0, 1):
            moment.errors.append(f"e2fsck exit {moment.fsck}")
        with loopfs.mounted(clone_img, mnt):
            # What the disk held before recovery: shows what recovery had to do.
            before = Moment(moment.index, moment.workers, moment.delay)
            check(root, sent, t0, before)
            moment.missing_before, moment.partial_before = before.lost, before.partial
            restart_log = work / f"server-{moment.index}-restart.log"
            server = Server(root, restart_log, args.fsync, moment.workers)
            try:
                server.wait_listening()  # recovery has run before the port opens
            except RuntimeError as exc:
                moment.errors.append("no restart after the cut: " + str(exc).splitlines()[-1])
            finally:
                moment.restart_exit = server.terminate()
            if moment.restart_exit not in (0, None) and not moment.errors:
                moment.errors.append(f"restarted server exited {moment.restart_exit}")
            check(root, sent, t0, moment)
        if moment.lost or moment.dup or moment.partial or moment.errors:
            # What the recovery said about it, for the reader.
            moment.log_tail = restart_log.read_text(errors="replace").splitlines()[-EXAMPLES:]
    finally:
        for image in (inner_img, clone_img):
            if image.exists():
                image.unlink()


# -- the run -------------------------------------------------------------------------


def summarize(moments: list[Moment]) -> dict[str, int]:
    keys = ("sent", "acked", "lost", "dup", "partial", "unacked", "acked_after", "missing_before", "partial_before")
    return {k: sum(getattr(m, k) for m in moments) for k in keys} | {
        "moments": len(moments), "errors": sum(len(m.errors) for m in moments)}


def verdict(totals: dict[str, int], mode: str) -> tuple[int, str]:
    bad = totals["lost"] + totals["dup"] + totals["partial"]
    if totals["errors"] or totals["acked"] == 0:
        return 2, "INCONCLUSIVE: " + ("harness errors (see above)" if totals["errors"] else "nothing was acknowledged")
    if bad:
        text = (f"UNSAFE: {totals['lost']} of {totals['acked']} acknowledged lost, {totals['dup']} duplicated, "
                f"{totals['partial']} partial")
        if mode == "off":
            text += " (expected of --fsync off: the method catches losses)"
        return 1, text
    text = f"SAFE: 0 of {totals['acked']} acknowledged lost, 0 duplicated, 0 partial"
    if mode == "off":
        text += " (--fsync off lost nothing: this run shows nothing about the method; cut later, load harder)"
    return 0, text


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM unwinds like Ctrl-C: every finally runs, every mount and device is undone."""
    # Once: a second signal (timeout(1) sends two) must not cut the cleanup short.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--moments", type=int, default=20, help="power cuts (default 20)")
    parser.add_argument("--fsync", choices=("batch", "always", "off"), default="batch")
    parser.add_argument("--workers", default="1", help="worker counts, taken in turn per moment: 1 or 1,2")
    parser.add_argument("--connections", type=int, default=8, help="concurrent sessions of the load")
    parser.add_argument("--min-delay", type=float, default=0.3, help="earliest cut, seconds after load start")
    parser.add_argument("--max-delay", type=float, default=3.0, help="latest cut")
    parser.add_argument("--seed", type=int, default=None, help="for the moments and the messages")
    parser.add_argument("--scratch", default=None, help="folder for the outer image (default: the temp dir)")
    parser.add_argument("--json", default=None, help="also write the moments and totals here")
    args = parser.parse_args(argv)
    if args.seed is None:
        args.seed = random.randrange(1 << 30)
    workers = [int(w) for w in args.workers.split(",")]
    reason = loopfs.unusable(args.scratch)
    if reason:
        print(f"powerloss: {reason}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    rng = random.Random(args.seed)
    print(f"powerloss: --fsync {args.fsync}, {args.moments} moments, workers {args.workers}, "
          f"{args.connections} sessions, cut at {args.min_delay}-{args.max_delay} s, seed {args.seed}", flush=True)
    started = time.monotonic()
    moments: list[Moment] = []
    work = Path(tempfile.mkdtemp(prefix="powerloss-", dir=args.scratch))
    try:
        outer_img, outer_mnt = work / "outer.img", work / "outer"
        loopfs.make_image(outer_img, OUTER_SIZE, "xfs")
        with loopfs.mounted(outer_img, outer_mnt):
            for i in range(args.moments):
                moment = Moment(i, workers[i % len(workers)], rng.uniform(args.min_delay, args.max_delay))
                run_moment(work, outer_mnt, moment, args)
                moments.append(moment)
                print(moment.line(), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    totals = summarize(moments)
    code, text = verdict(totals, args.fsync)
    wall = time.monotonic() - started
    print(f"total: {totals['moments']} moments in {wall:.0f} s: sent={totals['sent']} acked={totals['acked']} "
          f"lost={totals['lost']} dup={totals['dup']} partial={totals['partial']} unacked={totals['unacked']}; "
          f"before recovery: missing={totals['missing_before']} partial={totals['partial_before']}")
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "fsync": args.fsync, "seed": args.seed, "wall_s": round(wall, 1), "exit": code,
            "totals": totals, "moments": [asdict(m) for m in moments]}, indent=1))
    return code


if __name__ == "__main__":
    sys.exit(main())
