"""A signing OpenDKIM milter (Debian's opendkim), started for a test on a free loopback port."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from dnsserver import free_port
from helpers import stop_process, wait_port


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
    with _running(home, port, f"Mode s\nDomain {domain}\nSelector {selector}\n"
                  f"KeyFile {home / (selector + '.private')}\nSignatureAlgorithm rsa-sha256\n"
                  "Canonicalization relaxed/relaxed\nInternalHosts 127.0.0.1\n"):
        yield port, record


@contextlib.contextmanager
def verifying_opendkim(home: Path, dns_port: int, authserv_id: str = "verifier.test.example") -> Iterator[int]:
    """OpenDKIM in verify mode: its port on 127.0.0.1.

    It looks keys up through its libunbound resolver, sent to the test's
    DNS server on 127.0.0.1:``dns_port`` and nowhere else; it adds an
    Authentication-Results field with ``authserv_id``.
    """
    if shutil.which("opendkim") is None:
        pytest.skip("opendkim is not installed (CI installs it)")
    unbound = home / "unbound.conf"
    # libunbound skips loopback servers unless told otherwise.
    unbound.write_text(f'server:\n\tdo-not-query-localhost: no\nforward-zone:\n\tname: "."\n'
                       f"\tforward-addr: 127.0.0.1@{dns_port}\n")
    port = free_port()
    # 127.0.0.1 is our server's address here: not an internal host, so its mail is verified, not signed.
    with _running(home, port, f"Mode v\nAuthservID {authserv_id}\nResolverConfiguration {unbound}\n"
                  "InternalHosts 192.0.2.1\nAlwaysAddARHeader yes\n"):
        yield port


@contextlib.contextmanager
def _running(home: Path, port: int, settings: str) -> Iterator[None]:
    conf = home / "opendkim.conf"
    conf.write_text(
        f"Syslog no\n{settings}Socket inet:{port}@127.0.0.1\n"
        f"PidFile {home / 'pid'}\nUserID root\nBackground no\n"
        # The test's temp folder sits under the world-writable /tmp.
        "RequireSafeKeys false\n"
    )
    log = open(home / "log", "wb")
    proc = subprocess.Popen(["opendkim", "-f", "-x", str(conf)], stdout=log, stderr=subprocess.STDOUT)

    try:
        wait_port(proc, port, 15, "opendkim to listen")
        assert proc.poll() is None, (home / "log").read_text()
        yield
    finally:
        stop_process(proc)
        log.close()
