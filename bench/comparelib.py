"""What bench/compare.py measures and how it reports it: scenarios, measurements, tables.

compare.py starts the servers, drives the load and reads the CPU; this
module holds what does not touch a process, so that both stay short:

- the load's constants and the server names (``SERVERS``, ``DEFAULT_SERVERS``,
  ``BASE_SERVER``), and the private Postfix instance's configuration
  (``postfix_main_cf``, ``postfix_master_cf``, ``POSTFIX_MAILBOXES``);
- ``Scenario`` and ``parse_scenarios`` (``--scenarios``), ``Measurement``
  (one server under one scenario in one round) and ``Baseline``
  (``--baseline``: an older tree run as ``fastsmtp-base-off``);
- the report: ``medians`` over the rounds, the method text, and the tables.
  The tables take ``cell[(scenario label, server name)]``: the medians
  ("rate": messages/s, "cpu": server CPU seconds per 1,000 messages, "user",
  "client", "p50", "p99", "drain": seconds from the end of the load until
  every acknowledged message was in new/; "cpu_lo"/"cpu_hi": the best and
  worst round's "cpu") and ``headings[server name]``.

Messages per server CPU-second are ``1000 / cpu``: the number the goals are
set in, because on a shared 2-core machine messages/s depends on what else
runs, while CPU per message depends much less on it.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import os
import platform
import pwd
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from benchlib import FASTSMTP_BENCH_FLAGS, git_commit  # bench/ is on sys.path: the script's own folder
from benchlib import median as med

SECTION = "## Side by side: fastsmtp, aiosmtpd, smtp-sink"

DOMAIN = "bench.example"
RCPT = f"bench@{DOMAIN}"
MAIL_FROM = "loadgen@example.net"
CLIENT_NAME = "client.bench.example"
REPLY_TIMEOUT = 30.0
KiB = 1024
# fastsmtp's flags besides --fsync (benchlib adds --listen, --mail-root and FASTSMTP_BENCH_FLAGS).
# The per-IP limit is off (0), as in the measurement: every session comes from
# 127.0.0.1.  The log level is given, not left to the default, so that every tree
# measured writes its per-message and per-connection lines (info) whatever its default.
FASTSMTP_ARGS = ("--hostname", "mx.bench.example", "--workers", "1", "--max-connections-per-ip", "0",
                 "--log-level", "info")

# name -> (table heading, what it is)
SERVERS: dict[str, tuple[str, str]] = {
    "fastsmtp-off": ("fastsmtp off", "fastsmtp serve --workers 1 --fsync off"),
    "fastsmtp-batch": ("fastsmtp batch", "fastsmtp serve --workers 1 --fsync batch"),
    "fastsmtp-always": ("fastsmtp always", "fastsmtp serve --workers 1 --fsync always"),
    "aiosmtpd-sink": ("aiosmtpd sink", "aiosmtpd, handle_DATA returns 250 OK"),
    "aiosmtpd-maildir": ("aiosmtpd Maildir", "aiosmtpd, handle_DATA does mailbox.Maildir.add (no fsync)"),
    "postfix-maildir": ("Postfix durable Maildir",
                        "Postfix smtpd → cleanup (fsync) → qmgr → virtual(8) into Maildir"),
    "smtp-sink": ("smtp-sink", "Postfix smtp-sink (C, discards)"),
}
# Without --servers.  fastsmtp-always and postfix-maildir only when named: they
# add run time to the full set, and the Postfix instance needs root.
DEFAULT_SERVERS = ("fastsmtp-off", "fastsmtp-batch", "aiosmtpd-sink", "aiosmtpd-maildir", "smtp-sink")
POSTFIX_SERVER = "postfix-maildir"
# Only with --baseline TREE; its heading gets the tree's commit (see Baseline).
BASE_SERVER = "fastsmtp-base-off"
BASE_HEADING = "fastsmtp off @{label}"
DRIVERS = ("smtp-source", "loadgen")
SESSIONS = (1, 50)
SIZES = (1 * KiB, 100 * KiB)
PER_CONNECTION = {"one": 1, "many": 100}  # loadgen's K; smtp-source has one (no -d) or all (-d)

# The medians of one scenario and server, by (scenario label, server name).
Cell = dict[tuple[str, str], dict[str, float]]


def sink_user() -> str:
    for name in ("nobody", pwd.getpwuid(os.getuid()).pw_name):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    return "root"


@dataclass(frozen=True)
class Baseline:
    """An older fastsmtp tree, run as fastsmtp-base-off with PYTHONPATH=TREE/src."""

    src: Path
    label: str  # its commit, for the heading "fastsmtp off @LABEL"

    @property
    def env(self) -> dict[str, str]:
        # Replaces any PYTHONPATH of the caller's (which may point at the tree under test).
        return {"PYTHONPATH": str(self.src)}


# -- scenarios and measurements -------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    driver: str
    sessions: int
    size: int
    per_conn: str  # "one" | "many"

    @property
    def label(self) -> str:
        size = f"{self.size // KiB} KiB" if self.size % KiB == 0 else f"{self.size} B"
        per = "1/conn" if self.per_conn == "one" else ("many/conn" if self.driver == "smtp-source" else "100/conn")
        return f"{self.driver}, {self.sessions} sess, {size}, {per}"


SIZE_UNITS = {"": 1, "b": 1, "k": KiB, "kib": KiB, "m": KiB * KiB, "mib": KiB * KiB}
MAX_SESSIONS = 1000  # each session is a descriptor on both sides; the limit is raised to 4096


def parse_size(text: str) -> int:
    found = re.fullmatch(r"(\d+)\s*([a-z]*)", text.strip().lower())
    if not found or found.group(2) not in SIZE_UNITS or int(found.group(1)) == 0:
        raise ValueError(f"size {text!r}: give bytes or a count with k or m (1k, 100k)")
    return int(found.group(1)) * SIZE_UNITS[found.group(2)]


def parse_scenarios(spec: str, drivers: list[str]) -> list[Scenario]:
    """Scenarios from "DRIVER:SESSIONS:SIZE:PER,..."; ``*`` in a field stands for its default values.

    The defaults are ``drivers`` (from --drivers), SESSIONS, SIZES and
    PER_CONNECTION's keys.  The order is the order given, without repeats.
    """
    out: list[Scenario] = []
    for item in (x.strip() for x in spec.split(",")):
        if not item:
            continue
        parts = item.split(":")
        if len(parts) != 4:
            raise ValueError(f"scenario {item!r}: want DRIVER:SESSIONS:SIZE:PER, e.g. smtp-source:20:1k:many")
        d, n, z, p = parts
        ds = drivers if d == "*" else [d]
        ns = list(SESSIONS) if n == "*" else [int(n)] if n.isdigit() else []
        zs = list(SIZES) if z == "*" else [parse_size(z)]
        ps = list(PER_CONNECTION) if p == "*" else [p]
        if not ns or not all(1 <= x <= MAX_SESSIONS for x in ns):
            raise ValueError(f"scenario {item!r}: sessions must be 1 to {MAX_SESSIONS}")
        if not set(ds) <= set(DRIVERS) or not set(ps) <= set(PER_CONNECTION):
            raise ValueError(f"scenario {item!r}: driver one of {', '.join(DRIVERS)}; "
                             f"per connection one of {', '.join(PER_CONNECTION)}")
        for sc in (Scenario(*x) for x in itertools.product(ds, ns, zs, ps)):
            if sc not in out:
                out.append(sc)
    if not out:
        raise ValueError("--scenarios selects nothing")
    return out


@dataclass
class Measurement:
    scenario: Scenario
    server: str
    round: int
    accepted: int = 0
    elapsed: float = 0.0
    server_cpu: float = 0.0  # user + system
    server_user: float = 0.0
    client_cpu: float = 0.0
    clock_stopped: bool = False  # smtp-source hit the time cap (its count may be high by up to one per session)
    p50: float | None = None
    p99: float | None = None
    # Seconds from the end of the load until every acknowledged message was in new/
    # (Postfix: and its queue empty); None for a sink or when it did not get there.
    drain: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.accepted / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def delivered_rate(self) -> float:
        """Messages per second from the start of the load until the last one was in new/."""
        if self.drain is None or self.elapsed + self.drain <= 0:
            return float("nan")
        return self.accepted / (self.elapsed + self.drain)

    @property
    def cpu_per_1k(self) -> float:
        return 1000 * self.server_cpu / self.accepted if self.accepted else float("nan")

    @property
    def user_per_1k(self) -> float:
        return 1000 * self.server_user / self.accepted if self.accepted else float("nan")

    @property
    def client_per_1k(self) -> float:
        return 1000 * self.client_cpu / self.accepted if self.accepted else float("nan")


# -- the private Postfix instance (postfix-maildir) -------------------------------------

# virtual_mailbox_maps: recipient -> Maildir under virtual_mailbox_base (the trailing
# slash makes it a Maildir), the same folder every other Maildir server writes.
POSTFIX_MAILBOXES = f"{RCPT} {DOMAIN}/{RCPT.split('@')[0]}/\n"

# Only what a private loopback instance needs, and what would slow a local
# benchmark without being durability (DNS, peer name lookups, connection limits,
# alias and local lookups).  Nothing here touches how cleanup(8) and virtual(8)
# write and fsync: that is Postfix as shipped.
_POSTFIX_MAIN_CF = """\
# A private instance started by bench/compare.py; nothing of the system's Postfix.
compatibility_level = {compat}
queue_directory = {queue}
data_directory = {data}
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
myhostname = postfix.bench.example
mydestination =
relay_domains =
local_recipient_maps =
alias_maps =
alias_database =
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = reject_unauth_destination
smtpd_recipient_restrictions = permit_mynetworks, reject
virtual_mailbox_domains = {domain}
virtual_mailbox_base = {mail_root}
virtual_mailbox_maps = texthash:{config}/vmailbox
virtual_uid_maps = static:{uid}
virtual_gid_maps = static:{gid}
# Bounces and anything else off this host go nowhere.
default_transport = error:5.3.0 this benchmark delivers nothing off this host
relay_transport = $default_transport
disable_dns_lookups = yes
smtp_host_lookup = native
lmtp_host_lookup = native
smtpd_peername_lookup = no
smtpd_client_connection_rate_limit = 0
smtpd_client_connection_count_limit = 0
default_process_limit = {process_limit}
# master -s keeps its stdout: the log goes to the benchmark's server.log.
maillog_file = /dev/stdout
"""

# The smtpd listener on loopback and the internal services it needs, nothing
# chrooted (the stock master.cf's other services are not used here).
_POSTFIX_MASTER_CF = """\
{host}:{port} inet n - n - - smtpd
cleanup   unix  n - n - 0 cleanup
qmgr      unix  n - n 300 1 qmgr
rewrite   unix  - - n - - trivial-rewrite
bounce    unix  - - n - 0 bounce
defer     unix  - - n - 0 bounce
trace     unix  - - n - 0 bounce
verify    unix  - - n - 1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n - - proxymap
showq     unix  n - n - - showq
error     unix  - - n - - error
retry     unix  - - n - - error
discard   unix  - - n - - discard
anvil     unix  - - n - 1 anvil
scache    unix  - - n - 1 scache
virtual   unix  - n n - - virtual
postlog   unix-dgram n - n - 1 postlogd
"""


def postfix_main_cf(*, compat: str, queue: Path, data: Path, config: Path, mail_root: Path, uid: int, gid: int,
                    sessions: int) -> str:
    """main.cf of the private instance; its process limit leaves room for ``sessions`` smtpd processes."""
    return _POSTFIX_MAIN_CF.format(compat=compat, queue=queue, data=data, config=config, mail_root=mail_root,
                                   domain=DOMAIN, uid=uid, gid=gid, process_limit=max(100, 2 * sessions))


def postfix_master_cf(host: str, port: int) -> str:
    return _POSTFIX_MASTER_CF.format(host=host, port=port)


def smtp_source_header_len() -> int:
    """Bytes smtp-source puts in front of its -l payload (From, To, Date, Message-Id, blank line)."""
    date = "Date: Sat, 28 Nov 2026 17:01:13 +0000 (UTC)\r\n"
    msgid = f"Message-Id: <754e.0003.0001@{CLIENT_NAME}>\r\n"
    return len(f"From: <{MAIL_FROM}>\r\nTo: <{RCPT}>\r\n") + len(date) + len(msgid) + 2


# -- report ----------------------------------------------------------------------------


@dataclass
class RunInfo:
    """What the report says about the run besides the measurements."""

    command: str
    headings: dict[str, str]  # server name -> its table heading
    origins: dict[str, str]  # "fastsmtp" / BASE_SERVER -> the package folder and parser it imported
    installed: list[str]
    wall: float = 0.0
    skipped: list[str] = field(default_factory=list)
    probes: tuple[float, float] = (float("nan"), float("nan"))
    loads: tuple[str, str] = ("", "")


def medians(runs: list[Measurement], scenarios: list[Scenario], servers: list[str]) -> Cell:
    """Per (scenario label, server): the medians over the rounds, and the best and worst round's CPU."""
    cell: Cell = {}
    for sc in scenarios:
        for s in servers:
            rs = [r for r in runs if r.scenario == sc and r.server == s]
            cpus = [r.cpu_per_1k for r in rs if r.cpu_per_1k == r.cpu_per_1k]
            if not rs:
                continue
            cell[sc.label, s] = {
                "rate": med([r.rate for r in rs]),
                "cpu": med(cpus),
                "cpu_lo": min(cpus, default=float("nan")),
                "cpu_hi": max(cpus, default=float("nan")),
                "user": med([r.user_per_1k for r in rs]),
                "client": med([r.client_per_1k for r in rs]),
                "p50": med([r.p50 for r in rs if r.p50 is not None]),
                "p99": med([r.p99 for r in rs if r.p99 is not None]),
                "drain": med([r.drain for r in rs if r.drain is not None]),
                "delivered": med([r.delivered_rate for r in rs if r.drain is not None]),
            }
    return cell


