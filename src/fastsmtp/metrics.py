"""Per-worker counters in shared memory, summed and served as Prometheus text.

Rules of this module:
- The counters live in one anonymous shared mapping of int64 slots that
  the supervisor creates before it forks (the same arrangement as
  anvil.py): one row per worker slot, and each slot of a row has exactly
  one writer.  The worker's event loop writes the session counters, its
  committer thread only the commit counters; no two threads share a slot,
  so there is no lock.
- Counting is a couple of index operations on a ``memoryview`` cast to
  ``"q"``: ``row[SLOT] += 1``.  No dict, no lock, no system call.  An
  aligned 8-byte store is one store on the machines we run on, so a reader
  never sees half of a value.
- The supervisor reads every row and sums.  Prometheus counters must never
  go backwards, so when a worker is reaped its row is added into a base
  held by the supervisor before the row is zeroed for the slot's next
  worker: a crashed worker's counts stay in the totals.  The base also
  holds what only the supervisor counts (worker restarts).
- Histograms have fixed bucket boundaries: a row holds one slot per bucket
  (not cumulative; the exposition cumulates), one for +Inf and one for the
  sum (nanoseconds for seconds, so that every slot stays an integer).
- The HTTP side is deliberately tiny: ``GET /metrics`` (or HEAD) answers
  the text exposition format 0.0.4, anything else 404, every response
  closes the connection, a request head is at most ``MAX_REQUEST`` bytes
  and must arrive within ``TIMEOUT`` seconds.  It is meant for loopback or
  a private network: there is no authentication.
"""

from __future__ import annotations

import asyncio
import errno
import mmap
import socket
import time
from bisect import bisect_left
from typing import Any, Callable

__all__ = [
    "Metrics", "Histogram", "MetricsHTTP", "Meter", "NO_METER", "serve_http", "observe", "http_response", "render",
]

#: Reply codes that get their own label value; any other is code="other".
CODES = (421, 450, 451, 452, 500, 501, 502, 503, 504, 550, 551, 552, 553, 554, 555)
#: Why a connection was turned away before its greeting.
REFUSAL_REASONS = ("shutdown", "max_connections", "max_connections_per_ip")
REFUSED_SHUTDOWN, REFUSED_MAX_CONNECTIONS, REFUSED_PER_IP = range(len(REFUSAL_REASONS))

#: A reply code's offset within a by-code family: a list index, not a dict.
CODE_INDEX = [len(CODES)] * 1000
for _i, _code in enumerate(CODES):
    CODE_INDEX[_code] = _i

MAX_REQUEST = 8192
TIMEOUT = 5.0
MAX_CLIENTS = 16

_size = 0


def _take(n: int = 1) -> int:
    global _size
    start = _size
    _size += n
    return start


class Histogram:
    """Where one histogram's slots start in a row, and its boundaries."""

    def __init__(self, bounds: tuple[float, ...], scale: int) -> None:
        self.bounds = bounds
        #: Sum slot = value * scale (1e9: seconds held as nanoseconds).
        self.scale = scale
        self.base = _take(len(bounds) + 2)  # buckets, +Inf, sum
        self.sum = self.base + len(bounds) + 1


CONNECTIONS_ACCEPTED = _take()
CONNECTIONS_REFUSED = _take(len(REFUSAL_REASONS))
MESSAGES_ACCEPTED = _take()
BYTES_ACCEPTED = _take()
RECIPIENTS_ACCEPTED = _take()
MESSAGES_REFUSED = _take(len(CODES) + 1)
RECIPIENTS_REFUSED = _take(len(CODES) + 1)
TLS_OK = _take()
TLS_FAILED = _take()
WORKER_RESTARTS = _take()  # the supervisor's base only
COMMIT_BATCHES = _take()
# The journal (journalstore.py): the loop writes the delivery counters,
# the worker at start the recovery ones.
DELIVERED = _take()
DELIVERY_FAILURES = _take()
RECOVERED = _take()  # records replayed into new/ at start (recovery.py)
SET_ASIDE = _take()  # damaged records and undeliverable messages put aside at start
# Gauges: what is held now, not counts.  A reaped worker's values are not
# kept in the base: its journal is recovered by the next worker.
JOURNAL_BYTES = _take()
JOURNAL_SEGMENTS = _take()
DELIVERY_PENDING = _take()
# LMTP delivery (lmtp/queue.py, on the loop): recipients delivered, refused
# for good (dead letters), attempts to be retried; the messages waiting, and
# when the oldest of them was accepted (wall clock, ms; 0: none), which is
# the minimum over the workers, not the sum (``totals``).
LMTP_DELIVERED = _take()
LMTP_DEAD = _take()
LMTP_RETRIES = _take()
LMTP_PENDING = _take()
LMTP_OLDEST_MS = _take()
# The messages waiting, by the place in --deliver of the target that last
# failed them (the first, for one not tried yet); past LMTP_TARGETS, the last.
LMTP_TARGETS = 8
LMTP_PENDING_BY = _take(LMTP_TARGETS)
GAUGE_SLOTS = (JOURNAL_BYTES, JOURNAL_SEGMENTS, DELIVERY_PENDING, LMTP_PENDING, LMTP_OLDEST_MS,
               *range(LMTP_PENDING_BY, LMTP_PENDING_BY + LMTP_TARGETS))
