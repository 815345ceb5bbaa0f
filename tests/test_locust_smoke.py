"""Smoke test: bench/locustfile.py drives the real server without a failure.

Runs ``locust --headless`` in a subprocess for 10 seconds with 5 users
against a fresh server, then reads Locust's CSV: requests were made, none
failed, and every message Locust counts as accepted is stored.  Skipped only
when locust is not installed (it is in the ``test`` extra).  Locust is not
imported here: importing it monkey-patches the standard library for gevent.
"""

from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

LOCUSTFILE = Path(__file__).resolve().parent.parent / "bench" / "locustfile.py"
RCPT = "postmaster@localhost"

pytestmark = pytest.mark.skipif(importlib.util.find_spec("locust") is None, reason="locust is not installed")


def test_locust_headless_run_has_no_failures(server_factory: object, tmp_path: Path) -> None:
    server = server_factory()  # type: ignore[operator]
    prefix = tmp_path / "smoke"
    cmd = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
        "-u", "5", "-r", "5", "-t", "10s", "--stop-timeout", "5",
        "--host", f"smtp://127.0.0.1:{server.port}", "--csv", str(prefix), "--only-summary",
    ]
    env = {**os.environ, "SMTP_TO": RCPT, "SMTP_SIZE": "2048", "SMTP_PER_CONNECTION": "5"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=90)
    output = proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, output

    with open(f"{prefix}_stats.csv", newline="") as f:
        rows = {row["Name"]: row for row in csv.DictReader(f)}
    total = rows["Aggregated"]
    assert int(total["Request Count"]) > 0, output
    assert int(total["Failure Count"]) == 0, output
    messages = int(rows["message 2048 B"]["Request Count"])
    assert messages > 0, output
    assert int(rows["connect + EHLO"]["Request Count"]) >= messages // 5
    # Every 250 Locust counted is a stored file (a user stopped mid-message may add one more).
    assert len(server.messages(RCPT, count=messages)) >= messages
