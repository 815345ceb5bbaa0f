"""screenstore.py: the shared memory of greeting tests and greylisting, on real SQLite files."""

from __future__ import annotations

import multiprocessing
import sqlite3
import timeit
from pathlib import Path

import pytest

from fastsmtp import screenstore
from fastsmtp.screenstore import DAY, GreylistRules, ScreenStore, client_network, normalise_sender


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


RULES = GreylistRules(delay=300, window=2 * DAY, lifetime=35 * DAY, auto_allow=3)


def store(path: Path, clock: Clock, rules: GreylistRules = RULES) -> ScreenStore:
    return ScreenStore(str(path / "screen.db"), rules=rules, clock=clock)


# -- keys --------------------------------------------------------------------------


def test_client_networks() -> None:
    assert client_network("192.0.2.77") == "192.0.2.0/24"
    assert client_network("::ffff:192.0.2.77") == "192.0.2.0/24"
    assert client_network("2001:db8:1:2:3:4:5:6") == "2001:db8:1:2::/64"
    assert client_network("unknown") == "unknown"


@pytest.mark.parametrize(
    "sender, key",
    [
        ("", ""),
        ("Alice@Example.NET", "alice@example.net"),
        ("prvs=1234abcd=bounces@example.net", "bounces@example.net"),
        ("SRS0=HHH=TT=orig.example=user@fwd.example", "srs#=#=#=orig.example=user@fwd.example"),
        ("bounce-12345-678@lists.example", "bounce-#-#@lists.example"),
        ("user@host1.example", "user@host1.example"),  # digits in the domain are the domain's
    ],
)
def test_sender_normalisation(sender: str, key: str) -> None:
    assert normalise_sender(sender) == key


# -- the greeting test -------------------------------------------------------------


def test_a_greeting_result_is_remembered_for_its_ttl(tmp_path: Path) -> None:
    clock = Clock()
    s = store(tmp_path, clock)
    assert s.greeting("192.0.2.1") is None
    s.record_greeting("192.0.2.1", "pass", 100)
    s.record_greeting("192.0.2.2", "fail", 100)
    assert s.greeting("192.0.2.1") == "pass" and s.greeting("192.0.2.2") == "fail"
    clock.now += 99
    assert s.greeting("192.0.2.1") == "pass"
    clock.now += 2
    assert s.greeting("192.0.2.1") is None and s.greeting("192.0.2.2") is None


def test_two_workers_and_a_restart_share_the_file(tmp_path: Path) -> None:
    clock = Clock()
    a, b = store(tmp_path, clock), store(tmp_path, clock)
    assert b.greeting("192.0.2.1") is None  # b asked first: nothing negative is held
    a.record_greeting("192.0.2.1", "pass", 1000)
    assert b.greeting("192.0.2.1") == "pass"
    assert (b.memory_hits, b.file_hits, b.misses) == (0, 1, 1)
    assert b.greeting("192.0.2.1") == "pass" and b.memory_hits == 1
    a.close()
    b.close()
    assert store(tmp_path, clock).greeting("192.0.2.1") == "pass"