def method(args: argparse.Namespace, info: RunInfo) -> list[str]:
    """The "what it ran" list: every command, the bounds and the state of the machine."""
    count_text = f"{args.count_1k:,} (up to 1 KiB) / {args.count_100k:,} (larger)"
    probes, loads = info.probes, info.loads
    lines = [
        f"- fastsmtp: `python -m fastsmtp serve --listen 127.0.0.1:0 --mail-root ROOT "
        f"{' '.join(FASTSMTP_BENCH_FLAGS + FASTSMTP_ARGS)} --fsync off|batch|always` (uvloop; a supervisor and "
        "one worker; no greeting delay, else one-message-per-connection runs would measure it)"
        + (f"; it imported {info.origins['fastsmtp']}." if "fastsmtp" in info.origins else "."),
    ]
    if args.baseline_tree is not None and BASE_SERVER in info.origins:
        lines.append(f"- {info.headings[BASE_SERVER]}: the same command with `--fsync off`, the same interpreter, "
                     f"and `PYTHONPATH={args.baseline_tree.src}`; it imported {info.origins[BASE_SERVER]}.")
    lines += [
        "- aiosmtpd: `python bench/compare.py --serve-aiosmtpd sink|maildir --mail-root ROOT`: "
        "`loop.create_server(lambda: SMTP(handler), ...)` on stdlib asyncio; the sink's `handle_DATA` returns "
        "`\"250 OK\"`, the Maildir one calls `mailbox.Maildir(ROOT/...).add(envelope.content)` "
        "(no fsync, on the event loop). aiosmtpd does not offer PIPELINING, so loadgen waits for every reply there.",
        f"- smtp-sink: `smtp-sink -u {sink_user()} 127.0.0.1:PORT 1000`.",
    ]
    if POSTFIX_SERVER in args.server_list:
        lines.append(
            "- Postfix durable Maildir: a private instance, fresh for every run: `postfix -c ETC check` "
            "(makes its queue folders), then `master -c ETC -s` as the benchmark's child, stopped by SIGTERM to "
            "that PID. ETC/main.cf: its own `queue_directory` and `data_directory` in the run's folder, "
            "`inet_interfaces = 127.0.0.1`, `mydestination =`, `virtual_mailbox_domains = "
            f"{DOMAIN}`, `virtual_mailbox_base = ROOT`, `virtual_mailbox_maps = texthash:ETC/vmailbox` "
            f"(`{POSTFIX_MAILBOXES.strip()}`: Maildir), `virtual_uid_maps`/`virtual_gid_maps = static:` "
            f"{sink_user()}'s ids (the owner of ROOT), `mynetworks = 127.0.0.0/8`, `smtpd_recipient_restrictions = "
            "permit_mynetworks, reject`, no DNS or peer-name lookups, no connection limits, `default_process_limit` "
            "≥ 100, no alias or local lookups, `maillog_file = /dev/stdout`; ETC/master.cf: smtpd on "
            "`127.0.0.1:PORT` only, the internal services, nothing chrooted. Durability as shipped: cleanup(8) "
            "fsyncs every queue file before smtpd's 250, virtual(8) fsyncs every Maildir file before linking it "
            "into new/ (neither fsyncs the folder), and `in_flow_delay` (1 s) slows acceptance when delivery "
            "falls behind. Delivery goes on after the load: the final CPU reading waits until the queue is "
            "empty and new/ holds every acknowledged message (its time is in \"Delivery\" below); "
            "messages/s is acceptance, as for every server.")
    lines += [
        f"- smtp-source: `smtp-source -c -s SESSIONS -l LEN -m COUNT [-d] -f {MAIL_FROM} -t {RCPT} "
        f"-M {CLIENT_NAME} 127.0.0.1:PORT`; LEN is the size minus its {smtp_source_header_len()} header bytes; "
        "it sends HELO, so no pipelining; `-d` (many per connection) keeps each session on one connection for "
        "the whole run. It has no duration option, so COUNT is 1.3 × what the warm-up's rate gives in "
        f"{args.duration:g} s (capped as below; the warm-up is an unmeasured smtp-source run of "
        f"max({4 * args.warmup} at 1 KiB or {args.warmup} at 100 KiB, 2 × sessions) messages); a run still "
        f"going after {2 * args.duration + 2:g} s is stopped by its PID and its `-c` count is taken "
        "(listed under anomalies). Messages/s is its count over its run time.",
        f"- loadgen: `python bench/loadgen.py --port PORT --connections SESSIONS --messages COUNT "
        f"--duration {args.duration:g} --size SIZE --per-connection 1|100 --pipelining --from {MAIL_FROM} "
        f"--to {RCPT}`, run in the benchmark's process (`loadgen.run_sync`).",
        f"- COUNT: at most {count_text}; loadgen also stops claiming messages after {args.duration:g} s "
        f"(and finishes those in flight). Its warm-up: {args.warmup} unmeasured messages over up to 5 sessions.",
        "- Server CPU: utime+stime from /proc/PID/stat over the server process and its children "
        "(fastsmtp's supervisor plus worker), read before and after the measured load. Postfix's children "
        "(smtpd, cleanup, qmgr, trivial-rewrite, virtual) come and go: its figure is the master's "
        "utime+stime+cutime+cstime (the children it has reaped) plus every live child's utime+stime; each "
        "reading waits until every acknowledged message is in new/ (for Postfix: and its queue is empty), "
        "so the CPU of delivery is in it.",
        "- The machine is shared (2 cores; other test runs were going on): trust only differences "
        "over ~20%. Client and server share the two cores, so the client's CPU slows the server too.",
        f"- Load average (1, 5, 15 min) before: {loads[0]}; after: {loads[1]}. Creating a 1 KiB file in a new "
        f"folder took {probes[0]:.3f} ms before the runs and {probes[1]:.3f} ms after them (the ext4 "
        "state after deletions, DESIGN.md).",
    ]
    if info.installed:
        lines.append(f"- Installed first: {', '.join(info.installed)}.")
    return lines


