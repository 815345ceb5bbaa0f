"""rspamd (Debian's package) as a milter: its proxy worker in milter mode, on a free loopback port.

The instance is the test's own: its own top-level configuration, run,
database and log folders, and a ``local.d`` of its own in place of
/etc/rspamd's.  It scans by itself (``self_scan``), so no normal worker
and no Redis are needed, and it runs offline:

- its resolver is a loopback port where nothing listens, so each lookup
  fails at once instead of waiting for the internet;
- the modules that only ask the internet (DNS lists, fuzzy hashes, ASN,
  phishing feeds, reputation) are off;
- its local rules (GTUBE, MIME, header and envelope checks) run as shipped.

``milter_headers`` adds its result fields to every message, also from
127.0.0.1 (which rspamd would otherwise skip as local), as an admin sets
it up to see the scores in the mailbox.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from dnsserver import free_port
from helpers import stop_process, wait_port

GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"

_CONFIG = """\
.include "$CONFDIR/common.conf"
options {{
    pidfile = "$RUNDIR/rspamd.pid";
    .include "$CONFDIR/options.inc"
    .include(try=true; priority=1,duplicate=merge) "$LOCAL_CONFDIR/local.d/options.inc"
}}
logging {{
    type = "file";
    filename = "$LOGDIR/rspamd.log";
    level = "notice";
}}
worker "rspamd_proxy" {{
    bind_socket = "127.0.0.1:{port}";
    milter = yes;
    timeout = 120s;
    upstream "local" {{
        default = yes;
        self_scan = yes;
    }}
    count = 1;
    spam_header = "X-Spam";
    reject_message = "Spam message rejected";
}}
"""

# Port 9 (discard) on loopback: nothing listens, so a query is refused at once.
_OPTIONS = 'dns { nameserver = ["127.0.0.1:9"]; timeout = 0.1s; retransmits = 1; }\n'
_OFFLINE = ("rbl", "surbl", "fuzzy_check", "asn", "emails", "phishing", "reputation")
_HEADERS = (
    'use = ["x-spamd-result", "x-rspamd-server", "x-rspamd-queue-id", "x-spam-status"];\n'
    "skip_local = false;\nskip_authenticated = false;\n"
)


@contextlib.contextmanager
def running_rspamd(home: Path) -> Iterator[tuple[int, int]]:
    """rspamd's proxy worker in milter mode: (its port on 127.0.0.1, the main process's PID).

    Skips the test where rspamd is not installed (CI installs it).  The first
    start compiles its regular expressions (about 15 s here); a ``home``
    reused keeps that cache.
    """
    binary = shutil.which("rspamd")
    if binary is None:
        pytest.skip("rspamd is not installed (apt-get install rspamd; CI installs it)")
    port = free_port()
    local = home / "local.d"
    for sub in ("local.d", "run", "db", "log"):
        (home / sub).mkdir(parents=True, exist_ok=True)
    (home / "rspamd.conf").write_text(_CONFIG.format(port=port))
    (local / "options.inc").write_text(_OPTIONS)
    for module in _OFFLINE:
        (local / f"{module}.conf").write_text("enabled = false;\n")
    (local / "milter_headers.conf").write_text(_HEADERS)
    command = [binary, "-f", "-c", str(home / "rspamd.conf"), f"--var=LOCAL_CONFDIR={home}",
               f"--var=RUNDIR={home / 'run'}", f"--var=DBDIR={home / 'db'}", f"--var=LOGDIR={home / 'log'}"]
    if os.geteuid() == 0:
        # rspamd will not run as root; Debian's package makes its own user.
        try:
            user = pwd.getpwnam("_rspamd")
        except KeyError:
            pytest.skip("running as root and there is no _rspamd user to run rspamd as")
        for path in [home, *home.rglob("*")]:
            os.chown(path, user.pw_uid, user.pw_gid)
        command += ["-u", "_rspamd", "-g", "_rspamd"]
    out = open(home / "out.txt", "wb")
    proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)

    try:
        wait_port(proc, port, 90, "rspamd to listen")
        assert proc.poll() is None, (home / "out.txt").read_text() + log_of(home)
        yield port, proc.pid
    finally:
        stop_process(proc)
        out.close()


def log_of(home: Path) -> str:
    try:
        return (home / "log" / "rspamd.log").read_text(errors="replace")[-4000:]
    except OSError:
        return ""
