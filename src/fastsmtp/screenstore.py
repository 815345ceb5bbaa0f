"""The screening's memory: greeting tests and greylisting triplets, in one SQLite file.

Rules of this module:
- One file (``--screen-db``), shared by every worker and kept across
  restarts.  Each worker opens its own connection after the fork.  WAL
  mode lets readers go on while one worker writes; ``synchronous=NORMAL``
  flushes at checkpoints only, because a screening result lost to a power
  cut costs a client one more greeting delay or greylisting round, never
  a message.
- Time is the wall clock (``time.time``): entries outlive the process.
- Writes are rare by design: a greeting result once per client and TTL; a
  triplet when it is first seen and when it passes; a known triplet or an
  allowed client refreshes its lifetime at most once a day.  Every write
  is one statement, atomic on its own (UPSERT, or an UPDATE whose row count
  says which worker won), so two workers never need a transaction
  together.
- A per-worker memory in front of the file holds positive answers (a
  passed greeting test, an allowed triplet or client) with their expiry,
  at most a day, so that a returning client costs a dict probe, and a
  lifetime still gets refreshed in the file.  Nothing negative is held
  there: another worker may just have recorded the pass.
- Every SQLite error (a lock held too long, a full disk, a damaged file) is
  caught here: the greeting test is then "not remembered" and greylisting
  lets the mail through ("error").  Screening is a filter, never a reason
  to refuse mail of its own.  A file that cannot be opened as a database is
  logged, and the store works in memory only until restart.
- The file is bounded: expired rows are pruned now and then (at most every
  ``PRUNE_EVERY`` seconds), and past ``MAX_TRIPLETS`` the oldest triplets
  that never passed go first, so forged senders cannot fill the disk.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import re
import sqlite3
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

__all__ = ["ScreenStore", "GreylistRules", "GreylistAnswer", "client_network", "normalise_sender"]

log = logging.getLogger("fastsmtp")

#: A day: the longest a positive answer is held in memory, and the least
#: time between two refreshes of one row's lifetime.
DAY = 86400.0
PRUNE_EVERY = 600.0
MAX_TRIPLETS = 1_000_000
#: The most one statement waits for another worker's write lock: the loop
#: must not stall longer than this on the file.
BUSY_TIMEOUT_MS = 100
MEMORY_SIZE = 10_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS greeting (
    address TEXT PRIMARY KEY, result TEXT NOT NULL, expires REAL NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS triplet (
    network TEXT NOT NULL, sender TEXT NOT NULL, recipient TEXT NOT NULL,
    first REAL NOT NULL, passed REAL, expires REAL NOT NULL,
    PRIMARY KEY (network, sender, recipient)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS triplet_expires ON triplet (expires);
CREATE TABLE IF NOT EXISTS client (
    network TEXT PRIMARY KEY, passes INTEGER NOT NULL, expires REAL NOT NULL) WITHOUT ROWID;
"""

_TRIPLET = "network = ? AND sender = ? AND recipient = ?"


@dataclass(frozen=True, slots=True)
class GreylistRules:
    """Greylisting's times (seconds) and the auto-allow count (RFC 6647 §4 leaves them to us)."""

    #: How long a new triplet is refused (postgrey's --delay).
    delay: float = 300.0
    #: How long after the first attempt a retry still passes (postgrey's --retry-window).
    window: float = 2 * DAY
    #: How long a passed triplet or an allowed client lives after its last use (postgrey's --max-age).
    lifetime: float = 35 * DAY
    #: Passed triplets after which a client network is allowed outright; 0: never.
    auto_allow: int = 5


@dataclass(frozen=True, slots=True)
class GreylistAnswer:
    """``why``: new, early (both refused); passed, known, client, error (all allowed)."""

    allowed: bool
    why: str


_NEW = GreylistAnswer(False, "new")
_EARLY = GreylistAnswer(False, "early")
_PASSED = GreylistAnswer(True, "passed")
_KNOWN = GreylistAnswer(True, "known")
_CLIENT = GreylistAnswer(True, "client")
_ERROR = GreylistAnswer(True, "error")


