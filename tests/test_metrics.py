"""Prometheus metrics: counted per worker in shared memory, summed and scraped over real HTTP."""

from __future__ import annotations

import os
import re
import signal
import smtplib
import socket
import urllib.error
import urllib.request
from typing import Callable

import pytest

from fastsmtp import metrics as m
from helpers import RunningServer, wait_for, wait_gone

BODY = b"Subject: metrics\r\n\r\n" + b"x" * 300 + b"\r\n"
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$")


def metrics_url(srv: RunningServer) -> str:
    for line in srv.output:
        if "metrics on " in line:
            return line.split("metrics on ")[1].split()[0]
    raise AssertionError("no 'metrics on' line:\n" + "".join(srv.output))


def scrape(srv: RunningServer) -> dict[str, float]:
    """``name{labels}`` -> value, from a real GET; also checks the content type."""
    with urllib.request.urlopen(metrics_url(srv), timeout=10) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = resp.read().decode()
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        assert match, line
        samples[match[1] + (match[2] or "")] = float(match[3])
    return samples


def send(srv: RunningServer, count: int, rcpts: list[str] | None = None, body: bytes = BODY) -> None:
    with smtplib.SMTP(srv.host, srv.port, timeout=10) as smtp:
        for _ in range(count):
            smtp.sendmail("sender@example.net", rcpts or ["alice@example.com"], body)


def test_rows_are_summed_and_a_retired_row_is_kept() -> None:
    table = m.Metrics(3)
    a, b = table.row(0), table.row(2)
    a[m.MESSAGES_ACCEPTED] += 2
    b[m.MESSAGES_ACCEPTED] += 3
    m.observe(a, m.TIME_TO_250, 0.003)  # in the le="0.005" bucket
    assert table.totals()[m.MESSAGES_ACCEPTED] == 5
    table.retire(0)
    assert a[m.MESSAGES_ACCEPTED] == 0  # the slot is clean for its next worker
    assert table.totals()[m.MESSAGES_ACCEPTED] == 5  # and the total did not go back
    text = table.render().decode()
    assert 'fastsmtp_time_to_250_seconds_bucket{le="0.0025"} 0\n' in text
    assert 'fastsmtp_time_to_250_seconds_bucket{le="0.005"} 1\n' in text
    assert 'fastsmtp_time_to_250_seconds_bucket{le="+Inf"} 1\n' in text
    assert "fastsmtp_time_to_250_seconds_count 1\n" in text


