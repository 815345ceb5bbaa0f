"""One worker process: an event loop, a listening socket, a store (journal or Maildir writer).

Rules of this module:
- Every listening socket has SO_REUSEPORT, so that several workers (and a
  restarted one) can listen on one port and the kernel spreads connections
  between them.  Under the supervisor the sockets are bound by the
  supervisor and inherited (see supervisor.py); ``--workers 0`` binds here.
- Sockets are bound first, then privileges are dropped (``--user``), then
  the mail root is checked: port 25 needs root, mail must not be written
  as root.
- Stopping is graceful: stop accepting, answer idle sessions 421 4.3.2, let
  transactions in progress finish within ``shutdown_timeout``, then commit
  whatever the store still holds.  SIGQUIT, or a second SIGINT, skips the
  wait (gunicorn's quick shutdown); queued commits still finish.
- SIGUSR1 retires a worker the supervisor has replaced (SIGHUP, SIGTTOU):
  stop accepting and let sessions end by themselves, as Postfix's master
  lets a process finish its client on reload; after ``shutdown_timeout``
  (or on SIGTERM) it stops as above.
- SIGUSR2 reopens ``--log-file`` (after logrotate moved it).  SIGUSR1 is
  taken: it is the supervisor's "retire" above.
- The event loop itself calls ``heartbeat`` every ``heartbeat_interval``: a
  blocked loop stops beating and the supervisor kills the worker.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import socket
import sys
from typing import TYPE_CHECKING, Callable

from .config import Config, ConfigError, parse_listen
from .logs import event_log, reopen_logs, set_role
from .journalstore import JournalStore
from .maildir import MaildirWriter, clean_tmp
from .metrics import RECOVERED, SET_ASIDE
from .recovery import Recovered, recover
from .server import Server
from .store import Store

if TYPE_CHECKING:
    from .anvil import AnvilRow

__all__ = ["bind_socket", "bind_listeners", "serve", "run_worker", "drop_privileges", "check_mail_root"]

log = logging.getLogger("fastsmtp")

# LMTP transactions one worker runs at once.
LMTP_CONCURRENCY = 8


def bind_socket(host: str, port: int) -> socket.socket:
    """A non-blocking listening socket with SO_REUSEADDR and SO_REUSEPORT."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, socktype, proto, _, addr = infos[0]
    sock = socket.socket(family, socktype, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if hasattr(socket, "SO_REUSEPORT"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(addr)
        sock.listen(1024)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def serve(
    config: Config,
    sock: socket.socket | None = None,
    on_ready: Callable[[tuple[str, int]], None] | None = None,
    stop: asyncio.Event | None = None,
    *,
    tls_sock: socket.socket | None = None,
    clients: "AnvilRow | None" = None,
    heartbeat: Callable[[], None] | None = None,
    clean: str = "before",
    metrics: memoryview | None = None,
) -> None:
    """Serve until ``stop`` is set (or SIGTERM/SIGINT), then stop gracefully.

    ``clients`` is this worker's row of the shared per-client counts (None:
    a private table).  ``clean`` says when to remove dead writers' files
    from tmp/: "before" listening, in the "background" once listening (a
    replacement worker, whose siblings serve meanwhile), or "skip" (the
    supervisor did it before forking).  ``metrics`` is this worker's row of
    the shared counters (metrics.py; None: not counted).
    """
    loop = asyncio.get_running_loop()
    quick = asyncio.Event()
    drain = asyncio.Event()
    if stop is None:
        stop = asyncio.Event()
        _install_stop_signals(loop, stop, quick, drain)
        # Log rotation: logrotate moved --log-file away; write to a new one.
        loop.add_signal_handler(signal.SIGUSR2, reopen_logs)
    if clean == "before":
        _clean_tmp(config)
    store = open_store(config, metrics)
    store.start(loop)
    await adopt_recovered(store)
    orphan_scan: asyncio.Task[None] | None = None
    if isinstance(store, JournalStore) and store.lmtp is not None:
        orphan_scan = loop.create_task(_adopt_orphans(config, store, metrics))
        try:
            # fastsmtp journal retry: the deferred LMTP deliveries, now.
            loop.add_signal_handler(signal.SIGWINCH, store.lmtp.retry_now)
        except (RuntimeError, ValueError):  # not the main thread (an embedding): no signal
            pass
    if clients is None and config.max_connections_per_ip:
        from .anvil import Anvil

        clients = Anvil(1, 2 * config.max_connections).row(0)
    server = Server(config, store, clients, metrics)
    if sock is None:
        sock = bind_socket(config.host, config.port)
    listeners = await _listen(config, server, sock, tls_sock)
    address = sock.getsockname()[:2]
    beat: asyncio.TimerHandle | None = None
    if heartbeat is not None:
        interval = heartbeat_interval(config)

        def on_beat() -> None:
            nonlocal beat
            heartbeat()
            beat = loop.call_later(interval, on_beat)

        on_beat()
    if on_ready is not None:
        on_ready(address)
    if clean == "background":
        loop.run_in_executor(None, _clean_tmp, config)
    try:
        await stop.wait()
    finally:
        for listener in listeners:
            listener.close()
        if orphan_scan is not None:
            orphan_scan.cancel()
        await _wind_down(config, server, store, drain, quick)
        if beat is not None:
            beat.cancel()
        # Workers end with os._exit: the last lines must not wait in a buffer.
        event_log().flush()


async def _listen(
    config: Config, server: Server, sock: socket.socket, tls_sock: socket.socket | None
) -> list[asyncio.AbstractServer]:
    """The SMTP listener, and the implicit-TLS one when configured."""
    loop = asyncio.get_running_loop()
    listeners: list[asyncio.AbstractServer] = [await loop.create_server(server.protocol_factory, sock=sock)]
    if config.tls_listen:
        # Implicit TLS (RFC 8314 §3.3): the handshake comes before the greeting.
        if tls_sock is None:
            tls_host, tls_port = parse_listen(config.tls_listen)
            tls_sock = bind_socket(tls_host, tls_port)
        listeners.append(
            await loop.create_server(
                server.implicit_tls_factory, sock=tls_sock, ssl=server.tls_context, ssl_handshake_timeout=30.0
            )
        )
        log.info("implicit TLS on %s:%d", *tls_sock.getsockname()[:2])
    return listeners


async def _wind_down(
    config: Config, server: Server, store: Store, drain: asyncio.Event, quick: asyncio.Event
) -> None:
    """The listeners are closed: let the sessions finish (421 to idle ones), then commit what is queued."""
    loop = asyncio.get_running_loop()
    if drain.is_set():
        # A connection accepted just before the listener closed reaches
        # connection_made a few loop turns later: wait a moment so that
        # it is served like the others rather than told 421.
        start = loop.time()
        end = start + config.shutdown_timeout
        while (server.connections or loop.time() < start + 0.1) and drain.is_set() and loop.time() < end:
            await asyncio.sleep(0.05)
    server.begin_shutdown()
    deadline = loop.time() + config.shutdown_timeout
    while server.connections and loop.time() < deadline and not quick.is_set():
        await asyncio.sleep(0.05)
    for conn in list(server.connections):
        conn.abort()
    if server.backend is not None:
        await server.backend.close()
    lmtp = store.lmtp if isinstance(store, JournalStore) else None
    if lmtp is not None:
        if not quick.is_set():
            await lmtp.drain(min(2.0, config.shutdown_timeout))
        # Stopped before the journal lets its folder go: no delivery of ours
        # may run while another worker adopts what is left (a duplicate).
        lmtp.close()
    # Commits still queued finish before the process ends: a message
    # whose 250 was lost to the abort is still stored (RFC 1047).
    await loop.run_in_executor(None, store.close)
    if lmtp is not None:
        # What the backends have not taken stays in the journal: the next
        # worker adopts it (recovery.py).
        await lmtp.aclose()


def heartbeat_interval(config: Config) -> float:
    """Beat often enough that a few missed beats never look like a hang."""
    return max(0.05, min(1.0, config.worker_timeout / 4))


def _install_stop_signals(
    loop: asyncio.AbstractEventLoop, stop: asyncio.Event, quick: asyncio.Event, drain: asyncio.Event
) -> None:
    # SIGUSR1: drain.  SIGTERM and a first SIGINT: graceful (and the end of
    # a drain).  SIGQUIT, or SIGINT while already stopping (a second
    # Ctrl-C): quick, as gunicorn's workers do.
    def on_usr1() -> None:
        if not stop.is_set():
            drain.set()
        stop.set()

    def on_term() -> None:
        drain.clear()
        stop.set()

    def on_int() -> None:
        if stop.is_set() and not drain.is_set():
            quick.set()
        on_term()

    def on_quit() -> None:
        quick.set()
        on_term()

    loop.add_signal_handler(signal.SIGUSR1, on_usr1)
    loop.add_signal_handler(signal.SIGTERM, on_term)
    loop.add_signal_handler(signal.SIGINT, on_int)
    loop.add_signal_handler(signal.SIGQUIT, on_quit)


def open_store(config: Config, metrics: memoryview | None = None) -> Store:
    """The store of ``--fsync``: the journal for "batch", else the Maildir writer.

    For the journal, the recovery of what dead workers left in it runs
    first, here, before the port opens (DESIGN.md, principle 1): every
    message a dead worker acknowledged is in new/ before this one serves.
    """
    if config.fsync != "batch":
        return MaildirWriter(
            hostname=config.hostname, fsync=config.fsync, spill_threshold=config.spill_threshold, metrics=metrics
        )
    lmtp = None
    if config.deliver != ("maildir",):
        from .lmtp.client import LMTPClient
        from .lmtp.queue import LmtpQueue

        # A kept connection for each transaction that may run at once.
        lmtp = LmtpQueue(LMTPClient(config.deliver, lhlo_name=config.hostname, pool_size=LMTP_CONCURRENCY),
                         config.dead_letter, metrics=metrics, concurrency=LMTP_CONCURRENCY)
    done = _counted(recover(config.journal_dir, config.mail_root, adopt=lmtp is not None), metrics)
    store = JournalStore(
        hostname=config.hostname, journal_dir=config.journal_dir, mail_root=config.mail_root,
        spill_threshold=config.spill_threshold, metrics=metrics, lmtp=lmtp,
    )
    store.recovered = done
    return store


def _counted(done: Recovered, metrics: memoryview | None) -> Recovered:
    if metrics is not None:
        metrics[RECOVERED] += done.replayed
        metrics[SET_ASIDE] += done.set_aside
    return done


async def adopt_recovered(store: Store, done: Recovered | None = None) -> None:
    """Dead workers' messages for the LMTP backends, journaled here (recovery.py), folder by folder.

    A folder goes once all its records are in this journal; one that
    could not be adopted whole stays, for the next recovery.
    """
    if not isinstance(store, JournalStore):
        return
    done = done if done is not None else store.recovered
    if done is None:
        return
    seen: set[str] = set()
    for folder in list(done.adopted):
        _, where = done.adopted[folder]
        journaled = await store.adopt(where, seen)
        done.release(folder, journaled)
        if journaled:
            log.info("journal: %d message(s) for the LMTP backends adopted from %s", len(where), folder)


async def _adopt_orphans(config: Config, store: JournalStore, metrics: memoryview | None) -> None:
    """Now and then, what a worker that is gone left for the LMTP backends: adopted here.

    A worker that stops with mail waiting (a reload while the backend is
    away) leaves its folder; only a start looked for such folders before,
    so its mail would wait for the next one.
    """
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(config.lmtp_orphan_scan)
        try:
            done = await loop.run_in_executor(None, recover, config.journal_dir, config.mail_root, store.folder,
                                              True)
            await adopt_recovered(store, _counted(done, metrics))
        except Exception:  # logged; tried again at the next scan
            log.exception("journal: looking for orphaned journal folders failed")


def _clean_tmp(config: Config) -> None:
    removed = clean_tmp(config.mail_root, hostname=config.hostname)
    if removed:
        log.info("removed %d stale file(s) from tmp/ folders", removed)


def install_loop(name: str) -> str:
    """Use uvloop unless asked not to or missing; return the loop's name."""
    if name == "uvloop":
        try:
            import uvloop
        except ImportError:
            return "asyncio"
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        return "uvloop"
    return "asyncio"


def run_worker(config: Config) -> int:
    """``--workers 0``: bind, drop privileges and serve in this process."""
    sock, tls_sock = bind_listeners(config)
    metrics_sock = bind_metrics(config) if config.metrics else None  # before dropping privileges
    drop_privileges(config.user, config.group)
    check_mail_root(config)
    loop_name = install_loop(config.loop)

    def ready(address: tuple[str, int]) -> None:
        print(
            f"fastsmtp listening on {show_address(*address)} ({loop_name}), "
            f"delivering into {config.mail_root}/<domain>/<user>/new/",
            flush=True,
        )
        if config.fsync == "off":
            print("WARNING: --fsync off: acknowledged mail can be lost on a crash", file=sys.stderr, flush=True)

    if metrics_sock is None:
        asyncio.run(serve(config, sock, on_ready=ready, tls_sock=tls_sock))
        return 0
    from . import metrics

    # No supervisor: this process counts and answers the scrapes itself.
    table = metrics.Metrics(1)

    async def main() -> None:
        http = await metrics.serve_http(metrics_sock, table.render)
        try:
            await serve(config, sock, on_ready=ready, tls_sock=tls_sock, metrics=table.row(0))
        finally:
            http.close()

    asyncio.run(main())
    return 0


def bind_metrics(config: Config) -> socket.socket:
    """The --metrics listener, announced on stdout (for port 0, with the port it got)."""
    from . import metrics

    host, port = parse_listen(config.metrics)
    try:
        sock = metrics.bind((host, port))
    except OSError as exc:
        raise ConfigError(_cannot_listen(host, port, exc)) from None
    print(f"fastsmtp metrics on http://{show_address(host, sock.getsockname()[1])}/metrics", flush=True)
    return sock


def show_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def bind_listeners(
    config: Config, port: int | None = None, tls_port: int | None = None
) -> tuple[socket.socket, socket.socket | None]:
    """The SMTP socket and the implicit-TLS one, if configured.

    ``port``/``tls_port`` replace the configured ports (the supervisor
    passes the ones its first socket got for port 0).  A failure is one
    ConfigError sentence naming the address.
    """
    host = config.host
    port = config.port if port is None else port
    try:
        sock = bind_socket(host, port)
    except OSError as exc:
        raise ConfigError(_cannot_listen(host, port, exc)) from None
    if not config.tls_listen:
        return sock, None
    tls_host, configured = parse_listen(config.tls_listen)
    tls_port = configured if tls_port is None else tls_port
    try:
        return sock, bind_socket(tls_host, tls_port)
    except OSError as exc:
        sock.close()
        raise ConfigError(_cannot_listen(tls_host, tls_port, exc)) from None


def _cannot_listen(host: str, port: int, exc: OSError) -> str:
    text = f"cannot listen on {show_address(host, port)}: {exc.strerror or exc}"
    if exc.errno == errno.EACCES and 0 < port < 1024:
        text += " (ports below 1024 need root or CAP_NET_BIND_SERVICE; see --user)"
    return text


def drop_privileges(user: str, group: str) -> None:
    """Become ``user``/``group`` (after binding): supplementary groups, gid, then uid.

    The order matters: once the uid is not root, the groups can no longer
    be changed (Postfix's set_ugid() does the same).
    """
    if not user and not group:
        return
    import grp
    import pwd

    pw = pwd.getpwnam(user) if user else None
    gid = grp.getgrnam(group).gr_gid if group else (pw.pw_gid if pw else os.getegid())
    if os.geteuid() != 0:
        if (pw is None or pw.pw_uid == os.geteuid()) and gid == os.getegid():
            return  # already who we should be
        raise ConfigError("user/group: changing to another user or group needs root")
    if pw is not None:
        os.initgroups(pw.pw_name, gid)
    else:
        os.setgroups([gid])
    os.setgid(gid)
    if pw is not None:
        os.setuid(pw.pw_uid)


def check_mail_root(config: Config) -> None:
    """The mail root, and the journal's folder, must be writable by whoever serves mail (checked after the drop)."""
    who = f"user {config.user}" if config.user else "this user"
    if not os.access(config.mail_root, os.W_OK | os.X_OK):
        raise ConfigError(f"mail root {config.mail_root} is not writable by {who}")
    if config.fsync == "batch" and config.journal_dir:
        try:
            os.makedirs(config.journal_dir, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"journal folder {config.journal_dir} cannot be made: {exc.strerror}") from None
        if not os.access(config.journal_dir, os.W_OK | os.X_OK):
            raise ConfigError(f"journal folder {config.journal_dir} is not writable by {who}")


def log_format(role: str = "") -> str:
    """``fastsmtp[PID] worker 2: LEVEL message``; no role for ``--workers 0``."""
    prefix = f" {role}:" if role else ""
    return f"%(asctime)s fastsmtp[%(process)d]{prefix} %(levelname)s %(message)s"


def set_log_role(role: str) -> None:
    set_role(role)  # text or JSON, as the handler already formats


def set_process_title(title: str) -> None:
    """Say in ps/top what this process is; a no-op without setproctitle."""
    try:
        from setproctitle import setproctitle
    except ImportError:
        return
    setproctitle(title)


#: Exit status of a worker that could not start serving (gunicorn's
#: WORKER_BOOT_ERROR): the supervisor stops instead of restarting it in a loop.
WORKER_BOOT_ERROR = 3


def die_with_parent(ppid: int) -> None:
    """Be killed when the supervisor dies, as Postfix's daemons exit on "master disconnect".

    An orphaned worker would go on serving a port nobody supervises.  With
    SIGKILL, killing the supervisor is killing the server: every message
    acknowledged is on disk anyway, and clients retry the rest.  Linux
    clears the setting when credentials change, so call it again after
    ``drop_privileges``; elsewhere the heartbeat's ppid check stands in.
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != ppid:  # it died before the prctl took effect
        os._exit(0)


def run_supervised(
    config: Config,
    sock: socket.socket,
    tls_sock: socket.socket | None,
    *,
    ppid: int,
    clients: "AnvilRow | None",
    heartbeat: Callable[[], None],
    notify: Callable[[str], None],
    clean: str,
    metrics: memoryview | None = None,
) -> int:
    """A worker forked by the supervisor, on sockets the supervisor bound.

    ``notify("READY")`` once listening; ``notify("BOOTERR <text>")`` and
    exit WORKER_BOOT_ERROR when it cannot start serving.
    """
    die_with_parent(ppid)
    try:
        drop_privileges(config.user, config.group)
        die_with_parent(ppid)
        check_mail_root(config)
    except (ConfigError, OSError) as exc:
        notify(f"BOOTERR {exc}")
        return WORKER_BOOT_ERROR
    loop_name = install_loop(config.loop)
    started = False

    def beat() -> None:
        heartbeat()
        if os.getppid() != ppid:
            os.kill(os.getpid(), signal.SIGKILL)

    def ready(address: tuple[str, int]) -> None:
        nonlocal started
        started = True
        log.info("serving %s (%s)", show_address(*address), loop_name)
        notify("READY")

    try:
        asyncio.run(
            serve(
                config, sock, on_ready=ready, tls_sock=tls_sock, clients=clients, heartbeat=beat, clean=clean,
                metrics=metrics,
            )
        )
    except Exception as exc:
        if started:
            raise
        notify(f"BOOTERR {exc!r}")
        return WORKER_BOOT_ERROR
    return 0