_MIN_SLOTS = frozenset((LMTP_OLDEST_MS,))
# Authentication (auth/): one slot per check and result (RFC 8601 §2.7).
AUTH_CHECKS = ("spf", "dkim", "dmarc", "arc")
AUTH_WORDS = ("none", "pass", "fail", "softfail", "neutral", "policy", "temperror", "permerror")
AUTH_RESULTS = _take(len(AUTH_CHECKS) * len(AUTH_WORDS))
#: (check, result) -> its slot; a word outside the table counts as permerror.
AUTH_SLOT = {
    (check, word): AUTH_RESULTS + i * len(AUTH_WORDS) + j
    for i, check in enumerate(AUTH_CHECKS)
    for j, word in enumerate(AUTH_WORDS)
}

# Screening (screen.py): one slot per decision, and the remembered
# greeting test's hits and misses (a hit: a result on record).
SCREEN_DECISIONS = (
    "trusted", "pass", "remembered", "early_talker", "early_talker_remembered", "dnsbl", "dnsbl_allowlisted",
    "greylisted", "greylist_pass", "limit",
)
SCREEN = _take(len(SCREEN_DECISIONS))
SCREEN_SLOT = {decision: SCREEN + i for i, decision in enumerate(SCREEN_DECISIONS)}
GREETING_MEMORY_HIT = _take()
GREETING_MEMORY_MISS = _take()
DNSBL_FAILURES = _take()

# Milters (milter/stage.py), by their place in --milter (the first MILTERS):
# the verdicts, the failures (down, timed out, garbage), the changes not
# applied; and the time of each answer.
MILTERS = 8
MILTER_VERDICTS = ("continue", "accept", "reject", "tempfail", "replycode", "discard", "quarantine")
MILTER = _take(MILTERS * len(MILTER_VERDICTS))
MILTER_FAILURES = _take(MILTERS)
MILTER_UNAPPLIED = _take(MILTERS)
_MILTER_SLOT = {(i, v): MILTER + i * len(MILTER_VERDICTS) + j
                for i in range(MILTERS) for j, v in enumerate(MILTER_VERDICTS)}

_SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_SIZE = Histogram((1, 2, 4, 8, 16, 32, 64, 128, 256, 512), 1)
COMMIT_SECONDS = Histogram(_SECONDS, 1_000_000_000)
TIME_TO_250 = Histogram(_SECONDS, 1_000_000_000)
# One per milter (its place in --milter); answers of milters past MILTERS go into the last.
MILTER_SECONDS = [Histogram(_SECONDS, 1_000_000_000) for _ in range(MILTERS)]
LMTP_SECONDS = Histogram(_SECONDS, 1_000_000_000)
DELIVERY_LAG = Histogram((0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0),
                         1_000_000_000)

#: int64 slots in one row.
SLOTS = _size


def observe(row: memoryview, h: Histogram, value: float) -> None:
    row[h.base + bisect_left(h.bounds, value)] += 1  # le: the first bound >= value
    row[h.sum] += int(value * h.scale)