def report(runs: list[Measurement], scenarios: list[Scenario], servers: list[str], args: argparse.Namespace,
           info: RunInfo) -> str:
    cell = medians(runs, scenarios, servers)
    labels = [sc.label for sc in scenarios]
    now = datetime.datetime.now(datetime.timezone.utc)
    lines = [
        SECTION,
        "",
        f"Date: {now:%Y-%m-%d %H:%M} UTC. Commit: `{git_commit()}`. nproc: {os.cpu_count()}. "
        f"Linux {platform.release()}, Python {platform.python_version()}. Total run time {info.wall:.0f} s "
        "(before the final deletion of the mail roots)"
        f"{' (quick mode)' if args.quick else ''}.",
        "",
        "Command:",
        "",
        f"    {info.command}",
        "",
        "What it ran, each server fresh for every run (fresh mail root, its own loopback port), "
        f"{args.rounds} round(s){', servers interleaved within each scenario, medians shown' if args.rounds > 1 else ''}:",
        "",
        *method(args, info),
    ]
    if args.scenarios or args.baseline_tree is not None:
        lines += figure(cell, labels, servers, info.headings, args.rounds)
    lines += tables(cell, labels, [sc.label for sc in scenarios if sc.driver == "loadgen"],
                                   servers, info.headings)
    lines += goals(cell, labels, servers)
    lines += journal_goals(cell, info.headings)
    notes = [f"round {r.round}, {r.scenario.label}, {info.headings[r.server]}: {n}" for r in runs for n in r.notes]
    lines += ["", "Anomalies: " + ("none (no failures, stored = acknowledged, no server errors)." if not notes else "")]
    lines += [f"- {n}" for n in notes]
    if info.skipped:
        lines += ["", f"Skipped for the time budget ({args.budget:g} s): {len(info.skipped)} run(s): "
                  + "; ".join(info.skipped[:10]) + (" …" if len(info.skipped) > 10 else "")]
    return "\n".join(lines) + "\n"