@functools.lru_cache(maxsize=4096)
def client_network(address: str) -> str:
    """The triplet's client: the /24 of an IPv4 address, the /64 of an IPv6 one.

    A sender's pool of outgoing hosts usually shares a /24 (postgrey's
    lookup-by-subnet): a retry from the host next door still passes.
    """
    try:
        ip = ipaddress.ip_address(address.partition("%")[0])
    except ValueError:
        return address  # not an address: itself (a test's fake peer)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    prefix = 24 if ip.version == 4 else 64
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))


_BATV = re.compile(r"^(?:prvs|msprvs\d*)=[^=@]*=")
_SRS = re.compile(r"^(srs[01])=[^=]*=[^=]*=")
_DIGITS = re.compile(r"\d+")


def normalise_sender(sender: str) -> str:
    """The sender as a triplet keeps it: one key for all the bounce addresses of one list.

    Lower case.  A BATV tag (``prvs=TAG=local``) is dropped, and so are an
    SRS address's hash and timestamp; runs of digits in the local part (VERP,
    ticket numbers) become ``#``.  Otherwise each message of a list would be
    a new triplet and never pass.  ``<>`` is "".
    """
    local, at, domain = sender.lower().rpartition("@")
    if not at:
        local, domain = domain, ""
    local = _SRS.sub(r"\1=#=#=", _BATV.sub("", local))
    local = _DIGITS.sub("#", local)
    return f"{local}@{domain}" if at else local