class Meter:
    """What a connection counts, named: one worker's row behind methods.

    ``NO_METER`` is the one to use when metrics are off: the same methods,
    doing nothing, so that callers never test for None.
    """

    __slots__ = ("_row",)

    def __init__(self, row: memoryview) -> None:
        self._row = row

    def connection_accepted(self) -> None:
        self._row[CONNECTIONS_ACCEPTED] += 1

    def connection_refused(self, reason: int) -> None:
        self._row[CONNECTIONS_REFUSED + reason] += 1

    def recipient_accepted(self) -> None:
        self._row[RECIPIENTS_ACCEPTED] += 1

    def recipient_refused(self, code: int) -> None:
        self._row[RECIPIENTS_REFUSED + CODE_INDEX[code]] += 1

    def message_accepted(self, size: int) -> None:
        self._row[MESSAGES_ACCEPTED] += 1
        self._row[BYTES_ACCEPTED] += size

    def message_refused(self, code: int) -> None:
        self._row[MESSAGES_REFUSED + CODE_INDEX[code]] += 1

    def time_to_250(self, seconds: float) -> None:
        observe(self._row, TIME_TO_250, seconds)

    def tls(self, ok: bool) -> None:
        self._row[TLS_OK if ok else TLS_FAILED] += 1

    def auth_results(self, pairs: tuple[tuple[str, str], ...]) -> None:
        """One message's (check, result) pairs."""
        row = self._row
        for pair in pairs:
            slot = AUTH_SLOT.get(pair)
            row[slot if slot is not None else AUTH_SLOT[(pair[0], "permerror")]] += 1

    def screened(self, decision: str) -> None:
        self._row[SCREEN_SLOT[decision]] += 1

    def milter(self, index: int, verdict: str, seconds: float) -> None:
        """One answer of the milter at ``index`` of --milter; past MILTERS, only the time counts."""
        slot = _MILTER_SLOT.get((index, verdict))
        if slot is not None:
            self._row[slot] += 1
        observe(self._row, MILTER_SECONDS[min(index, MILTERS - 1)], seconds)

    def milter_failed(self, index: int) -> None:
        if index < MILTERS:
            self._row[MILTER_FAILURES + index] += 1

    def milter_unapplied(self, index: int, count: int) -> None:
        if index < MILTERS:
            self._row[MILTER_UNAPPLIED + index] += count

    def greeting_memory(self, hit: bool) -> None:
        self._row[GREETING_MEMORY_HIT if hit else GREETING_MEMORY_MISS] += 1

    def dnsbl_failures(self, count: int) -> None:
        self._row[DNSBL_FAILURES] += count


class _NoMeter(Meter):
    __slots__ = ()

    def __init__(self) -> None:
        pass

    def connection_accepted(self) -> None:
        pass

    def connection_refused(self, reason: int) -> None:
        pass

    def recipient_accepted(self) -> None:
        pass

    def recipient_refused(self, code: int) -> None:
        pass

    def message_accepted(self, size: int) -> None:
        pass

    def message_refused(self, code: int) -> None:
        pass

    def time_to_250(self, seconds: float) -> None:
        pass

    def tls(self, ok: bool) -> None:
        pass

    def auth_results(self, pairs: tuple[tuple[str, str], ...]) -> None:
        pass

    def screened(self, decision: str) -> None:
        pass

    def milter(self, index: int, verdict: str, seconds: float) -> None:
        pass

    def milter_failed(self, index: int) -> None:
        pass

    def milter_unapplied(self, index: int, count: int) -> None:
        pass

    def greeting_memory(self, hit: bool) -> None:
        pass

    def dnsbl_failures(self, count: int) -> None:
        pass


NO_METER: Meter = _NoMeter()


class Metrics:
    """The shared block: ``slots`` rows.  Create it before forking."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self._mm = mmap.mmap(-1, slots * SLOTS * 8)
        self._all = memoryview(self._mm).cast("q")
        #: Reaped workers' counts and the supervisor's own; this process only.
        self.base = [0] * SLOTS

    def row(self, slot: int) -> memoryview:
        return self._all[slot * SLOTS : (slot + 1) * SLOTS]

    def retire(self, slot: int) -> None:
        """Keep a reaped worker's counts in the base, then zero its row for the next one."""
        row = self.row(slot)
        for i, value in enumerate(row.tolist()):
            if i not in GAUGE_SLOTS:
                self.base[i] += value
        self._mm[slot * SLOTS * 8 : (slot + 1) * SLOTS * 8] = bytes(SLOTS * 8)

    def totals(self) -> list[int]:
        values = self._all.tolist()
        rows = [values[s * SLOTS : (s + 1) * SLOTS] for s in range(self.slots)]
        out = [sum(column) for column in zip(self.base, *rows)]
        for slot in _MIN_SLOTS:
            found = [row[slot] for row in rows if row[slot]]
            out[slot] = min(found) if found else 0
        return out

    def render(self) -> bytes:
        return render(self.totals())