# -- tables ---------------------------------------------------------------------------


# The goals for the key figure, in messages per server CPU-second:
# fastsmtp --fsync off against the baseline tree, and against aiosmtpd-Maildir.
FIGURE_GOALS: dict[str, float] = {BASE_SERVER: 3.0, "aiosmtpd-maildir": 4.0}
REFERENCE = "fastsmtp-off"


def fmt_rate(x: float) -> str:
    return "–" if x != x else f"{x:,.0f}"


def fmt_num(x: float | None, digits: int = 3) -> str:
    return "–" if x is None or x != x else f"{x:.{digits}f}"


def per_cpu_second(cpu_per_1k: float) -> float:
    """Messages per server CPU-second from CPU seconds per 1,000 messages (NaN stays NaN)."""
    return 1000 / cpu_per_1k if cpu_per_1k == cpu_per_1k and cpu_per_1k > 0 else float("nan")


def _table(title: str, heads: Sequence[str], rows: Sequence[tuple[str, Sequence[str]]]) -> list[str]:
    lines = ["", title, "", "| scenario | " + " | ".join(heads) + " |", "|---|" + "---:|" * len(heads)]
    return lines + [f"| {label} | " + " | ".join(cells) + " |" for label, cells in rows]


def tables(cell: Cell, scenarios: Sequence[str], latency_scenarios: Sequence[str], servers: Sequence[str],
           headings: dict[str, str]) -> list[str]:
    """Messages/s, server CPU, its user part, loadgen's latency and the client's CPU, scenario by server."""
    heads = [headings[s] for s in servers]

    def rows(fmt: Callable[[dict[str, float]], str], labels: Sequence[str]) -> list[tuple[str, list[str]]]:
        return [(sc, [fmt(cell[sc, s]) if (sc, s) in cell else "–" for s in servers]) for sc in labels]

    def lat(c: dict[str, float]) -> str:
        return f"{c['p50']:.2f} / {c['p99']:.2f} ms"

    out = _table("### Messages per second", heads, rows(lambda c: fmt_rate(c["rate"]), scenarios))
    out += _table("### Server CPU seconds per 1,000 messages", heads,
                  rows(lambda c: fmt_num(c["cpu"]), scenarios))
    out += _table("### Of which user-mode CPU (the rest is system time: sockets, file creation)", heads,
                  rows(lambda c: fmt_num(c["user"]), scenarios))
    if latency_scenarios:  # smtp-source does not measure it
        out += _table("### Time to 250 after the end of the content, p50 / p99 (loadgen)", heads,
                      rows(lat, latency_scenarios))
    out += _table("### Load generator CPU seconds per 1,000 messages", heads,
                  rows(lambda c: fmt_num(c["client"]), scenarios))
    stores = [s for s in servers if any(t == s and c["drain"] == c["drain"] for (_, t), c in cell.items())]
    if stores:  # the Maildir servers; Postfix goes on delivering after the load
        out += _table("### Delivery: seconds from the end of the load until every acknowledged message was in new/ "
                      "(Postfix: and its queue empty), and messages/s counted to that point",
                      [headings[s] for s in stores],
                      [(sc, [f"{cell[sc, s]['drain']:.2f} s, {fmt_rate(cell[sc, s]['delivered'])}/s"
                             if (sc, s) in cell and cell[sc, s]["drain"] == cell[sc, s]["drain"] else "–"
                             for s in stores]) for sc in scenarios])
    return out


