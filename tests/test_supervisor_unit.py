"""The supervisor's decisions, with fork, waitpid, kill and the clock faked.

As gunicorn tests its arbiter: no process is forked and no signal is sent.
``os.fork`` hands out made-up PIDs (the child branch never runs),
``os.waitpid`` returns the deaths a test scripts, ``os.kill`` records what
would have been sent, the supervisor's clock is a number the test moves, and
``bind_listeners`` returns fake sockets.  The notes a worker would write
(READY, BOOTERR) go through a real pipe, read by the supervisor's own code.
The forking end-to-end tests are in test_supervisor.py.

The tests drive one turn of the main loop at a time (``turn``: what
``Supervisor.run`` does each time ``select`` returns), or one decision
method, and look at the workers the supervisor keeps, the calls it made and
the lines it logged.
"""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

import pytest

from fastsmtp import supervisor as sv
from fastsmtp.anvil import client_key
from fastsmtp.config import Config, ConfigError
from fastsmtp.metrics import WORKER_RESTARTS
from fastsmtp.worker import WORKER_BOOT_ERROR


def exited(code: int) -> int:
    """A wait status for an exit with ``code`` (os.waitstatus_to_exitcode reads it back)."""
    return code << 8


def killed(sig: int) -> int:
    """A wait status for a death by ``sig``."""
    return sig