def _labels(name: str, values: tuple[str, ...]) -> list[str]:
    return [f'{name}="{v}"' for v in values]


# (name, help, first slot, label values or None: one slot each, in order)
_COUNTERS: list[tuple[str, str, int, list[str] | None]] = [
    ("fastsmtp_connections_accepted_total", "Connections admitted and greeted.", CONNECTIONS_ACCEPTED, None),
    ("fastsmtp_connections_refused_total", "Connections turned away before the greeting, by reason.",
     CONNECTIONS_REFUSED, _labels("reason", REFUSAL_REASONS)),
    ("fastsmtp_messages_accepted_total", "Messages stored (committed to every recipient's Maildir).",
     MESSAGES_ACCEPTED, None),
    ("fastsmtp_bytes_accepted_total", "Content octets of the messages stored, as received (before trace headers).",
     BYTES_ACCEPTED, None),
    ("fastsmtp_recipients_accepted_total", "RCPT commands answered 250.", RECIPIENTS_ACCEPTED, None),
    ("fastsmtp_messages_refused_total", "Messages refused after their data, by reply code.",
     MESSAGES_REFUSED, _labels("code", tuple(map(str, CODES)) + ("other",))),
    ("fastsmtp_recipients_refused_total", "RCPT commands refused by the recipient policy, by reply code.",
     RECIPIENTS_REFUSED, _labels("code", tuple(map(str, CODES)) + ("other",))),
    ("fastsmtp_tls_handshakes_total", "TLS handshakes by result (a failed implicit-TLS handshake never reaches the server: not counted).",
     TLS_OK, ['result="ok"', 'result="failed"']),
    ("fastsmtp_worker_restarts_total", "Workers that died and were replaced.", WORKER_RESTARTS, None),
    ("fastsmtp_commit_batches_total", "Group commits: journal flushes (--fsync batch), or Maildir commits.",
     COMMIT_BATCHES, None),
    ("fastsmtp_delivered_total", "Messages delivered from the journal into new/ (one per message).", DELIVERED,
     None),
    ("fastsmtp_delivery_failures_total", "Deliveries from the journal that failed and will be retried.",
     DELIVERY_FAILURES, None),
    ("fastsmtp_recovered_total", "Journal records replayed into new/ by recovery at start.", RECOVERED, None),
    ("fastsmtp_lmtp_delivered_total", "Recipients delivered over LMTP (--deliver lmtp:...), after the 250.",
     LMTP_DELIVERED, None),
    ("fastsmtp_lmtp_dead_letters_total", "Recipients an LMTP backend refused for good after the 250: the message "
     "is in the dead-letter Maildir.", LMTP_DEAD, None),
    ("fastsmtp_lmtp_retries_total", "LMTP delivery attempts that failed for now and will be retried (a backend "
     "down, a 4xx).", LMTP_RETRIES, None),
    ("fastsmtp_set_aside_total", "Damaged journal records and undeliverable messages set aside by recovery.",
     SET_ASIDE, None),
    ("fastsmtp_auth_results_total", "Messages by authentication check and result (DKIM: pass if any signature "
     "passed).", AUTH_RESULTS, [f'check="{c}",result="{w}"' for c in AUTH_CHECKS for w in AUTH_WORDS]),
    ("fastsmtp_screen_decisions_total", "Screening decisions: trusted clients, the greeting test (passed now, "
     "remembered, early talkers), DNSBL blocks and allow-listings, greylisting, the per-address limit.",
     SCREEN, _labels("decision", SCREEN_DECISIONS)),
    ("fastsmtp_screen_greeting_memory_total", "Greeting tests looked up in the shared memory: a result on record "
     "(hit) or none (miss).", GREETING_MEMORY_HIT, ['result="hit"', 'result="miss"']),
    ("fastsmtp_milter_verdicts_total", "Milter answers by milter (its place in --milter, from 0) and verdict.",
     MILTER, [f'milter="{i}",verdict="{v}"' for i in range(MILTERS) for v in MILTER_VERDICTS]),
    ("fastsmtp_milter_failures_total", "Milters down, too slow or breaking the protocol (the default action "
     "applied), by milter.", MILTER_FAILURES, [f'milter="{i}"' for i in range(MILTERS)]),
    ("fastsmtp_milter_unapplied_total", "Milter changes not applied (not supported yet), by milter.",
     MILTER_UNAPPLIED, [f'milter="{i}"' for i in range(MILTERS)]),
    ("fastsmtp_dnsbl_lookup_failures_total", "DNSBL lookups that failed or timed out (counted as not listed).",
     DNSBL_FAILURES, None),
]
_GAUGES: list[tuple[str, str, int]] = [
    ("fastsmtp_journal_bytes", "Octets in journal segments not yet retired.", JOURNAL_BYTES),
    ("fastsmtp_journal_segments", "Journal segments not yet retired.", JOURNAL_SEGMENTS),
    ("fastsmtp_delivery_pending", "Acknowledged messages not yet in every recipient's new/.", DELIVERY_PENDING),
    ("fastsmtp_lmtp_pending", "Acknowledged messages waiting for their LMTP delivery.", LMTP_PENDING),
]
# name, help, and the histogram of each label (one, unlabelled, for most).
_HISTOGRAMS: list[tuple[str, str, list[tuple[str, Histogram]]]] = [
    ("fastsmtp_commit_batch_size", "Messages per group commit.", [("", BATCH_SIZE)]),
    ("fastsmtp_commit_latency_seconds", "Time one group commit takes (write, flush, link).", [("", COMMIT_SECONDS)]),
    ("fastsmtp_time_to_250_seconds", "From the end of a message's data to its 250 reply.", [("", TIME_TO_250)]),
    ("fastsmtp_milter_answer_seconds", "From a step sent to a milter to its answer (the whole body and end of "
     "the message for the end of data), by milter (its place in --milter, from 0).",
     [(f'milter="{i}"', h) for i, h in enumerate(MILTER_SECONDS)]),
    ("fastsmtp_delivery_lag_seconds", "From a message's journal flush (its 250) to its file in new/.",
     [("", DELIVERY_LAG)]),
    ("fastsmtp_lmtp_seconds", "One LMTP delivery attempt: connection (or a kept one), LHLO, the transaction.",
     [("", LMTP_SECONDS)]),
]


