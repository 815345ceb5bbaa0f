"""The shared per-client connection counts: keys, rows, deletion, overflow, fork."""

from __future__ import annotations

import os

from hypothesis import given, settings
from hypothesis import strategies as st

from fastsmtp.anvil import Anvil, client_key


def test_client_keys() -> None:
    v4 = client_key("192.0.2.7")
    assert v4 is not None and len(v4) == 16
    # A dual-stack socket reports IPv4 clients as IPv4-mapped IPv6: one client.
    assert client_key("::ffff:192.0.2.7") == v4
    assert client_key("2001:db8::1") == client_key("2001:db8:0::1")
    assert client_key("fe80::1%eth0") == client_key("fe80::1")
    assert client_key("2001:db8::1") != v4
    assert client_key("unknown") is None
    assert client_key("") is None


def test_counts_add_up_over_rows() -> None:
    anvil = Anvil(4, 64)
    a, b = anvil.row(0), anvil.row(1)
    key = client_key("192.0.2.1")
    other = client_key("192.0.2.2")
    assert key is not None and other is not None
    assert a.connect(key) == 1
    assert b.connect(key) == 2
    assert a.connect(key) == 3
    assert b.connect(other) == 1
    assert anvil.count(key) == 3
    a.disconnect(key)
    assert anvil.count(key) == 2
    assert a.own(key) == 1 and b.own(key) == 1
    # Disconnecting more than was connected changes nothing.
    b.disconnect(other)
    b.disconnect(other)
    assert anvil.count(other) == 0


def test_clearing_a_dead_workers_row_forgets_its_counts() -> None:
    anvil = Anvil(2, 64)
    a, b = anvil.row(0), anvil.row(1)
    key = client_key("198.51.100.9")
    assert key is not None
    a.connect(key)
    for _ in range(5):
        b.connect(key)
    assert anvil.count(key) == 6
    anvil.clear(1)  # what the supervisor does when it reaps worker b
    assert anvil.count(key) == 1
    # The slot's next worker starts from nothing.
    assert anvil.row(1).connect(key) == 2


def test_inactive_rows_are_not_read() -> None:
    anvil = Anvil(3, 64)
    key = client_key("203.0.113.5")
    assert key is not None
    anvil.row(2).connect(key)
    anvil._mm[2] = 0  # marked unused: readers skip it
    assert anvil.count(key) == 0


def test_a_full_row_still_counts_locally() -> None:
    anvil = Anvil(2, 16)
    row = anvil.row(0)
    keys = [client_key(f"10.0.0.{i}") for i in range(40)]
    for key in keys:
        assert key is not None
        assert row.connect(key) == 1
    for key in keys:
        assert key is not None
        assert row.own(key) == 1
    # The first 16 are visible to other workers; the rest only here.
    assert sum(anvil.count(k) for k in keys if k is not None) == 16
    for key in keys:
        assert key is not None
        row.disconnect(key)
    assert all(anvil.count(k) == 0 for k in keys if k is not None)
    # Freed entries take new keys again.
    fresh = client_key("10.1.0.1")
    assert fresh is not None
    row.connect(fresh)
    assert anvil.count(fresh) == 1


# Few keys in a small table: long probe runs, wrap-around and shifting
# deletions happen all the time.
KEYS = [client_key(f"192.0.2.{i}") for i in range(12)]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1), st.integers(0, len(KEYS) - 1), st.booleans()), max_size=200))
def test_counts_match_a_dict_whatever_the_order(ops: list[tuple[int, int, bool]]) -> None:
    anvil = Anvil(2, 16)
    rows = [anvil.row(0), anvil.row(1)]
    model = [dict.fromkeys(range(len(KEYS)), 0) for _ in rows]
    for r, k, up in ops:
        key = KEYS[k]
        assert key is not None
        if up:
            total = rows[r].connect(key)
            model[r][k] += 1
            assert total == model[0][k] + model[1][k]
        elif model[r][k]:
            rows[r].disconnect(key)
            model[r][k] -= 1
        for i, key in enumerate(KEYS):
            assert key is not None
            assert anvil.count(key) == model[0][i] + model[1][i]


def test_rows_are_shared_with_forked_workers() -> None:
    anvil = Anvil(2, 64)
    key = client_key("192.0.2.77")
    assert key is not None
    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the "worker": three connections in slot 1
        try:
            row = anvil.row(1)
            for _ in range(3):
                row.connect(key)
            os.write(ready_w, b"x")
            os.read(done_r, 1)
        finally:
            os._exit(0)
    try:
        assert os.read(ready_r, 1) == b"x"
        mine = anvil.row(0)
        assert mine.connect(key) == 4
        assert anvil.count(key) == 4
    finally:
        os.write(done_w, b"x")
        _, status = os.waitpid(pid, 0)
        for fd in (ready_r, ready_w, done_r, done_w):
            os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0
    anvil.clear(1)
    assert anvil.count(key) == 1
