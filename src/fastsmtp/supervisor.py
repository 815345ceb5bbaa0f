"""The pre-fork supervisor: N workers on SO_REUSEPORT sockets, kept alive and replaced.

Rules of this module:
- Signal handlers only enqueue (gunicorn's ``Arbiter.signal``: "NO LOGGING,
  just queue the signal"); ``set_wakeup_fd`` wakes the main loop, which
  dispatches to ``handle_<name>``, reaps, kills the hung and brings the
  workers to the wanted number.  Nothing else runs in a handler.
- Signals: SIGTERM/SIGINT stop gracefully (workers get SIGTERM), a second
  SIGINT or a SIGQUIT stops now (SIGQUIT), SIGHUP re-reads the
  configuration and replaces the workers one seat at a time, SIGTTIN and
  SIGTTOU add and remove a worker.  A worker that is replaced gets SIGUSR1
  and drains: its sessions end by themselves while its successor accepts.
  SIGUSR2 reopens the log file, here and (forwarded) in every worker.
- The listening sockets belong to the supervisor: one SO_REUSEPORT socket
  per worker *seat*, bound here before any fork (as root, when port 25
  needs it), so the kernel spreads connections over the seats.  A worker
  inherits its seat's socket and closes the others.  A seat's socket
  outlives its worker: connections queued on it while a worker restarts,
  or while a new worker takes over the seat (SIGHUP), wait for the next
  accept instead of being reset, as Linux resets the queue of a closed
  listener (unless net.ipv4.tcp_migrate_req is set).
- Each live process has a *slot*: its row of the shared per-client counts
  (anvil.py) and its heartbeat cell.  A slot is zeroed when its process is
  reaped and before it is used again, so a crash leaks no counts.
- Liveness as in gunicorn (``WorkerTmp.notify`` from the worker's loop,
  checked by the arbiter), through shared memory instead of a file's
  ctime: the worker's event loop stores the time in its cell, the
  supervisor SIGKILLs a worker whose cell is older than ``worker_timeout``.
- A worker that exits with WORKER_BOOT_ERROR stops the supervisor with its
  one-line reason (gunicorn halts the same way); any other death is
  replaced at once, with exponential backoff while replacements keep dying
  right after they start.
- Only processes forked here are signalled, and only by their PID.
"""

from __future__ import annotations

import heapq
import logging
import math
import mmap
import os
import queue
import select
import signal
import socket
import struct
import sys
import time
import traceback
from dataclasses import dataclass, replace
from typing import Any, Callable

from .anvil import Anvil
from .config import Config, ConfigError
from .maildir import clean_tmp
from .logs import reopen_logs
from .metrics import WORKER_RESTARTS, Metrics, MetricsHTTP
from .worker import (
    WORKER_BOOT_ERROR,
    bind_listeners,
    bind_metrics,
    install_loop,
    run_supervised,
    set_log_role,
    set_process_title,
    show_address,
)

__all__ = ["Supervisor", "backoff"]

log = logging.getLogger("fastsmtp")

#: A worker that dies this soon after it started counts as a failed start.
QUICK_DEATH = 5.0
#: The longest wait between restarts of a worker that keeps dying.
MAX_BACKOFF = 10.0
#: After its graceful budget (or at once, for a quick stop) a worker gets
#: this long more before SIGKILL.
KILL_GRACE = 5.0


_STOP_RANK: dict[int, int] = {signal.SIGUSR1: 1, signal.SIGTERM: 2, signal.SIGQUIT: 3}
_STOP_WORDS: dict[int, str] = {signal.SIGUSR1: "retiring", signal.SIGTERM: "stopping", signal.SIGQUIT: "stopping now"}


def backoff(quick_deaths: int) -> float:
    """Seconds to wait before the next start after ``quick_deaths`` failed starts in a row.

    The first replacement starts at once; then 0.1 s, doubling, capped.
    """
    if quick_deaths <= 1:
        return 0.0
    return min(MAX_BACKOFF, 0.1 * 2.0 ** (quick_deaths - 2))


class Scoreboard:
    """One heartbeat cell per slot in shared memory (Apache httpd calls its own a scoreboard).

    The worker stores ``time.monotonic()``; on Linux CLOCK_MONOTONIC is the
    same clock in every process, so the supervisor can compare.
    """

    _CELL = struct.Struct("=d")

    def __init__(self, slots: int) -> None:
        self._mm = mmap.mmap(-1, self._CELL.size * slots)

    def beat(self, slot: int) -> None:
        self._CELL.pack_into(self._mm, slot * self._CELL.size, time.monotonic())

    def last(self, slot: int) -> float:
        return float(self._CELL.unpack_from(self._mm, slot * self._CELL.size)[0])


