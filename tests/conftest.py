"""Fixtures that run the real server: a subprocess on 127.0.0.1, a real mail root.

The server, the client and the waits they use live in helpers.py; the
names below are re-exported for the modules that still import them from
here.  Every server started here is stopped by its own PID, and every
client socket has a timeout, so no test can hang the run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import pytest

# The Dovecot fixtures (a Dovecot of the tests' own): dovecotrun.py, dovecotlmtp.py.
from dovecotlmtp import lmtp_dovecot as lmtp_dovecot
from dovecotlmtp import lmtp_dovecot_tempfail as lmtp_dovecot_tempfail
from dovecotlmtp import proxy_dovecot as proxy_dovecot
from dovecotrun import mail_user as mail_user
from dovecotrun import root_dir as root_dir
from helpers import HOSTNAME as HOSTNAME
from helpers import LOOPS as LOOPS
from helpers import MAILBOXES as MAILBOXES
from helpers import Client as Client
from helpers import RunningServer as RunningServer
from helpers import children as children
from helpers import greeted
from helpers import start_server as start_server
from helpers import wait_gone as wait_gone


@pytest.fixture(params=LOOPS)
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RunningServer]:
    """A fresh server per test, under uvloop and under stdlib asyncio."""
    srv = start_server(tmp_path / "mail", loop=request.param)
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[Callable[..., RunningServer]]:
    """Start servers with extra flags; all are stopped at the end of the test."""
    started: list[RunningServer] = []

    def make(*args: str, loop: str = "uvloop", mail_root: Path | None = None) -> RunningServer:
        srv = start_server(mail_root or tmp_path / "mail", *args, loop=loop)
        started.append(srv)
        return srv

    yield make
    for srv in started:
        srv.stop()


@pytest.fixture
def client(server: RunningServer) -> Iterator[Client]:
    """A greeted session on the ``server`` fixture's server."""
    c = greeted(server)
    try:
        yield c
    finally:
        c.close()