def goals(cell: Cell, scenarios: Sequence[str], servers: Sequence[str]) -> list[str]:
    """Per scenario: the ratios the first speed goals were set in (needs all five standard servers)."""
    want = {"fastsmtp-off", "fastsmtp-batch", "aiosmtpd-sink", "aiosmtpd-maildir", "smtp-sink"}
    if not want <= set(servers):
        return []
    lines = ["", "### Against the goals", "",
             "Messages per server CPU-second are 1000 / (CPU s per 1k). Goals: fastsmtp off ≥ 3× aiosmtpd's "
             "messages per server CPU-second (A: against the sink handler, B: against the Maildir handler); "
             "fastsmtp off ≥ 0.5× smtp-sink's messages/s (C); fastsmtp batch ahead of aiosmtpd Maildir in "
             "messages/s (D).",
             "",
             "| scenario | A: off / aiosmtpd sink, msgs per CPU-s | B: off / aiosmtpd Maildir, msgs per CPU-s | "
             "C: off / smtp-sink, msgs/s | D: batch / aiosmtpd Maildir, msgs/s |",
             "|---|---:|---:|---:|---:|"]
    tally = {"A": [0, 0], "B": [0, 0], "C": [0, 0], "D": [0, 0]}

    def ratio(key: str, num: float, den: float, goal: float, strict: bool = False) -> str:
        if not (num == num and den == den) or den == 0:
            return "–"
        r = num / den
        ok = r > goal if strict else r >= goal
        tally[key][0] += ok
        tally[key][1] += 1
        return f"{r:.2f}×" + ("" if ok else " ✗")

    for sc in scenarios:
        if not all((sc, s) in cell for s in want):
            continue
        c = {s: cell[sc, s] for s in want}
        lines.append(
            f"| {sc} | "
            f"{ratio('A', c['aiosmtpd-sink']['cpu'], c['fastsmtp-off']['cpu'], 3)} | "
            f"{ratio('B', c['aiosmtpd-maildir']['cpu'], c['fastsmtp-off']['cpu'], 3)} | "
            f"{ratio('C', c['fastsmtp-off']['rate'], c['smtp-sink']['rate'], 0.5)} | "
            f"{ratio('D', c['fastsmtp-batch']['rate'], c['aiosmtpd-maildir']['rate'], 1, strict=True)} |")
    lines += ["", "✗ marks a scenario where the goal is not met. Met in: "
              + ", ".join(f"{k} {v[0]} of {v[1]}" for k, v in tally.items()) + "."]
    return lines