class ScreenStore:
    """One worker's connection to the shared file, with its memory of positive answers."""

    def __init__(self, path: str, *, rules: GreylistRules = GreylistRules(),
                 clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.rules = rules
        self._clock = clock
        #: key -> (held until, value); oldest use first.
        self._memory: OrderedDict[tuple[str, ...], tuple[float, str]] = OrderedDict()
        self._pruned = 0.0
        self._complained = 0.0
        #: Answers from memory, from the file, and none (a miss), for the hit rate.
        self.memory_hits = self.file_hits = self.misses = 0
        self.in_memory_only = False
        try:
            self._db = self._open(path)
        except sqlite3.Error as exc:
            log.error("screening: %s is not a usable database (%s); remembering in memory only", path, exc)
            self._db = self._open(":memory:")
            self.in_memory_only = True
        self.prune()

    @staticmethod
    def _open(path: str) -> sqlite3.Connection:
        db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False)
        db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        if path != ":memory:":
            db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = NORMAL")
        db.executescript(_SCHEMA)  # IF NOT EXISTS: workers racing at start agree
        return db

    def close(self) -> None:
        self._db.close()

    # -- memory ----------------------------------------------------------------------

    def _held(self, key: tuple[str, ...], now: float) -> str | None:
        entry = self._memory.get(key)
        if entry is None:
            return None
        if entry[0] <= now:
            del self._memory[key]
            return None
        self._memory.move_to_end(key)
        return entry[1]

    def _hold(self, key: tuple[str, ...], value: str, expires: float, now: float) -> None:
        self._memory[key] = (min(expires, now + DAY), value)
        self._memory.move_to_end(key)
        if len(self._memory) > MEMORY_SIZE:
            self._memory.popitem(last=False)

    def _failed(self, what: str, exc: sqlite3.Error) -> None:
        now = self._clock()
        if now - self._complained > 60:  # one line a minute, not one per client
            self._complained = now
            log.warning("screening: %s failed on %s (%s); letting the client through", what, self.path, exc)

    # -- the greeting test -----------------------------------------------------------

    def greeting(self, address: str) -> str | None:
        """"pass" or "fail" while the client's last greeting test is on record, else None."""
        now = self._clock()
        held = self._held(("g", address), now)
        if held is not None:
            self.memory_hits += 1
            return held
        try:
            row = self._db.execute("SELECT result, expires FROM greeting WHERE address = ?", (address,)).fetchone()
        except sqlite3.Error as exc:
            self._failed("a greeting lookup", exc)
            return None
        if row is None or row[1] <= now:
            self.misses += 1
            return None
        self.file_hits += 1
        self._hold(("g", address), row[0], row[1], now)
        return str(row[0])

    def record_greeting(self, address: str, result: str, ttl: float) -> None:
        if result not in ("pass", "fail"):
            raise ValueError(f"a greeting test is pass or fail, not {result!r}")
        now = self._clock()
        try:
            self._db.execute("INSERT OR REPLACE INTO greeting VALUES (?, ?, ?)", (address, result, now + ttl))
        except sqlite3.Error as exc:
            self._failed("recording a greeting test", exc)
            return
        self._hold(("g", address), result, now + ttl, now)
        self._maybe_prune(now)

    # -- greylisting -----------------------------------------------------------------

    def greylist(self, address: str, sender: str, recipient: str) -> GreylistAnswer:
        """Whether (address's network, sender, recipient) may pass now; records what it sees."""
        now = self._clock()
        rules = self.rules
        network = client_network(address)
        if rules.auto_allow and self._held(("c", network), now) is not None:
            return _CLIENT
        key = ("t", network, normalise_sender(sender), recipient.lower())
        if self._held(key, now) is not None:
            return _KNOWN
        try:
            return self._greylist(key, network, now)
        except sqlite3.Error as exc:
            self._failed("a greylisting lookup", exc)
            return _ERROR

    def _greylist(self, key: tuple[str, ...], network: str, now: float) -> GreylistAnswer:
        db, rules = self._db, self.rules
        if rules.auto_allow:
            row = db.execute("SELECT passes, expires FROM client WHERE network = ?", (network,)).fetchone()
            if row is not None and row[0] >= rules.auto_allow and row[1] > now:
                expires = self._refresh("client", "network = ?", (network,), row[1], now)
                self._hold(("c", network), "allowed", expires, now)
                return _CLIENT
        _, net, sender, recipient = key
        triplet = (net, sender, recipient)
        row = db.execute(f"SELECT first, passed, expires FROM triplet WHERE {_TRIPLET}", triplet).fetchone()
        if row is None or row[2] <= now:
            # New, or its window (or lifetime) ran out: it starts again.  The
            # WHERE keeps a row another worker has just made.
            db.execute("INSERT INTO triplet VALUES (?, ?, ?, ?, NULL, ?) ON CONFLICT DO UPDATE SET "
                       "first = excluded.first, passed = NULL, expires = excluded.expires WHERE expires <= ?",
                       (*triplet, now, now + rules.window, now))
            self._maybe_prune(now)
            return _NEW
        first, passed, expires = row
        if passed is not None:
            expires = self._refresh("triplet", _TRIPLET, triplet, expires, now)
            self._hold(key, "allowed", expires, now)
            return _KNOWN
        if now - first < rules.delay:
            return _EARLY
        # The retry came after the delay and within the window: it passes.
        # Only the worker whose UPDATE changed the row counts the pass.
        cursor = db.execute(f"UPDATE triplet SET passed = ?, expires = ? WHERE {_TRIPLET} AND passed IS NULL",
                            (now, now + rules.lifetime, *triplet))
        if cursor.rowcount == 1 and rules.auto_allow:
            db.execute("INSERT INTO client VALUES (?, 1, ?) ON CONFLICT DO UPDATE SET passes = passes + 1, "
                       "expires = excluded.expires", (net, now + rules.lifetime))
        self._hold(key, "allowed", now + rules.lifetime, now)
        return _PASSED

    def _refresh(self, table: str, where: str, args: tuple[str, ...], expires: float, now: float) -> float:
        """A used row lives ``lifetime`` from now; written at most once a day."""
        renewed = now + self.rules.lifetime
        if renewed - expires < DAY:
            return expires
        self._db.execute(f"UPDATE {table} SET expires = ? WHERE {where}", (renewed, *args))
        return renewed

    # -- bounds ----------------------------------------------------------------------

    def _maybe_prune(self, now: float) -> None:
        if now - self._pruned >= PRUNE_EVERY:
            self.prune()

    def prune(self) -> int:
        """Drop expired rows, and the oldest unpassed triplets past MAX_TRIPLETS; how many went."""
        now = self._pruned = self._clock()
        gone = 0
        try:
            db = self._db
            for table in ("greeting", "triplet", "client"):
                gone += db.execute(f"DELETE FROM {table} WHERE expires <= ?", (now,)).rowcount
            excess = db.execute("SELECT count(*) FROM triplet").fetchone()[0] - MAX_TRIPLETS
            if excess > 0:
                gone += db.execute(
                    "DELETE FROM triplet WHERE passed IS NULL AND expires <= (SELECT expires FROM triplet "
                    "WHERE passed IS NULL ORDER BY expires LIMIT 1 OFFSET ?)", (excess - 1,)).rowcount
        except sqlite3.Error as exc:
            self._failed("pruning", exc)
        return gone