def test_only_pass_or_fail_is_recorded(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        store(tmp_path, Clock()).record_greeting("192.0.2.1", "maybe", 10)


# -- greylisting -------------------------------------------------------------------


def test_first_early_and_late_attempts(tmp_path: Path) -> None:
    clock = Clock()
    s = store(tmp_path, clock)
    triplet = ("192.0.2.1", "list@example.net", "alice@example.com")
    assert s.greylist(*triplet).why == "new"
    clock.now += 299
    assert s.greylist(*triplet).why == "early"
    clock.now += 2
    answer = s.greylist(*triplet)
    assert answer.allowed and answer.why == "passed"
    assert s.greylist(*triplet).why == "known"
    # The same sender from the host next door, and in another case.
    assert s.greylist("192.0.2.200", "LIST@example.net", "Alice@Example.com").why == "known"
    # Another recipient is another triplet.
    assert s.greylist("192.0.2.1", "list@example.net", "bob@example.com").why == "new"


def test_a_retry_after_the_window_starts_again(tmp_path: Path) -> None:
    clock = Clock()
    s = store(tmp_path, clock)
    triplet = ("192.0.2.1", "a@example.net", "alice@example.com")
    assert s.greylist(*triplet).why == "new"
    clock.now += 2 * DAY + 1
    assert s.greylist(*triplet).why == "new"
    clock.now += 301
    assert s.greylist(*triplet).why == "passed"


def test_a_passed_triplet_lives_its_lifetime_from_its_last_use(tmp_path: Path) -> None:
    clock = Clock()
    s = store(tmp_path, clock, GreylistRules(delay=300, window=DAY, lifetime=10 * DAY, auto_allow=0))
    triplet = ("192.0.2.1", "a@example.net", "alice@example.com")
    s.greylist(*triplet)
    clock.now += 301
    assert s.greylist(*triplet).why == "passed"
    for _ in range(4):  # used every 8 days: never older than its lifetime
        clock.now += 8 * DAY
        assert s.greylist(*triplet).allowed, "a triplet in use stays"
    fresh = store(tmp_path, clock, s.rules)  # another worker, without the memory
    clock.now += 11 * DAY
    assert fresh.greylist(*triplet).why == "new"


def test_a_client_that_passed_n_triplets_is_allowed_outright(tmp_path: Path) -> None:
    clock = Clock()
    s = store(tmp_path, clock)
    for i in range(3):
        s.greylist("192.0.2.1", f"s{chr(97 + i)}@example.net", "alice@example.com")
    clock.now += 301
    for i in range(3):
        assert s.greylist("192.0.2.1", f"s{chr(97 + i)}@example.net", "alice@example.com").why == "passed"
    other = store(tmp_path, clock)
    assert other.greylist("192.0.2.9", "new@example.org", "bob@example.com").why == "client"
    assert other.greylist("198.51.100.1", "new@example.org", "bob@example.com").why == "new"


def test_two_workers_passing_one_triplet_count_it_once(tmp_path: Path) -> None:
    clock = Clock()
    a, b = store(tmp_path, clock), store(tmp_path, clock)
    triplet = ("192.0.2.1", "a@example.net", "alice@example.com")
    assert a.greylist(*triplet).why == "new"
    assert b.greylist(*triplet).why == "early"
    clock.now += 301
    assert a.greylist(*triplet).why == "passed"
    assert b.greylist(*triplet).why == "known"
    db = sqlite3.connect(tmp_path / "screen.db")
    assert db.execute("SELECT passes FROM client").fetchall() == [(1,)]


def _hammer(path: str, n: int, worker: int) -> None:
    s = ScreenStore(path, rules=GreylistRules(delay=0, auto_allow=0))
    for i in range(n):
        s.record_greeting(f"192.0.{worker}.{i % 250}", "pass", 3600)
        s.greylist(f"192.0.{i % 5}.1", f"s{i % 50}@example.net", "alice@example.com")
        assert s.greeting(f"192.0.{worker}.{i % 250}") == "pass"
    s.close()


def test_processes_writing_at_once(tmp_path: Path) -> None:
    path = str(tmp_path / "screen.db")
    ScreenStore(path).close()
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_hammer, args=(path, 400, w)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    db = sqlite3.connect(path)
    assert db.execute("SELECT count(*) FROM greeting").fetchone() == (1000,)
    # 5 networks x 50 senders (the digits of "s17" normalise: s# for all).
    assert db.execute("SELECT count(*) FROM triplet").fetchone() == (5,)


# -- bounds and failures -----------------------------------------------------------


def test_pruning_drops_expired_rows_and_caps_the_unpassed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    s = store(tmp_path, clock)
    s.record_greeting("192.0.2.1", "pass", 10)
    for i in range(20):
        clock.now += 1
        s.greylist(f"198.51.{i}.1", "a@example.net", "alice@example.com")
    clock.now += 11
    monkeypatch.setattr(screenstore, "MAX_TRIPLETS", 5)
    assert s.prune() == 1 + 15
    db = sqlite3.connect(tmp_path / "screen.db")
    assert db.execute("SELECT count(*) FROM triplet").fetchone() == (5,)
    # The newest five stay.
    assert db.execute("SELECT min(first) FROM triplet").fetchone()[0] == clock.now - 11 - 4


def test_a_damaged_file_leaves_a_store_in_memory(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "screen.db"
    path.write_bytes(b"this is not a database" * 100)
    s = ScreenStore(str(path), clock=Clock())
    assert s.in_memory_only
    assert "not a usable database" in caplog.text
    s.record_greeting("192.0.2.1", "pass", 100)
    assert s.greeting("192.0.2.1") == "pass"


def test_errors_let_the_client_through(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    s = store(tmp_path, clock)
    s.close()  # every statement now fails
    assert s.greeting("192.0.2.1") is None
    s.record_greeting("192.0.2.1", "pass", 100)
    answer = s.greylist("192.0.2.1", "a@example.net", "alice@example.com")
    assert answer.allowed and answer.why == "error"
    assert caplog.text.count("letting the client through") == 1  # once a minute


def test_a_locked_file_fails_open_within_the_busy_timeout(tmp_path: Path) -> None:
    clock = Clock()
    s = store(tmp_path, clock)
    blocker = sqlite3.connect(tmp_path / "screen.db", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # another worker holds the write lock
    try:
        took = timeit.timeit(lambda: s.greylist("192.0.2.1", "a@example.net", "alice@example.com"), number=1)
        assert s.greylist("192.0.2.1", "b@example.net", "alice@example.com").why == "error"
        assert took < 5, "bounded by the busy timeout"
    finally:
        blocker.execute("ROLLBACK")


def test_costs(tmp_path: Path) -> None:
    """Not an assertion on time (bench/ holds those): the figures, printed for the note."""
    clock = Clock()
    s, other = store(tmp_path, clock), store(tmp_path, clock)
    s.record_greeting("192.0.2.1", "pass", 1000)
    n = 2000
    memory = timeit.timeit(lambda: s.greeting("192.0.2.1"), number=n) / n
    other._memory.clear()
    file_hit = timeit.timeit(lambda: (other._memory.clear(), other.greeting("192.0.2.1")), number=n) / n
    s.greylist("192.0.2.1", "a@example.net", "alice@example.com")
    clock.now += 301
    s.greylist("192.0.2.1", "a@example.net", "alice@example.com")
    known = timeit.timeit(lambda: s.greylist("192.0.2.1", "a@example.net", "alice@example.com"), number=n) / n
    write = timeit.timeit(lambda: s.record_greeting("192.0.2.9", "pass", 1000), number=200) / 200
    print(f"\nscreenstore: greeting from memory {memory * 1e6:.2f} µs, from the file {file_hit * 1e6:.1f} µs, "
          f"known triplet from memory {known * 1e6:.2f} µs, a write {write * 1e6:.0f} µs")
    assert s.greeting("192.0.2.1") == "pass"