# The journal issue's goals (fastsmtp --fsync batch as a write-ahead journal), in
# messages/s, with smtp-source, 20 sessions, one worker, many messages per connection:
# (goal, size, server, against, factor).
JOURNAL_GOALS: tuple[tuple[str, int, str, str, float], ...] = (
    ("a", 1 * KiB, "fastsmtp-batch", "fastsmtp-off", 0.8),
    ("a", 100 * KiB, "fastsmtp-batch", "fastsmtp-off", 0.8),
    ("b", 1 * KiB, "fastsmtp-batch", POSTFIX_SERVER, 5.0),
    ("c", 100 * KiB, "fastsmtp-batch", "smtp-sink", 1.0),
)


def journal_goals(cell: Cell, headings: dict[str, str]) -> list[str]:
    """The journal issue's goals, one row per goal and size whose scenario and both servers were run."""
    rows: list[str] = []
    tally: dict[str, list[int]] = {}
    for key, size, num, den, goal in JOURNAL_GOALS:
        label = Scenario("smtp-source", 20, size, "many").label
        if (label, num) not in cell or (label, den) not in cell:
            continue
        a, b = cell[label, num]["rate"], cell[label, den]["rate"]
        r = _times(a, b)
        ok = r == r and r >= goal
        met = tally.setdefault(key, [0, 0])
        met[0] += ok
        met[1] += 1
        rows.append(f"| {key} | {label} | {headings[num]} {fmt_rate(a)} | {headings[den]} {fmt_rate(b)} | "
                    f"{fmt_num(r, 2)}× | ≥ {goal:g}× | {'✓ met' if ok else '✗ missed'} |")
    if not rows:
        return []
    return ["", "### Against the journal issue's goals", "",
            "smtp-source, 20 sessions, one worker, many messages per connection; messages/s (medians), acceptance "
            "as smtp-source sees it. Goals: (a) fastsmtp batch ≥ 0.8× fastsmtp off, at 1 KiB and 100 KiB; "
            "(b) fastsmtp batch ≥ 5× Postfix durable Maildir at 1 KiB; (c) fastsmtp batch ≥ smtp-sink at 100 KiB.",
            "",
            "| goal | scenario | msgs/s | against, msgs/s | ratio | needed | result |",
            "|---|---|---:|---:|---:|---:|---|",
            *rows,
            "", "Met: " + ", ".join(f"{k} {v[0]} of {v[1]}" for k, v in tally.items()) + "."]