@dataclass(slots=True)
class Seat:
    sock: socket.socket
    tls_sock: socket.socket | None

    def close(self) -> None:
        self.sock.close()
        if self.tls_sock is not None:
            self.tls_sock.close()


@dataclass(eq=False, slots=True)
class Worker:
    pid: int
    seat: int
    slot: int
    generation: int
    started: float
    ready: bool = False
    #: Told to go (SIGUSR1, SIGTERM or SIGQUIT); SIGKILL at ``kill_at``.
    retiring: bool = False
    stop_signal: int = 0
    kill_at: float = math.inf
    #: SIGKILLed here (hung, or past its stop deadline).
    killed: bool = False
    boot_error: str = ""

    @property
    def name(self) -> str:
        return f"worker {self.seat + 1} (pid {self.pid})"


class Supervisor:
    """Run ``config.workers`` workers until told to stop; ``run()`` returns the exit status."""

    SIGNALS = {
        signal.SIGHUP: "hup",
        signal.SIGINT: "int",
        signal.SIGQUIT: "quit",
        signal.SIGTERM: "term",
        signal.SIGTTIN: "ttin",
        signal.SIGTTOU: "ttou",
        signal.SIGCHLD: "chld",
        signal.SIGUSR2: "usr2",
    }

    def __init__(self, config: Config, reload: Callable[[], Config] | None = None) -> None:
        self.config = config
        self.target = max(1, config.workers)
        # Workers of an older generation than this are replaced; numbers
        # are never reused, even when a failed reload goes back.
        self.generation = 0
        self._generations = 0
        self._reload = reload
        self._pid = os.getpid()
        # The configuration that last had every seat served, to go back to
        # when a reload's workers cannot start.
        self._good: tuple[int, Config, int] | None = None
        self._workers: dict[int, Worker] = {}
        self._seats: list[Seat] = []
        self._ports: tuple[int, int | None] = (config.port, None)
        self._sigq: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._stopping = False
        self._exit_code = 0
        self._announced = False
        self._quick_deaths = 0
        self._spawn_after = 0.0
        self._clean_next = False
        self._notes = b""
        # Room for every seat twice over (a reload runs old and new side by
        # side) and for SIGTTIN; unused slots cost address space only.
        slots = max(64, 4 * self.target)
        self._free_slots = list(range(slots))
        self._anvil = Anvil(slots, 2 * config.max_connections)
        self._board = Scoreboard(slots)
        self._metrics = Metrics(slots)
        self._metrics_http: MetricsHTTP | None = None
        self._wake_r = self._wake_w = self._note_r = self._note_w = -1

    # -- the main loop -----------------------------------------------------------

    def run(self) -> int:
        self._seats = [self._bind_seat()]
        self._seats += [self._bind_seat() for _ in range(self.target - 1)]
        if self.config.metrics:
            # Served here, from the main loop: the sums of every worker's row.
            self._metrics_http = MetricsHTTP(bind_metrics(self.config), self._metrics.render)
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._note_r, self._note_w = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(self._note_r, False)
        for sig in self.SIGNALS:
            signal.signal(sig, self._on_signal)
        signal.set_wakeup_fd(self._wake_w)
        set_process_title(f"fastsmtp: supervisor {self._address()} (mail root {self.config.mail_root})")
        self._loop_name = install_loop(self.config.loop)
        try:
            # Once, before any worker runs: the first workers then start
            # listening at once (a replacement cleans in the background).
            removed = clean_tmp(self.config.mail_root, hostname=self.config.hostname)
            if removed:
                log.info("removed %d stale file(s) from tmp/ folders", removed)
            while True:
                if not self._stopping:
                    self._manage()
                self._wait()
                self._read_notes()
                self._dispatch_signals()
                self._reap()
                if self._stopping and not self._workers:
                    break
                self._kill_overdue()
                if not self._stopping:
                    self._kill_hung()
        finally:
            signal.set_wakeup_fd(-1)
            for sig in self.SIGNALS:
                signal.signal(sig, signal.SIG_DFL)
            for seat in self._seats:
                seat.close()
            if self._metrics_http is not None:
                self._metrics_http.close()
            for fd in (self._wake_r, self._wake_w, self._note_r, self._note_w):
                os.close(fd)
        if self._exit_code == 0:
            log.info("stopped")
        return self._exit_code

    def _on_signal(self, sig: int, frame: object) -> None:
        self._sigq.put_nowait(sig)

    def _wait(self) -> None:
        timeout = min(1.0, self.config.worker_timeout / 4)
        backing_off = self._spawn_after - time.monotonic()
        if backing_off > 0:
            timeout = min(timeout, backing_off)  # wake when the next start is due
        rlist: list[Any] = [self._wake_r, self._note_r]  # fds and sockets: select takes both
        wlist: list[Any] = []
        http = self._metrics_http
        if http is not None:
            reading, writing = http.fds()
            rlist += reading
            wlist += writing
        readable: list[Any] = []
        writable: list[Any] = []
        try:
            readable, writable, _ = select.select(rlist, wlist, [], timeout)
        except InterruptedError:
            pass
        if http is not None:
            http.handle(readable, writable)
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def _dispatch_signals(self) -> None:
        while True:
            try:
                sig = self._sigq.get_nowait()
            except queue.Empty:
                return
            getattr(self, f"handle_{self.SIGNALS[signal.Signals(sig)]}")()

    # -- signal handlers (called from the main loop, never from a signal) --------

    def handle_chld(self) -> None:
        pass  # the loop reaps on every turn

    def handle_term(self) -> None:
        self._stop(graceful=True)

    def handle_int(self) -> None:
        # A second Ctrl-C while stopping gracefully: stop now.
        self._stop(graceful=not self._stopping)

    def handle_quit(self) -> None:
        self._stop(graceful=False)

    def handle_usr2(self) -> None:
        """Reopen the log file here and in every worker (after logrotate moved it)."""
        reopen_logs()
        for w in list(self._workers.values()):
            self._signal(w, signal.SIGUSR2)

    def handle_ttin(self) -> None:
        if self._stopping:
            return
        self.target += 1
        log.info("SIGTTIN: %d worker(s)", self.target)

    def handle_ttou(self) -> None:
        if self._stopping or self.target <= 1:
            return
        self.target -= 1
        log.info("SIGTTOU: %d worker(s)", self.target)

    def handle_hup(self) -> None:
        """Re-read the configuration and replace the workers one by one."""
        if self._stopping:
            return
        new = self.config
        if self._reload is not None:
            try:
                new = self._reload()
            except (ConfigError, ValueError, OSError) as exc:
                log.error("SIGHUP: reload failed, keeping the running configuration: %s", exc)
                return
        if new.workers == 0:
            log.error("SIGHUP: --workers 0 needs a restart; keeping %d workers", self.target)
            new = replace(new, workers=self.target)
        old = self.config
        if (new.host, new.port, new.tls_listen) != (old.host, old.port, old.tls_listen):
            log.warning("SIGHUP: a new --listen/--tls-listen takes a restart; still listening on %s", self._address())
            new = replace(new, host=old.host, port=old.port, tls_listen=old.tls_listen)
        if new.metrics != old.metrics:
            log.warning("SIGHUP: a new --metrics takes a restart; metrics stay on %s", old.metrics or "(off)")
            new = replace(new, metrics=old.metrics)
        self.config = new
        self.target = new.workers
        self._generations += 1
        self.generation = self._generations
        log.info("SIGHUP: configuration reloaded; replacing the workers one by one")

    # -- workers -------------------------------------------------------------------

    def _manage(self) -> None:
        """Bring seats and workers to what ``target`` and ``generation`` ask for."""
        while len(self._seats) < self.target:
            try:
                self._seats.append(self._bind_seat())
            except ConfigError as exc:
                log.error("cannot add a worker: %s", exc)
                self.target = len(self._seats)
        while len(self._seats) > self.target:
            index = len(self._seats) - 1
            for w in self._live():
                if w.seat == index:
                    self._retire(w)
            # The worker keeps its own copy until it closes its listener.
            self._seats.pop().close()
        live = self._live()
        booting = any(not w.ready for w in live)
        now = time.monotonic()
        for index in range(len(self._seats)):
            here = [w for w in live if w.seat == index]
            fresh = [w for w in here if w.generation == self.generation]
            if not fresh:
                # An empty seat is filled at once (after any backoff); a
                # seat with an old worker waits its turn, one at a time.
                if here and booting:
                    continue
                if now < self._spawn_after:
                    continue
                if self._spawn(index):
                    booting = True
            elif any(w.ready for w in fresh):
                for w in here:
                    if w.generation != self.generation:
                        self._retire(w)  # its successor is listening
        self._check_ready()

    def _live(self) -> list[Worker]:
        return [w for w in self._workers.values() if not w.retiring]

    def _check_ready(self) -> None:
        live = self._live()
        served = {w.seat for w in live if w.ready and w.generation == self.generation}
        if len(served) < len(self._seats):
            return
        if not self._announced:
            self._announced = True
            n = len(self._seats)
            print(
                f"fastsmtp listening on {self._address()} ({n} worker{'s' if n != 1 else ''}, "
                f"{self._loop_name}), delivering into {self.config.mail_root}/<domain>/<user>/new/",
                flush=True,
            )
            if self.config.fsync == "off":
                print("WARNING: --fsync off: acknowledged mail can be lost on a crash", file=sys.stderr, flush=True)
        if all(w.generation == self.generation for w in live) and (
            self._good is None or self._good[0] != self.generation
        ):
            if self._good is not None:
                log.info("reload complete: %d workers on the new configuration", len(self._seats))
            self._good = (self.generation, self.config, self.target)

    def _spawn(self, index: int) -> bool:
        if not self._free_slots:
            # Every slot is held (SIGTTIN far beyond the start-up count):
            # give up the newest seat rather than retry forever.
            log.error("no free worker slot (%d processes at most); restart with more --workers", self._anvil.slots)
            if index == len(self._seats) - 1 and not any(w.seat == index for w in self._live()):
                self.target = max(1, index)
            return False
        slot = heapq.heappop(self._free_slots)
        config = self.config
        seat = self._seats[index]
        clean = "background" if self._clean_next else "skip"
        self._clean_next = False
        self._anvil.activate(slot)
        self._board.beat(slot)  # the start-up counts against worker_timeout
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = self._child(index, slot, seat, config, clean)
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        self._workers[pid] = Worker(pid, index, slot, self.generation, time.monotonic())
        log.debug("started worker %d (pid %d) in slot %d", index + 1, pid, slot)
        return True

    def _child(self, index: int, slot: int, seat: Seat, config: Config, clean: str) -> int:
        """In the forked worker: shed the supervisor's state, then serve."""
        signal.set_wakeup_fd(-1)
        for sig in self.SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        # Reloading and resizing are the supervisor's business; a terminal
        # hangup must not kill a worker in the middle of a transaction.
        for sig in (signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU):
            signal.signal(sig, signal.SIG_IGN)
        # A log reopen forwarded before the worker's loop handles SIGUSR2
        # must not kill it (the default action).  serve() installs the
        # handler; a reopen lost in between leaves this worker on the old
        # file until the next SIGUSR2.
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)
        # Only this seat's sockets stay open here: a seat the supervisor
        # closes later must not linger, unaccepted, in another worker.
        for other in self._seats:
            if other is not seat:
                other.close()
        for fd in (self._wake_r, self._wake_w, self._note_r):
            os.close(fd)
        if self._metrics_http is not None:
            self._metrics_http.close()
        role = f"worker {index + 1}"
        set_process_title(f"fastsmtp: {role} {self._address()}")
        set_log_role(role)
        note_w = self._note_w

        def notify(text: str) -> None:
            # One write under PIPE_BUF is atomic: notes never interleave.
            os.write(note_w, f"{os.getpid()} {text}".replace("\n", " ").encode()[:4000] + b"\n")

        board = self._board
        return run_supervised(
            config,
            seat.sock,
            seat.tls_sock,
            ppid=self._pid,
            clients=self._anvil.row(slot),
            heartbeat=lambda: board.beat(slot),
            notify=notify,
            clean=clean,
            metrics=self._metrics.row(slot) if config.metrics else None,  # off: not even counted
        )

    def _retire(self, w: Worker, sig: int = signal.SIGUSR1) -> None:
        """Tell a worker to go: SIGUSR1 drains, SIGTERM stops gracefully, SIGQUIT now.

        A worker is only ever moved to a harder signal, and each has its
        deadline, after which it is killed.
        """
        if _STOP_RANK[sig] <= _STOP_RANK.get(w.stop_signal, 0):
            return
        timeout = self.config.shutdown_timeout
        budget: float = {signal.SIGUSR1: 2 * timeout, signal.SIGTERM: timeout}.get(signal.Signals(sig), 0.0)
        w.kill_at = min(w.kill_at, time.monotonic() + budget + KILL_GRACE)
        w.retiring = True
        w.stop_signal = sig
        log.info("%s %s", _STOP_WORDS[sig], w.name)
        self._signal(w, sig)

    def _signal(self, w: Worker, sig: int) -> None:
        try:
            os.kill(w.pid, sig)  # our own child, not yet reaped: the PID is still its own
        except ProcessLookupError:
            pass

    def _read_notes(self) -> None:
        try:
            while chunk := os.read(self._note_r, 65536):
                self._notes += chunk
        except BlockingIOError:
            pass
        *lines, self._notes = self._notes.split(b"\n")
        for line in lines:
            pid_text, _, text = line.decode("utf-8", "replace").partition(" ")
            w = self._workers.get(int(pid_text))
            if w is None:
                continue
            kind, _, detail = text.partition(" ")
            if kind == "READY":
                w.ready = True
            elif kind == "BOOTERR":
                w.boot_error = detail

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            w = self._workers.pop(pid, None)
            if w is None:
                continue
            # Forget the dead process's client counts before anyone reuses the
            # slot; keep its metrics (counters never go backwards).
            self._anvil.clear(w.slot)
            self._metrics.retire(w.slot)
            heapq.heappush(self._free_slots, w.slot)
            self._exited(w, os.waitstatus_to_exitcode(status))

    def _exited(self, w: Worker, code: int) -> None:
        if code == WORKER_BOOT_ERROR and not w.ready:
            self._read_notes()
            self._boot_failed(w)
            return
        if w.retiring or self._stopping:
            log.info("%s exited", w.name)
            return
        if w.killed:
            why = f"was killed: no heartbeat for {self.config.worker_timeout:g} s"
        elif code < 0:
            why = f"was killed by {signal.Signals(-code).name}"
            if code == -signal.SIGKILL:
                why += " (perhaps out of memory?)"
        else:
            why = f"exited with status {code}"
        now = time.monotonic()
        self._quick_deaths = self._quick_deaths + 1 if now - w.started < QUICK_DEATH else 1
        delay = backoff(self._quick_deaths)
        self._spawn_after = now + delay
        self._clean_next = True  # it may have left files in tmp/
        self._metrics.base[WORKER_RESTARTS] += 1
        log.warning("%s %s; starting another%s", w.name, why, f" in {delay:.1f} s" if delay else "")

    def _boot_failed(self, w: Worker) -> None:
        reason = w.boot_error or "it exited before it was ready"
        if self._good is not None and w.generation != self._good[0]:
            generation, config, target = self._good
            log.error("SIGHUP: the new workers cannot start (%s); going back to the previous configuration", reason)
            self.generation, self.config, self.target = generation, config, target
            return
        # Starting again would fail again: stop, as gunicorn halts on
        # WORKER_BOOT_ERROR, with the worker's reason as the one message.
        if self._exit_code == 0:
            print(f"fastsmtp: error: {reason}", file=sys.stderr, flush=True)
            self._exit_code = WORKER_BOOT_ERROR
        self._stop(graceful=True)

    def _kill_hung(self) -> None:
        now = time.monotonic()
        timeout = self.config.worker_timeout
        for w in self._live():
            if w.killed or now - self._board.last(w.slot) <= timeout:
                continue
            # Read once more: a torn read of the cell must not kill a worker.
            if now - self._board.last(w.slot) <= timeout:
                continue
            log.error("%s sent no heartbeat for %g s; killing it", w.name, timeout)
            w.killed = True
            self._signal(w, signal.SIGKILL)

    def _kill_overdue(self) -> None:
        now = time.monotonic()
        for w in self._workers.values():
            if w.retiring and not w.killed and now >= w.kill_at:
                log.warning("%s did not stop in time; killing it", w.name)
                w.killed = True
                self._signal(w, signal.SIGKILL)

    def _stop(self, graceful: bool) -> None:
        if self._stopping and graceful:
            return
        if not self._stopping:
            self._stopping = True
            # New connections are refused from now on (other MXs take them);
            # the workers still finish the sessions they have.
            for seat in self._seats:
                seat.close()
            self._seats = []
            log.info("stopping %s", "gracefully" if graceful else "now")
        else:
            log.info("stopping now")
        sig = signal.SIGTERM if graceful else signal.SIGQUIT
        for w in list(self._workers.values()):
            self._retire(w, sig)

    # -- sockets -------------------------------------------------------------------

    def _bind_seat(self) -> Seat:
        """One more SO_REUSEPORT socket (and TLS socket) on the supervisor's address.

        For port 0 the first socket picks the port and every later one
        binds that same port, so all workers share it.
        """
        port, tls_port = self._ports
        sock, tls_sock = bind_listeners(self.config, port, tls_port)
        self._ports = (sock.getsockname()[1], tls_sock.getsockname()[1] if tls_sock is not None else None)
        return Seat(sock, tls_sock)

    def _address(self) -> str:
        return show_address(self.config.host, self._ports[0])
