"""A signing OpenDKIM milter (Debian's opendkim), started for a test on a free loopback port."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from dnsserver import free_port
from helpers import stop_process, wait_for


@contextlib.contextmanager
def signing_opendkim(home: Path, domain: str = "signed.example", selector: str = "odk") -> Iterator[tuple[int, str]]:
    """OpenDKIM in sign mode for ``domain``: (its port on 127.0.0.1, the key's DNS TXT record).

    Skips the test where opendkim or opendkim-tools is missing (CI installs them).
    """
    genkey = shutil.which("opendkim-genkey") or "/usr/sbin/opendkim-genkey"
    if shutil.which("opendkim") is None or not os.path.exists(genkey):
        pytest.skip("opendkim and opendkim-tools are not installed (CI installs them)")
    subprocess.run([genkey, "-b", "2048", "-d", domain, "-s", selector, "-D", str(home)], check=True, timeout=60)
    record = "".join(re.findall(r'"([^"]*)"', (home / f"{selector}.txt").read_text()))
    port = free_port()
    conf = home / "opendkim.conf"
    conf.write_text(
        f"Syslog no\nMode s\nDomain {domain}\nSelector {selector}\n"
        f"KeyFile {home / (selector + '.private')}\nSocket inet:{port}@127.0.0.1\n"
        "SignatureAlgorithm rsa-sha256\nCanonicalization relaxed/relaxed\nInternalHosts 127.0.0.1\n"
        f"PidFile {home / 'pid'}\nUserID root\nBackground no\n"
        # The test's temp folder sits under the world-writable /tmp.
        "RequireSafeKeys false\n"
    )
    log = open(home / "log", "wb")
    proc = subprocess.Popen(["opendkim", "-f", "-x", str(conf)], stdout=log, stderr=subprocess.STDOUT)

    def listening() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return proc.poll() is not None

    try:
        wait_for(listening, 15, "opendkim to listen")
        assert proc.poll() is None, (home / "log").read_text()
        yield port, record
    finally:
        stop_process(proc)
        log.close()