def _times(num: float, den: float) -> float:
    return num / den if num == num and den == den and den > 0 else float("nan")


def _figure_row(ref: dict[str, float], c: dict[str, float], server: str, heading: str) -> tuple[str, str]:
    """One server's row of the key figure, and its verdict when the issue sets a goal for it."""
    per_cpu = per_cpu_second(c["cpu"])
    lo, hi = per_cpu_second(c["cpu_hi"]), per_cpu_second(c["cpu_lo"])  # the most CPU is the fewest msgs/CPU-s
    by_cpu = _times(per_cpu_second(ref["cpu"]), per_cpu)
    by_rate = _times(ref["rate"], c["rate"])
    goal = FIGURE_GOALS.get(server)
    shown = "–" if by_cpu != by_cpu else f"{by_cpu:.2f}×"
    verdict = ""
    if goal is not None and server != REFERENCE and by_cpu == by_cpu:
        mark = "✓" if by_cpu >= goal else "✗"
        shown += f" {mark} (goal ≥ {goal:g}×)"
        verdict = f"{heading}: {by_cpu:.2f}× {mark} (goal ≥ {goal:g}×)"
    spread = "–" if lo != lo else f"{lo:,.0f}–{hi:,.0f}"
    row = (f"| {heading} | {fmt_rate(c['rate'])} | {fmt_rate(per_cpu)} | {spread} | "
           f"{fmt_rate(1000 * c['cpu'])} | {shown} | {'–' if by_rate != by_rate else f'{by_rate:.2f}×'} |")
    return row, verdict


