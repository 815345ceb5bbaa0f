"""Helpers shared by the end-to-end benchmarks (bench_fsync_modes.py, bench_workers.py, compare.py).

bench/ is not a package: the scripts run as ``python bench/X.py``, so Python
puts bench/ on sys.path and they ``import benchlib`` directly.

What is here, and why it exists:

- /proc CPU accounting (``process_tree``, ``tree_cpu``, ``thread_cpu``,
  ``cpu_delta``): the server's CPU per message is the number we compare, and
  ``fastsmtp serve`` is a supervisor that forks its worker processes, so the
  CPU of the started PID alone would miss the workers; every reading covers
  the whole process tree.
- ``create_probe``: on this ext4 (no journal) creating files is up to ~20x
  slower for minutes after many deletions (DESIGN.md, "Measuring on these
  machines").  The benchmarks delete nothing while measuring, and record
  this probe before and after their runs to show what state they met.
- Server processes (``start_fastsmtp``, ``launch``, ``wait_listening``,
  ``stop_server``, ``free_port``): start on a free loopback port, wait for
  the "listening on HOST:PORT" line and a 220 greeting, stop by PID.
- Reporting (``write_section``, ``git_commit``, ``median``): each benchmark
  owns one "## " section of bench/RESULTS.md and rewrites only that one.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "RESULTS.md"
HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
START_TIMEOUT = 20.0
STOP_TIMEOUT = 20.0

# Flags every benchmark passes to ``fastsmtp serve``.  The server waits
# --greeting-delay (default 0.5 s) before its 220 to catch early talkers;
# left on, every one-message-per-connection run would measure that wait,
# not the server.  tests/conftest.py turns it off for the same reason.
FASTSMTP_BENCH_FLAGS: tuple[str, ...] = ("--greeting-delay", "0")

# "fastsmtp listening on 127.0.0.1:PORT (...)" and "aiosmtpd listening on
# 127.0.0.1:PORT (...)".  The whitespace after the port guards against
# reading a half-written line from the log file.
_LISTENING = re.compile(r"listening on \S+:(\d+)\s")


# -- /proc CPU accounting ------------------------------------------------------------


def _stat_times(path: str) -> tuple[float, float]:
    """(utime, stime) in seconds from a /proc stat file (a process's or one thread's)."""
    with open(path, "rb") as f:
        stat = f.read()
    fields = stat[stat.rindex(b")") + 2 :].split()  # the command name may hold spaces and ")"
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK  # fields 14 and 15 of proc(5)


def children(pid: int) -> list[int]:
    """Direct child processes of ``pid`` (from every thread's /proc children list)."""
    kids: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids += [int(x) for x in f.read().split()]
    except OSError:
        pass  # it ended meanwhile
    return kids


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants: fastsmtp's supervisor and the workers it forks."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children(p)
    return out


def tree_cpu(root: int) -> dict[int, tuple[float, float]]:
    """(utime, stime) of every process of the tree, by PID.

    Read from /proc/PID/stat, so each figure covers all of the process's
    threads, including threads that have already ended.
    """
    out = {}
    for pid in process_tree(root):
        try:
            out[pid] = _stat_times(f"/proc/{pid}/stat")
        except (OSError, ValueError, IndexError):
            pass  # it ended meanwhile
    return out


def cpu_delta(before: dict[int, tuple[float, float]], after: dict[int, tuple[float, float]]) -> tuple[float, float]:
    """(user, system) CPU seconds the process tree used between two ``tree_cpu`` snapshots."""
    user = sum(u - before.get(pid, (0.0, 0.0))[0] for pid, (u, _) in after.items())
    system = sum(s - before.get(pid, (0.0, 0.0))[1] for pid, (_, s) in after.items())
    return user, system


def thread_cpu(root: int) -> dict[tuple[int, int], float]:
    """utime + stime of every live thread of the process tree, by (pid, tid).

    Per thread, from /proc/PID/task/TID/stat, so the CPU can be split by
    thread role (event loop, committer, ...).
    """
    out = {}
    for pid in process_tree(root):
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue  # the process ended meanwhile
        for tid in tids:
            try:
                out[(pid, int(tid))] = sum(_stat_times(f"/proc/{pid}/task/{tid}/stat"))
            except (OSError, ValueError, IndexError):
                pass  # the thread ended meanwhile
    return out


# -- file-system state ---------------------------------------------------------------


def create_probe(folder: Path, count: int = 500) -> float:
    """Milliseconds per 1 KiB file created in a new folder: the state of the file system.

    On this ext4 (no journal) inode allocation skips recently deleted inodes,
    and that search makes every create slow for minutes after many deletions
    (DESIGN.md); this number says whether a run met such a state.
    """
    folder.mkdir(parents=True)
    data = b"x" * 1024
    start = time.perf_counter()
    for i in range(count):
        fd = os.open(folder / str(i), os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600)
        os.write(fd, data)
        os.close(fd)
    return 1000 * (time.perf_counter() - start) / count


# -- server processes ----------------------------------------------------------------


def free_port() -> int:
    """A loopback port free right now (for servers that cannot bind port 0 and report it)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def greeted(port: int) -> bool:
    """True when a 220 greeting comes on ``port`` (then QUIT)."""
    try:
        with socket.create_connection((HOST, port), timeout=2.0) as s:
            data = b""
            while b"\r\n" not in data:
                chunk = s.recv(4096)
                if not chunk:
                    return False
                data += chunk
            if not data.startswith(b"220"):
                return False
            s.sendall(b"QUIT\r\n")
            try:
                s.recv(4096)
            except OSError:
                pass
            return True
    except OSError:
        return False


def launch(cmd: Sequence[str], log: Path, env: dict[str, str] | None = None,
           cwd: Path | None = None) -> subprocess.Popen[bytes]:
    """Start ``cmd`` with stdout and stderr to ``log``.

    A file, not a pipe: nobody reads the output during the run, and a full
    pipe would block the server.
    """
    with open(log, "wb") as out:
        return subprocess.Popen(list(cmd), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, cwd=cwd)


def wait_listening(proc: subprocess.Popen[bytes], log: Path, name: str, port: int | None = None,
                   timeout: float = START_TIMEOUT) -> int:
    """The port once the server answers with a 220 greeting.

    Without ``port`` it is read from the "listening on HOST:PORT" line in
    ``log``.  A server that does not get there in ``timeout`` is stopped and
    RuntimeError raised with the end of its log.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port is None:
            found = _LISTENING.search(log.read_text(errors="replace"))
            if found:
                port = int(found.group(1))
        if port is not None and greeted(port):
            return port
        if proc.poll() is not None:
            break
        time.sleep(0.02)
    stop_server(proc)
    raise RuntimeError(f"{name} did not start:\n{log.read_text(errors='replace')[-2000:]}")


def fastsmtp_command(mail_root: Path, *args: str, launcher: Sequence[str] = ("-m", "fastsmtp")) -> list[str]:
    """``python -m fastsmtp serve`` on port 0 of loopback, with FASTSMTP_BENCH_FLAGS, then ``args``.

    ``launcher`` replaces ``-m fastsmtp`` (e.g. ``-c SCRIPT`` for a wrapper
    that ends by calling ``fastsmtp.cli.main``).
    """
    return [sys.executable, *launcher, "serve", "--listen", f"{HOST}:0", "--mail-root", str(mail_root),
            *FASTSMTP_BENCH_FLAGS, *args]


def start_fastsmtp(mail_root: Path, log: Path, *args: str, launcher: Sequence[str] = ("-m", "fastsmtp"),
                   env: dict[str, str] | None = None,
                   cwd: Path | None = None) -> tuple[subprocess.Popen[bytes], int, list[str]]:
    """Start ``fastsmtp serve`` (see ``fastsmtp_command``); (process, port, command) once it greets."""
    cmd = fastsmtp_command(mail_root, *args, launcher=launcher)
    proc = launch(cmd, log, env=env, cwd=cwd)
    return proc, wait_listening(proc, log, "fastsmtp"), cmd


def stop_server(proc: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT) -> tuple[float, int | None]:
    """SIGTERM by PID, SIGKILL after ``timeout``; (seconds to exit, exit code)."""
    start = time.monotonic()
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return time.monotonic() - start, proc.returncode


# -- reporting -----------------------------------------------------------------------


def median(values: Iterable[float]) -> float:
    """Median ignoring NaN (a run with nothing accepted); NaN when nothing is left."""
    kept = [v for v in values if v == v]
    return statistics.median(kept) if kept else float("nan")


def git_commit() -> str:
    """Short hash of HEAD, or "unknown"."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write_section(path: Path, heading: str, section: str) -> None:
    """Replace the "## " section ``heading`` of ``path`` with ``section`` (or append it).

    Several benchmarks write into the same RESULTS.md, each its own section,
    possibly while another one runs: the file is read right before it is
    written, and everything outside our section stays as it is.
    """
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() == heading), None)
    if start is None:
        path.write_text(text.rstrip("\n") + "\n\n" + section)
        return
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    after = "".join(lines[end:])
    path.write_text("".join(lines[:start]) + section + ("\n" + after if after else ""))