def _num(value: float) -> str:
    return repr(float(value)) if value != int(value) else str(int(value))


def render(totals: list[int]) -> bytes:
    """The text exposition format 0.0.4 of summed rows."""
    out: list[str] = []
    for name, help_text, slot, labels in _COUNTERS:
        out.append(f"# HELP {name} {help_text}\n# TYPE {name} counter\n")
        if labels is None:
            out.append(f"{name} {totals[slot]}\n")
        else:
            out.extend(f"{name}{{{label}}} {totals[slot + i]}\n" for i, label in enumerate(labels))
    for name, help_text, slot in _GAUGES:
        out.append(f"# HELP {name} {help_text}\n# TYPE {name} gauge\n{name} {totals[slot]}\n")
    name = "fastsmtp_lmtp_pending_by_target"
    out.append(f"# HELP {name} Acknowledged messages waiting for their LMTP delivery, by the target (its place "
               "in --deliver, from 0) that last failed them; not yet tried: the first.\n# TYPE {name} gauge\n")
    out.extend(f'{name}{{target="{i}"}} {totals[LMTP_PENDING_BY + i]}\n' for i in range(LMTP_TARGETS))
    since = totals[LMTP_OLDEST_MS]
    age = max(0.0, time.time() - since / 1000) if since else 0.0
    out.append("# HELP fastsmtp_lmtp_oldest_pending_seconds How long the oldest message waiting for its LMTP "
               "delivery has waited since its 250.\n# TYPE fastsmtp_lmtp_oldest_pending_seconds gauge\n"
               f"fastsmtp_lmtp_oldest_pending_seconds {_num(round(age, 3))}\n")
    for name, help_text, labelled in _HISTOGRAMS:
        out.append(f"# HELP {name} {help_text}\n# TYPE {name} histogram\n")
        for label, h in labelled:
            inner = label + "," if label else ""
            outer = "{" + label + "}" if label else ""
            cumulative = 0
            for i, bound in enumerate(h.bounds):
                cumulative += totals[h.base + i]
                out.append(f'{name}_bucket{{{inner}le="{_num(bound)}"}} {cumulative}\n')
            cumulative += totals[h.base + len(h.bounds)]
            out.append(f'{name}_bucket{{{inner}le="+Inf"}} {cumulative}\n')
            out.append(f"{name}_sum{outer} {_num(totals[h.sum] / h.scale)}\n{name}_count{outer} {cumulative}\n")
    return "".join(out).encode()