def figure(cell: Cell, scenarios: Sequence[str], servers: Sequence[str], headings: dict[str, str],
           rounds: int) -> list[str]:
    """The issue's key figure per scenario: fastsmtp off against every other server of the run.

    Rows in the order of ``servers``; the ratios are fastsmtp off's figure
    over the row's, so a ratio above 1 means fastsmtp off does better.
    """
    if REFERENCE not in servers or len(servers) < 2:
        return []
    ref_head = headings[REFERENCE]
    lines = ["", f"### The key figure: {ref_head} against the others", "",
             f"Medians of {rounds} round(s), the servers interleaved. Messages per server CPU-second = messages / "
             "(utime + stime of the server's whole process tree); µs per message is its inverse. The ratios are "
             f"{ref_head}'s figure over the row's. Goals: {ref_head} ≥ "
             + " and ≥ ".join(f"{g:g}× {headings[s]}" for s, g in FIGURE_GOALS.items() if s in headings)
             + " in messages per server CPU-second; the ratio to smtp-sink is reported, it has no goal."]
    for sc in scenarios:
        if (sc, REFERENCE) not in cell:
            continue
        ref = cell[sc, REFERENCE]
        lines += ["", f"#### {sc}", "",
                  f"| server | msgs/s | msgs per server CPU-s | worst–best round | µs server CPU per msg | "
                  f"{ref_head} ÷ this, msgs per CPU-s | {ref_head} ÷ this, msgs/s |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        verdicts = []
        for s in servers:
            if (sc, s) in cell:
                row, verdict = _figure_row(ref, cell[sc, s], s, headings[s])
                lines.append(row)
                verdicts += [verdict] if verdict else []
        if verdicts:
            lines += ["", f"Goals, {ref_head} ÷ each in messages per server CPU-second: " + "; ".join(verdicts) + "."]
    return lines