class FakeSocket:
    def __init__(self, port: int) -> None:
        self.port = port
        self.closed = False

    def getsockname(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def close(self) -> None:
        self.closed = True


@dataclass
class FakeSystem:
    """What the supervisor asks of the kernel, answered by the test."""

    now: float = 1000.0
    next_pid: int = 4000
    forked: list[int] = field(default_factory=list)
    sent: list[tuple[int, int]] = field(default_factory=list)
    deaths: list[tuple[int, int]] = field(default_factory=list)
    sockets: list[FakeSocket] = field(default_factory=list)

    # -- os ----------------------------------------------------------------
    def fork(self) -> int:
        self.next_pid += 1
        self.forked.append(self.next_pid)
        return self.next_pid

    def kill(self, pid: int, sig: int) -> None:
        self.sent.append((pid, sig))

    def waitpid(self, pid: int, options: int) -> tuple[int, int]:
        assert (pid, options) == (-1, os.WNOHANG)  # never blocks, reaps any child
        return self.deaths.pop(0) if self.deaths else (0, 0)

    # -- time (the supervisor's only clock) --------------------------------
    def monotonic(self) -> float:
        return self.now

    def perf_counter(self) -> float:
        return self.now

    # -- worker.bind_listeners ----------------------------------------------
    def bind_listeners(self, config: Config, port: int | None = None, tls_port: int | None = None) -> tuple[FakeSocket, None]:
        sock = FakeSocket(port or 2525)
        self.sockets.append(sock)
        return sock, None

    def signals_to(self, pid: int) -> list[int]:
        return [sig for p, sig in self.sent if p == pid]


@pytest.fixture
def system(monkeypatch: pytest.MonkeyPatch) -> FakeSystem:
    fake = FakeSystem()
    monkeypatch.setattr(sv.os, "fork", fake.fork)
    monkeypatch.setattr(sv.os, "kill", fake.kill)
    monkeypatch.setattr(sv.os, "waitpid", fake.waitpid)
    monkeypatch.setattr(sv, "time", fake)  # the module's clock, the Scoreboard's too
    monkeypatch.setattr(sv, "bind_listeners", fake.bind_listeners)
    return fake


class Harness:
    """A Supervisor set up as ``run()`` sets it up, minus the signals and select()."""

    def __init__(self, system: FakeSystem, config: Config, reload: Callable[[], Config] | None = None) -> None:
        self.system = system
        self.sup = sv.Supervisor(config, reload=reload)
        sup = self.sup
        sup._seats = [sup._bind_seat() for _ in range(sup.target)]
        sup._loop_name = "asyncio"  # set by run() from install_loop()
        sup._note_r, sup._note_w = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(sup._note_r, False)

    def close(self) -> None:
        os.close(self.sup._note_r)
        os.close(self.sup._note_w)

    def turn(self) -> None:
        """One turn of run()'s loop, after select() has returned."""
        sup = self.sup
        if not sup._stopping:
            sup._manage()
        sup._read_notes()
        sup._dispatch_signals()
        sup._reap()
        sup._kill_overdue()
        if not sup._stopping:
            sup._kill_hung()

    def note(self, pid: int, text: str) -> None:
        """What the worker's notify() writes."""
        os.write(self.sup._note_w, f"{pid} {text}\n".encode())

    def ready(self, *pids: int) -> None:
        for pid in pids:
            self.note(pid, "READY")
        self.sup._read_notes()

    def signal(self, sig: int) -> None:
        """A signal arriving: the handler only queues it; the next turn dispatches it."""
        self.sup._on_signal(sig, None)

    def die(self, pid: int, status: int) -> None:
        self.system.deaths.append((pid, status))

    def live(self) -> dict[int, sv.Worker]:
        return {pid: w for pid, w in self.sup._workers.items() if not w.retiring}

    def seat_of(self, pid: int) -> int:
        return self.sup._workers[pid].seat

    def beat_all(self) -> None:
        for w in self.sup._workers.values():
            self.sup._board.beat(w.slot)


@pytest.fixture
def make(system: FakeSystem, tmp_path: Path) -> Iterator[Callable[..., Harness]]:
    made: list[Harness] = []

    def build(reload: Callable[[], Config] | None = None, **settings: object) -> Harness:
        config = Config(mail_root=str(tmp_path), hostname="mx.test.example", **settings)  # type: ignore[arg-type]
        h = Harness(system, config, reload)
        made.append(h)
        return h

    yield build
    for h in made:
        h.close()


def started(make: Callable[..., Harness], workers: int = 2, **settings: object) -> tuple[Harness, list[int]]:
    """A supervisor whose first workers are forked and ready."""
    h = make(workers=workers, **settings)
    h.turn()
    pids = list(h.system.forked)
    h.ready(*pids)
    h.turn()
    return h, pids


# -- starting -------------------------------------------------------------------------


def test_one_worker_per_seat_each_in_its_own_slot(make: Callable[..., Harness], capsys: pytest.CaptureFixture[str]) -> None:
    h = make(workers=3)
    h.turn()
    assert len(h.system.forked) == 3
    workers = h.sup._workers.values()
    assert sorted(w.seat for w in workers) == [0, 1, 2]
    assert len({w.slot for w in workers}) == 3
    h.turn()
    assert len(h.system.forked) == 3  # booting workers are not forked again
    assert "listening on" not in capsys.readouterr().out  # not before every seat is served
    h.ready(*h.system.forked)
    h.turn()
    h.turn()
    assert capsys.readouterr().out.count("fastsmtp listening on 127.0.0.1:2525 (3 workers, asyncio)") == 1
    assert h.system.sent == []


def test_every_seat_binds_the_port_of_the_first(monkeypatch: pytest.MonkeyPatch) -> None:
    # Port 0: the first socket picks the port, the others reuse it (SO_REUSEPORT).
    calls: list[int | None] = []

    def bind(config: Config, port: int | None = None, tls_port: int | None = None) -> tuple[FakeSocket, None]:
        calls.append(port)
        return FakeSocket(port or 40000), None

    monkeypatch.setattr(sv, "bind_listeners", bind)
    sup = sv.Supervisor(Config(port=0, workers=3))
    for _ in range(3):
        sup._bind_seat()
    assert calls == [0, 40000, 40000]


# -- a worker dies --------------------------------------------------------------------


def test_a_dead_worker_is_reaped_and_replaced_in_its_seat(make: Callable[..., Harness], caplog: pytest.LogCaptureFixture) -> None:
    h, (first, second) = started(make)
    dead = h.sup._workers[first]
    key = client_key("192.0.2.1")
    assert key is not None
    h.sup._anvil.row(dead.slot).connect(key)  # a client it was serving
    h.system.now += 60  # long after it started: not a failed start
    h.die(first, exited(1))
    with caplog.at_level(logging.INFO, logger="fastsmtp"):
        h.turn()
    assert first not in h.sup._workers
    assert dead.slot in h.sup._free_slots
    assert h.sup._anvil.count(key) == 0  # its counts are forgotten with it
    assert h.sup._metrics.base[WORKER_RESTARTS] == 1
    assert f"worker {dead.seat + 1} (pid {first}) exited with status 1; starting another" in caplog.text
    h.turn()  # no backoff for the first death: replaced at once
    (replacement,) = h.system.forked[2:]
    assert h.seat_of(replacement) == dead.seat and second in h.sup._workers
    assert h.sup._clean_next is False  # the death asked the next start to clean tmp/; it has


@pytest.mark.parametrize(
    "status, words",
    [
        (killed(signal.SIGKILL), "was killed by SIGKILL (perhaps out of memory?)"),
        (killed(signal.SIGSEGV), "was killed by SIGSEGV; starting another"),
        (exited(0), "exited with status 0; starting another"),
    ],
)
def test_how_a_worker_died_is_logged(
    make: Callable[..., Harness], caplog: pytest.LogCaptureFixture, status: int, words: str
) -> None:
    h, (first, _) = started(make)
    h.system.now += 60
    h.die(first, status)
    with caplog.at_level(logging.INFO, logger="fastsmtp"):
        h.turn()
    assert words in caplog.text


def test_replacements_that_keep_dying_back_off(make: Callable[..., Harness]) -> None:
    h, (pid, _) = started(make)
    delays = []
    for _ in range(5):
        h.system.now += 1  # dies a second after it started: a failed start
        h.die(pid, exited(1))
        h.turn()
        delays.append(round(h.sup._spawn_after - h.system.now, 3))
        forked = len(h.system.forked)
        h.turn()
        if delays[-1] > 0:
            assert len(h.system.forked) == forked, "started again before its backoff ran out"
            h.system.now += delays[-1]
            h.turn()
        assert len(h.system.forked) == forked + 1
        pid = h.system.forked[-1]
    assert delays == [sv.backoff(n) for n in range(1, 6)] == [0.0, 0.1, 0.2, 0.4, 0.8]
    # A worker that ran for a while before it died starts the count afresh.
    h.system.now += sv.QUICK_DEATH + 1
    h.die(pid, exited(1))
    h.turn()
    assert h.sup._quick_deaths == 1 and h.sup._spawn_after == h.system.now


def test_the_backoff_is_capped() -> None:
    assert sv.backoff(100) == sv.MAX_BACKOFF


# -- a worker that cannot boot ---------------------------------------------------------


def test_boot_error_halts_with_exit_code_3_and_the_workers_reason(
    make: Callable[..., Harness], capsys: pytest.CaptureFixture[str]
) -> None:
    h = make(workers=2)
    h.turn()
    first, second = h.system.forked
    h.note(first, "BOOTERR mail root /srv/mail is not writable by user nobody")
    h.die(first, exited(WORKER_BOOT_ERROR))
    h.turn()
    assert h.sup._stopping and h.sup._exit_code == WORKER_BOOT_ERROR == 3
    assert capsys.readouterr().err == "fastsmtp: error: mail root /srv/mail is not writable by user nobody\n"
    assert h.system.signals_to(second) == [signal.SIGTERM]  # the other one is stopped
    assert all(s.closed for s in h.system.sockets)
    h.turn()
    assert h.system.forked == [first, second]  # nothing is started again


def test_exit_code_3_after_ready_is_an_ordinary_death(make: Callable[..., Harness]) -> None:
    h, (first, _) = started(make)
    h.system.now += 60
    h.die(first, exited(WORKER_BOOT_ERROR))
    h.turn()
    assert not h.sup._stopping and h.sup._exit_code == 0
    h.turn()
    assert len(h.system.forked) == 3


def test_a_reload_whose_workers_cannot_boot_goes_back(make: Callable[..., Harness]) -> None:
    configs: list[Config] = []
    h = make(reload=lambda: configs[0], workers=1, max_recipients=5)
    configs.append(replace(h.sup.config, max_recipients=7))
    h.turn()
    (old,) = h.system.forked
    h.ready(old)
    h.turn()
    h.signal(signal.SIGHUP)
    h.turn()  # dispatches the reload
    h.turn()  # forks the new generation
    (new,) = h.system.forked[1:]
    h.note(new, "BOOTERR cannot drop privileges")
    h.die(new, exited(WORKER_BOOT_ERROR))
    h.turn()
    assert not h.sup._stopping and h.sup._exit_code == 0
    assert h.sup.config.max_recipients == 5 and h.sup.generation == 0
    assert list(h.sup._workers) == [old] and h.system.signals_to(old) == []


# -- heartbeats and deadlines -----------------------------------------------------------


def test_a_worker_without_heartbeat_is_killed_and_replaced(
    make: Callable[..., Harness], caplog: pytest.LogCaptureFixture
) -> None:
    h, (hung, alive) = started(make, worker_timeout=2.0)
    h.system.now += 1.5
    h.beat_all()
    h.turn()
    assert h.system.sent == []
    h.system.now += 2.5
    h.sup._board.beat(h.sup._workers[alive].slot)  # only one still beats
    with caplog.at_level(logging.INFO, logger="fastsmtp"):
        h.turn()
        assert h.system.sent == [(hung, signal.SIGKILL)]
        h.turn()
        assert h.system.sent == [(hung, signal.SIGKILL)]  # once
        h.die(hung, killed(signal.SIGKILL))
        h.turn()
    assert "sent no heartbeat for 2 s; killing it" in caplog.text
    assert "was killed: no heartbeat for 2 s; starting another" in caplog.text
    h.turn()
    assert len(h.system.forked) == 3


def test_a_retiring_worker_is_killed_after_its_deadline(make: Callable[..., Harness]) -> None:
    h, (first, second) = started(make, shutdown_timeout=10.0)
    h.signal(signal.SIGTERM)
    h.turn()
    assert h.system.signals_to(first) == h.system.signals_to(second) == [signal.SIGTERM]
    h.system.now += 10.0 + sv.KILL_GRACE - 0.1
    h.turn()
    assert signal.SIGKILL not in h.system.signals_to(first)
    h.system.now += 0.2
    h.turn()
    assert h.system.signals_to(first) == [signal.SIGTERM, signal.SIGKILL]


# -- stopping ------------------------------------------------------------------------------


def test_sigterm_then_sigint_then_the_end(make: Callable[..., Harness]) -> None:
    h, (first, second) = started(make)
    h.signal(signal.SIGTERM)
    h.turn()
    assert h.sup._stopping and all(s.closed for s in h.system.sockets)  # no new connections
    assert h.system.signals_to(first) == [signal.SIGTERM]
    h.signal(signal.SIGTERM)
    h.turn()
    assert h.system.signals_to(first) == [signal.SIGTERM]  # a second SIGTERM changes nothing
    h.signal(signal.SIGINT)
    h.turn()
    assert h.system.signals_to(first) == [signal.SIGTERM, signal.SIGQUIT]  # now stop at once
    h.signal(signal.SIGQUIT)
    h.turn()
    assert h.system.signals_to(first) == [signal.SIGTERM, signal.SIGQUIT]  # only ever a harder signal, once
    h.die(first, exited(0))
    h.die(second, exited(0))
    h.turn()
    assert h.sup._workers == {} and h.system.forked == [first, second]  # none replaced
    assert h.sup._exit_code == 0


def test_signals_are_only_queued_until_the_loop_turns(make: Callable[..., Harness]) -> None:
    h, _ = started(make)
    for sig in (signal.SIGTTIN, signal.SIGTTIN, signal.SIGTERM, signal.SIGTTIN):
        h.signal(sig)
    assert (h.sup.target, h.sup._stopping) == (2, False)
    assert h.system.sent == []
    h.turn()
    # In order: two more workers, then the stop, after which TTIN is ignored.
    assert (h.sup.target, h.sup._stopping) == (4, True)
    assert len(h.system.sent) == 2 and len(h.system.forked) == 2


# -- reload ----------------------------------------------------------------------------------


def test_sighup_replaces_the_workers_one_seat_at_a_time(make: Callable[..., Harness]) -> None:
    configs: list[Config] = []
    h, old = started(make, reload=lambda: configs[-1])
    configs.append(replace(h.sup.config, max_recipients=3))
    h.signal(signal.SIGHUP)
    h.turn()
    assert h.sup.config.max_recipients == 3 and h.sup.generation == 1
    h.turn()
    (new0,) = h.system.forked[2:]  # one new worker; the other seat waits its turn
    seat = h.seat_of(new0)
    (predecessor,) = [pid for pid in old if h.seat_of(pid) == seat]
    h.turn()
    assert h.system.sent == [] and len(h.system.forked) == 3  # the old one serves until its successor is ready
    h.ready(new0)
    h.turn()
    assert h.system.signals_to(predecessor) == [signal.SIGUSR1]  # drains, it is not killed
    (new1,) = h.system.forked[3:]
    (other,) = set(old) - {predecessor}
    h.ready(new1)
    h.turn()
    assert h.system.signals_to(other) == [signal.SIGUSR1]
    for pid in old:
        h.die(pid, exited(0))
    h.turn()
    assert sorted(h.live()) == sorted([new0, new1]) and len(h.system.forked) == 4
    # A retired worker's exit is no death: not counted, no backoff.
    assert h.sup._metrics.base[WORKER_RESTARTS] == 0 and h.sup._quick_deaths == 0
    assert h.sup._good is not None and h.sup._good[0] == 1


def test_a_reload_that_fails_keeps_everything(make: Callable[..., Harness]) -> None:
    def broken() -> Config:
        raise ConfigError("max-recipients must be at least 1")

    h, old = started(make, reload=broken)
    h.signal(signal.SIGHUP)
    h.turn()
    h.turn()
    assert h.sup.generation == 0 and h.system.forked == old and h.system.sent == []


def test_a_reload_keeps_the_listening_address(make: Callable[..., Harness]) -> None:
    configs: list[Config] = []
    h, _ = started(make, reload=lambda: configs[-1])
    configs.append(replace(h.sup.config, port=2626, workers=0))
    h.signal(signal.SIGHUP)
    h.turn()
    assert h.sup.config.port == 2525  # sockets are bound once: a new address needs a restart
    assert h.sup.target == 2  # and --workers 0 needs one too


# -- TTIN / TTOU --------------------------------------------------------------------------------


def test_ttin_adds_a_seat_and_a_worker_ttou_retires_the_last(make: Callable[..., Harness]) -> None:
    h, (first,) = started(make, workers=1)
    h.signal(signal.SIGTTIN)
    h.turn()
    h.turn()
    (added,) = h.system.forked[1:]
    assert len(h.sup._seats) == 2 and h.seat_of(added) == 1
    h.ready(added)
    h.signal(signal.SIGTTOU)
    h.turn()
    h.turn()
    assert h.system.signals_to(added) == [signal.SIGUSR1] and h.system.signals_to(first) == []
    assert len(h.sup._seats) == 1 and h.system.sockets[1].closed
    h.signal(signal.SIGTTOU)  # never below one worker
    h.turn()
    assert h.sup.target == 1 and h.system.signals_to(first) == []