def http_response(head: bytes, body: Callable[[], bytes]) -> bytes:
    """The whole response to one request head (the connection then closes)."""
    method, _, rest = head.partition(b" ")
    target = rest.partition(b" ")[0].partition(b"?")[0]
    if method in (b"GET", b"HEAD") and target == b"/metrics":
        status, ctype, payload = b"200 OK", b"text/plain; version=0.0.4; charset=utf-8", body()
    else:
        status, ctype, payload = b"404 Not Found", b"text/plain; charset=utf-8", b"not found\n"
    headers = b"HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % (
        status, ctype, len(payload))
    return headers if method == b"HEAD" else headers + payload


def bind(address: tuple[str, int]) -> socket.socket:
    """The metrics listener (no SO_REUSEPORT: one process serves it)."""
    host, port = address
    family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                      flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(16)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def serve_http(sock: socket.socket, body: Callable[[], bytes]) -> asyncio.AbstractServer:
    """The responder inside an event loop (``--workers 0``)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
            writer.write(http_response(head, body))
            await asyncio.wait_for(writer.drain(), TIMEOUT)
        except Exception:
            pass  # a bad, slow or vanished scraper: just close
        finally:
            writer.close()

    return await asyncio.start_server(handle, sock=sock, limit=MAX_REQUEST)


class MetricsHTTP:
    """The responder inside the supervisor's select() loop: non-blocking, no thread.

    The supervisor forks, and a fork while another thread holds a lock
    (logging's, stdout's) can deadlock the child; so no thread here.
    """

    def __init__(self, sock: socket.socket, body: Callable[[], bytes]) -> None:
        self.sock = sock
        self._body = body
        # client -> [deadline, bytes received, bytes to send (None: still reading)]
        self._clients: dict[socket.socket, list[Any]] = {}

    def fds(self) -> tuple[list[socket.socket], list[socket.socket]]:
        reading = [self.sock] + [c for c, st in self._clients.items() if st[2] is None]
        writing = [c for c, st in self._clients.items() if st[2] is not None]
        return reading, writing

    def handle(self, readable: list[Any], writable: list[Any]) -> None:
        if self.sock in readable:
            self._accept()
        for client in list(self._clients):
            st = self._clients[client]
            try:
                if st[2] is None and client in readable:
                    self._read(client, st)
                elif st[2] is not None and client in writable:
                    self._write(client, st)
            except OSError:
                self._drop(client)
                continue
            if client in self._clients and time.monotonic() > st[0]:
                self._drop(client)

    def close(self) -> None:
        for client in list(self._clients):
            self._drop(client)
        self.sock.close()

    def _accept(self) -> None:
        for _ in range(MAX_CLIENTS):
            try:
                client, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ECONNABORTED):
                    return
                raise
            if len(self._clients) >= MAX_CLIENTS:
                client.close()
                continue
            client.setblocking(False)
            self._clients[client] = [time.monotonic() + TIMEOUT, b"", None]

    def _read(self, client: socket.socket, st: list[Any]) -> None:
        data = client.recv(4096)
        if not data:
            self._drop(client)
            return
        st[1] += data
        if b"\r\n\r\n" in st[1]:
            st[2] = http_response(st[1], self._body)
        elif len(st[1]) > MAX_REQUEST:
            self._drop(client)

    def _write(self, client: socket.socket, st: list[Any]) -> None:
        sent = client.send(st[2])
        st[2] = st[2][sent:]
        if not st[2]:
            self._drop(client)

    def _drop(self, client: socket.socket) -> None:
        self._clients.pop(client, None)
        client.close()
