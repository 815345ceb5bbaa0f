"""Connection counts per client address, shared by all workers (after Postfix's anvil(8)).

SO_REUSEPORT lets the kernel hand one client's connections to any worker,
so a per-client limit (Postfix's ``smtpd_client_connection_count_limit``,
default 50) holds only if every worker sees every other worker's counts.

Rules of this module:
- The counts live in one anonymous shared mapping that the supervisor
  creates before it forks, so every worker inherits the same pages.  No
  file, no server process, no lock.
- The mapping has one row per worker slot, and each row has exactly one
  writer: the worker in that slot.  The supervisor zeroes the row of a
  worker that has exited, before the slot is used again, so a crash never
  leaks counts.
- A row is a fixed-size open-addressing table (linear probing) of
  ``(16-byte client key, count)`` entries; an entry with count 0 is empty.
  Deletion shifts later entries back (Knuth's Algorithm R), so there are no
  tombstones and a probe always ends at an empty entry.
- A worker's count for a client is the sum over the active rows.  Reads
  take no lock: a read racing a write can be off by the entries being
  written at that instant.  The limit defends against one client taking
  all the sessions; it is not a ledger, and a moment's error is harmless.
- ``connect`` increments first and checks second, so two workers admitting
  one client at the same instant see each other: the limit can be
  undershot for a moment, never exceeded.
"""

from __future__ import annotations

import mmap
import socket
import struct
import zlib

__all__ = ["Anvil", "AnvilRow", "client_key"]

# 16-byte key (an IPv6 address; IPv4 as ::ffff:a.b.c.d), 32-bit count.
# 20 bytes keep every count 4-byte aligned.
_ENTRY = struct.Struct("=16sI")
_ENTRY_SIZE = _ENTRY.size
_V4_MAPPED = b"\0" * 10 + b"\xff\xff"


def client_key(address: str) -> bytes | None:
    """The 16-byte key of an IPv4 or IPv6 address; None for anything else."""
    try:
        # A scope ("fe80::1%eth0") does not make a different client.
        return socket.inet_pton(socket.AF_INET6, address.partition("%")[0])
    except OSError:
        pass
    try:
        return _V4_MAPPED + socket.inet_pton(socket.AF_INET, address)
    except OSError:
        return None


class Anvil:
    """The shared table: ``slots`` rows of ``capacity`` entries each.

    Create it before forking.  The supervisor calls ``activate`` before it
    forks a worker into a slot and ``clear`` after reaping it; the worker
    writes through ``row(slot)``.
    """

    def __init__(self, slots: int, capacity: int) -> None:
        if slots < 1:
            raise ValueError("an anvil needs at least one slot")
        size = 16
        while size < capacity:
            size *= 2
        self.slots = slots
        self.capacity = size
        self._mask = size - 1
        self._row_size = size * _ENTRY_SIZE
        # The header: one "active" byte per slot, so that readers sum only
        # the rows in use.  Rows start on a 64-byte boundary.
        self._header = (slots + 63) // 64 * 64
        # fileno -1 maps anonymous memory with MAP_SHARED: pages that every
        # child forked later shares with this process.  Untouched rows cost
        # address space only.
        self._mm = mmap.mmap(-1, self._header + slots * self._row_size)

    def activate(self, slot: int) -> None:
        self._mm[slot] = 1

    def clear(self, slot: int) -> None:
        """Forget a slot's counts (its worker has exited) and mark it unused."""
        self._mm[slot] = 0
        start = self._header + slot * self._row_size
        self._mm[start : start + self._row_size] = bytes(self._row_size)

    def row(self, slot: int) -> "AnvilRow":
        self.activate(slot)
        return AnvilRow(self, slot)

    def count(self, key: bytes) -> int:
        """Connections from ``key`` over all active slots."""
        return self._count(key, -1)

    def _count(self, key: bytes, skip: int) -> int:
        home = zlib.crc32(key) & self._mask
        active = self._mm[: self.slots]
        total = 0
        for slot, flag in enumerate(active):
            if flag and slot != skip:
                total += self._lookup(self._header + slot * self._row_size, key, home)
        return total

    def _lookup(self, row: int, key: bytes, home: int) -> int:
        mm, mask, unpack = self._mm, self._mask, _ENTRY.unpack_from
        i = home
        for _ in range(self.capacity):
            k, count = unpack(mm, row + i * _ENTRY_SIZE)
            if count == 0:
                return 0
            if k == key:
                return int(count)
            i = (i + 1) & mask
        return 0

    def close(self) -> None:
        self._mm.close()


class AnvilRow:
    """The writer side of one slot: used only by the worker in that slot."""

    def __init__(self, anvil: Anvil, slot: int) -> None:
        self._anvil = anvil
        self._slot = slot
        self._row = anvil._header + slot * anvil._row_size
        # This worker's own counts, and where each key sits in the row.
        self._counts: dict[bytes, int] = {}
        self._where: dict[bytes, int] = {}

    def connect(self, key: bytes) -> int:
        """Count one more connection from ``key``; return the total over all workers."""
        own = self._counts.get(key, 0) + 1
        self._counts[key] = own
        where = self._where.get(key)
        if where is None:
            where = self._insert(key, own)
        else:
            self._write(where, key, own)
        return own + self._anvil._count(key, self._slot)

    def disconnect(self, key: bytes) -> None:
        own = self._counts.get(key, 0) - 1
        if own < 0:
            return
        where = self._where.get(key)
        if own == 0:
            del self._counts[key]
            if where is not None:
                del self._where[key]
                self._delete(where)
            return
        self._counts[key] = own
        if where is not None:
            self._write(where, key, own)

    def own(self, key: bytes) -> int:
        return self._counts.get(key, 0)

    # -- the table ---------------------------------------------------------------

    def _write(self, i: int, key: bytes, count: int) -> None:
        _ENTRY.pack_into(self._anvil._mm, self._row + i * _ENTRY_SIZE, key, count)

    def _read(self, i: int) -> tuple[bytes, int]:
        key, count = _ENTRY.unpack_from(self._anvil._mm, self._row + i * _ENTRY_SIZE)
        return key, count

    def _insert(self, key: bytes, count: int) -> int | None:
        mask = self._anvil._mask
        i = zlib.crc32(key) & mask
        for _ in range(self._anvil.capacity):
            if self._read(i)[1] == 0:
                self._write(i, key, count)
                self._where[key] = i
                return i
            i = (i + 1) & mask
        # The row is full (more distinct clients than it was sized for):
        # this worker still counts the key locally, other workers miss it.
        return None

    def _delete(self, hole: int) -> None:
        # Algorithm R: move each later entry of the run back into the hole
        # unless its home lies cyclically in (hole, j].  The deleted entry is
        # overwritten rather than zeroed first, so a concurrent reader never
        # sees the run cut short before the last hole is cleared.
        mask = self._anvil._mask
        j = hole
        while True:
            j = (j + 1) & mask
            if j == hole:
                break  # a full row: the run went all the way round
            key, count = self._read(j)
            if count == 0:
                break
            home = zlib.crc32(key) & mask
            if (hole < j and hole < home <= j) or (j < hole and (home <= j or home > hole)):
                continue  # already as close to home as it can be
            self._write(hole, key, count)
            self._where[key] = hole
            hole = j
        self._write(hole, bytes(16), 0)