def test_http_answers_only_get_metrics() -> None:
    ok = m.http_response(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", lambda: b"body\n")
    assert ok.startswith(b"HTTP/1.1 200 OK\r\n") and ok.endswith(b"\r\n\r\nbody\n")
    assert b"Content-Type: text/plain; version=0.0.4" in ok
    for head in (b"GET / HTTP/1.1\r\n\r\n", b"POST /metrics HTTP/1.1\r\n\r\n", b"\r\n\r\n"):
        assert m.http_response(head, lambda: b"").startswith(b"HTTP/1.1 404 ")


@pytest.mark.parametrize("workers", ["0", "2"])
def test_counters_match_what_was_sent(server_factory: Callable[..., RunningServer], workers: str) -> None:
    srv = server_factory("--workers", workers, "--metrics", "127.0.0.1:0", "--max-message-size", "2000")
    n = 7
    send(srv, n)
    send(srv, 1, ["alice@example.com", "bob@example.com"])
    with smtplib.SMTP(srv.host, srv.port, timeout=10) as smtp:
        for _ in range(2):
            smtp.ehlo_or_helo_if_needed()
            smtp.mail("sender@example.net")
            assert smtp.rcpt("nobody@example.com")[0] == 550
            smtp.rset()
        # Too large: the size is not declared, so the refusal comes after the data.
        smtp.mail("sender@example.net")
        assert smtp.rcpt("bob@example.com")[0] == 250
        assert smtp.data(b"x" * 3000)[0] == 552
    srv.wait_messages("bob@example.com", 1)
    got = scrape(srv)
    accepted = n + 1
    assert got["fastsmtp_messages_accepted_total"] == accepted
    assert got["fastsmtp_bytes_accepted_total"] == accepted * len(BODY)
    assert got["fastsmtp_recipients_accepted_total"] == n + 2 + 1
    assert got['fastsmtp_recipients_refused_total{code="550"}'] == 2
    assert got['fastsmtp_messages_refused_total{code="552"}'] == 1
    assert got["fastsmtp_connections_accepted_total"] == 3
    assert got["fastsmtp_time_to_250_seconds_count"] == accepted
    assert got['fastsmtp_time_to_250_seconds_bucket{le="+Inf"}'] == accepted
    assert got["fastsmtp_commit_batch_size_sum"] == accepted
    assert got["fastsmtp_commit_batch_size_count"] == got["fastsmtp_commit_batches_total"]
    assert got["fastsmtp_commit_latency_seconds_count"] == got["fastsmtp_commit_batches_total"]
    assert 0 < got["fastsmtp_time_to_250_seconds_sum"] < 60
    assert got["fastsmtp_worker_restarts_total"] == 0
    # The journal: every accepted message delivered from it, with its lag.
    assert wait_for(lambda: scrape(srv)["fastsmtp_delivered_total"] == accepted)
    got = scrape(srv)
    assert got["fastsmtp_delivery_lag_seconds_count"] == accepted
    assert got["fastsmtp_delivery_failures_total"] == 0
    # (While a segment is active the gauges count it: test_journal.py, where
    # the idle time is the test's; here a second of idleness retires it.)
    assert wait_for(lambda: scrape(srv)["fastsmtp_journal_segments"] == 0)  # idle, then retired
    assert scrape(srv)["fastsmtp_journal_bytes"] == 0
    assert scrape(srv)["fastsmtp_delivery_pending"] == 0
    # Anything but GET /metrics is 404.
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(metrics_url(srv).replace("/metrics", "/"), timeout=10)
    assert info.value.code == 404


def test_a_killed_workers_counts_stay_in_the_totals(server_factory: Callable[..., RunningServer]) -> None:
    srv = server_factory("--workers", "2", "--metrics", "127.0.0.1:0")
    # Several sessions, so that the kernel spreads them over both workers.
    for _ in range(6):
        send(srv, 3)
    assert scrape(srv)["fastsmtp_messages_accepted_total"] == 18
    victims = srv.workers()
    assert len(victims) == 2
    os.kill(victims[0], signal.SIGKILL)
    wait_gone(victims[:1])
    assert wait_for(lambda: scrape(srv)["fastsmtp_worker_restarts_total"] == 1)
    got = scrape(srv)
    assert got["fastsmtp_messages_accepted_total"] == 18
    assert got["fastsmtp_time_to_250_seconds_count"] == 18
    assert wait_for(lambda: len(srv.workers()) == 2)
    send(srv, 2)
    assert scrape(srv)["fastsmtp_messages_accepted_total"] == 20


def test_a_slow_or_oversized_scraper_does_not_block(server_factory: Callable[..., RunningServer]) -> None:
    srv = server_factory("--workers", "1", "--metrics", "127.0.0.1:0")
    host, port = metrics_url(srv).split("//")[1].split("/")[0].rsplit(":", 1)
    idle = socket.create_connection((host, int(port)), timeout=10)  # says nothing
    big = socket.create_connection((host, int(port)), timeout=10)
    try:
        big.sendall(b"GET /metrics HTTP/1.1\r\n" + b"X: " + b"y" * (2 * m.MAX_REQUEST))
    except OSError:
        pass
    try:
        send(srv, 1)
        assert scrape(srv)["fastsmtp_messages_accepted_total"] == 1
        big.settimeout(10)
        try:
            answer = big.recv(100)
        except ConnectionResetError:  # closed with the request unread
            answer = b""
        assert answer == b""  # closed without an answer
    finally:
        idle.close()
        big.close()
