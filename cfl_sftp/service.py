"""``cfl-sftp serve``: wire the deployment, the policy in force and the SSH listener, and run until stopped.

Background duties run here too: noticing library changes made by other nodes, putting new policy sets in force,
expiring staging files, closing idle sessions, and signing audit checkpoints (within 60 s of any new entry, and
once more at stop).

The service's life as systemd sees it (``Type=notify``, :mod:`cfl_sftp.sdnotify`):

* ``READY=1`` once every listener accepts connections;
* ``SIGHUP``: ``RELOADING=1``, then the configuration's ``[gateway]``/``[limits]``, the key ring and the policy
  set are read again (each one that is refused keeps the one in force), then ``READY=1``;
* ``SIGTERM``/``SIGINT``: ``STOPPING=1``; listeners close at once; sessions are let finish what they have in
  progress for up to ``stop_timeout_seconds`` (see :func:`drained_sessions` for which are closed sooner), then
  the rest are closed (an upload cut off is a partial upload); the audit queue is written, a last checkpoint
  signed, and the process exits 0. A second signal during the drain closes the remaining sessions at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import signal
import socket
from dataclasses import dataclass, field
from pathlib import Path

import asyncssh
import structlog

from cfl_sftp import recovery, sdnotify
from cfl_sftp.allocator import keep_reply_buffers_on_the_heap
from cfl_sftp.audit_trail import AuditSigner, make_checkpoint
from cfl_sftp.availability import DatabaseAvailability
from cfl_sftp.config import Config, ConfigError, load_config, reloaded
from cfl_sftp.deployment import Deployment, KeyFileError, load_keyring
from cfl_sftp.domain.errors import PolicyError
from cfl_sftp.event_loop import loop_kind, new_event_loop
from cfl_sftp.logs import configure_logging
from cfl_sftp.policy.reloader import PolicyReloader, load_at_start
from cfl_sftp.runtime import Runtime, settle_heap
from cfl_sftp.sdnotify import Notifier
from cfl_sftp.sftp import activity
from cfl_sftp.sftp.proxy import UNTRUSTED_REASON, WAITING_CAP_REASON, ProxyProtocolListener
from cfl_sftp.sftp.ssh import LibrarySSHServer, prepare_usernames_once
from cfl_sftp.sftp.transport import DirectListener
from cfl_sftp.sftp.wire import drop_needless_packet_work
from cfl_sftp.storage.audit_store import AuditEvent
from cfl_sftp.vault_admin import NODE_HEARTBEAT_SECONDS, node_stopped, record_node_heartbeat

log = structlog.get_logger(__name__)

LISTEN_BACKLOG = 1024
"""Connections the kernel completes before the service accepts them. asyncssh's default of 100 overflowed when
200 batch clients connected at once (``nstat`` TcpExtListenOverflows), and each dropped handshake cost its
client a 1 s SYN retransmit; the kernel caps it at ``net.core.somaxconn`` (4096 on current Linux)."""

CATALOGUE_POLL_SECONDS = 1.0
STAGING_SWEEP_SECONDS = 600.0
CHECKPOINT_SECONDS = 15.0  # SPEC 8 asks for a checkpoint within 60 s of any new entry
IDLE_SWEEP_SECONDS = 1.0  # idle sessions are closed within a second of idle_timeout_seconds
DRAIN_SWEEP_SECONDS = 0.1
STATUS_SECONDS = 10.0
SESSION_END_SECONDS = 15.0
"""After a stop has closed the last sessions: how long their handlers may take to finish (a gateway verdict
under way, partial uploads discarded) before the audit queue is written and the last checkpoint signed."""


def parse_listen(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


def node_endpoint(servers: list[asyncssh.SSHAcceptor]) -> str:
    """This node as its successive runs share it: the host name and the addresses it listens on (two live nodes
    cannot bind the same ones), so a restarted node recognises the session rows its previous run left."""
    addresses = sorted(f"{a[0]}:{a[1]}" for server in servers for a in server.get_addresses())
    return f"{socket.gethostname()[:100]} {' '.join(addresses)}"[:255]


@dataclass
class RunningService:
    """A started service: its runtime, its listeners and the ports they are bound to."""

    runtime: Runtime
    servers: list[asyncssh.SSHAcceptor]
    tasks: list[asyncio.Task[None]]
    reload_event: asyncio.Event
    """Set it to re-read the policy set now (the watcher's own path; :meth:`hangup` does more)."""
    keys_event: asyncio.Event
    node_id: str
    policies: PolicyReloader
    signer: AuditSigner
    notifier: Notifier = field(default_factory=Notifier)
    _reloading: asyncio.Task[None] | None = None
    _reload_again: bool = False
    _hurry: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def ports(self) -> list[int]:
        return [s.get_port() for s in self.servers]

    @property
    def config(self) -> Config:
        """The configuration in force (``[gateway]``/``[limits]`` as last reloaded)."""
        return self.runtime.deployment.config

    def status_line(self) -> str:
        """``STATUS=`` for systemd: where it listens, how many sessions, which policy set."""
        listen = ", ".join(self.config.listen)
        count = len(self.runtime.sessions)
        return (f"Serving on {listen} (ports {', '.join(map(str, self.ports))}); {count} session"
                f"{'' if count == 1 else 's'}; policy {self.runtime.snapshot.digest[:12]}")

    # -- SIGHUP ----------------------------------------------------------------------------------------

    def hangup(self) -> None:
        """``SIGHUP`` (``systemctl reload``): :meth:`reload` now; a signal during a reload runs one more."""
        if self.runtime.stopping:
            log.warning("reload_ignored_while_stopping")
            return
        if self._reloading is not None and not self._reloading.done():
            self._reload_again = True
            return
        self._reloading = asyncio.ensure_future(self._reload_until_settled())

    async def _reload_until_settled(self) -> None:
        while True:
            self._reload_again = False
            try:
                await self.reload()
            except Exception:  # a bug must not end reloading: what is in force stays
                log.exception("service_reload_failed")
            if not self._reload_again:
                return

    async def reload(self) -> None:
        """Re-read the configuration's ``[gateway]``/``[limits]``, the key ring and the policy set.

        Each part that is refused keeps the one in force and says why in the log; the others still apply.
        """
        self.notifier.reloading("Reloading configuration, key ring and policies")
        log.info("service_reloading")
        try:
            await self._reload_config()
            await self._reload_keyring()
            try:
                await self.policies.reload_now()
            except Exception:
                log.exception("policy_reload_failed")
        finally:
            if not self.runtime.stopping:  # a stop cancels a reload under way: READY=1 would contradict it
                self.notifier.ready(self.status_line())
                log.info("service_reloaded")

    async def _reload_config(self) -> None:
        current = self.config
        if current.path is None:
            return
        try:
            fresh, digest = await asyncio.to_thread(_read_config, current.path)
        except ConfigError as exc:
            log.error("config_refused", path=str(current.path), reason=str(exc))
            return
        config, restart_only = reloaded(current, fresh)
        if restart_only:
            log.warning("config_needs_restart", keys=list(restart_only),
                        message=f"changed, in force after a restart: {', '.join(restart_only)}")
        changed = [name for name in ("gateway", "limits") if getattr(config, name) != getattr(current, name)]
        self.runtime.install_config(config)
        log.info("config_reloaded", path=str(current.path), config_digest=digest, changed=changed)

    async def _reload_keyring(self) -> None:
        deployment = self.runtime.deployment
        try:
            deployment.keyring = await asyncio.to_thread(load_keyring, deployment.config.vault_key)
        except KeyFileError as exc:
            log.error("key_ring_refused", reason=str(exc))
            return
        log.info("key_ring_reloaded", wrapping_key=deployment.keyring.wrapping_key_id)
        self.keys_event.set()  # the heartbeat reports the new wrapping key at once (vault rotate-key waits on it)

    # -- stopping --------------------------------------------------------------------------------------

    def hurry(self) -> None:
        """A second stop signal: close the sessions still open now rather than at the stop timeout."""
        self._hurry.set()

    async def stop(self, timeout: float = 0.0) -> None:
        """Stop accepting, let sessions finish for up to ``timeout`` seconds, close the rest, then write the
        audit queue and a last checkpoint. The process may exit once this returns."""
        runtime = self.runtime
        runtime.stopping = True
        for server in self.servers:
            server.close()  # no new connection from now on; the open ones stay
        self.notifier.stopping(
            f"Stopping: letting {len(runtime.sessions)} sessions finish (at most {timeout:g} s)",
            within_seconds=timeout + SESSION_END_SECONDS + 30,
        )
        log.info("service_stopping", sessions=len(runtime.sessions), stop_timeout_seconds=timeout)
        await self._drain(timeout)
        writer_task = self.tasks[-1]  # the audit writer: it keeps going until the last entries are queued
        await _cancel([*self.tasks[:-1], *([self._reloading] if self._reloading is not None else [])])
        unfinished = await runtime.wait_for_tasks(SESSION_END_SECONDS)
        unfinished += await runtime.guard.settle(SESSION_END_SECONDS)
        if unfinished:
            log.warning("session_tasks_unfinished", tasks=unfinished)
        await _cancel([writer_task])  # before the last flush: no batch of its own may land after the checkpoint
        for server in self.servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 5)
        await runtime.audit_writer.flush(everything=True)
        await _checkpoint_now(runtime.deployment, self.signer)
        with contextlib.suppress(Exception):
            await asyncio.to_thread(node_stopped, runtime.deployment, self.node_id)
        runtime.deployment.close()
        self.notifier.close()

    async def _drain(self, timeout: float) -> None:
        """Close each session as soon as it has nothing in progress; at ``timeout``, close what is left."""
        runtime = self.runtime
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        reported = -1
        while runtime.sessions and loop.time() < deadline and not self._hurry.is_set():
            now = loop.time()
            for session in activity.drained_sessions(list(runtime.sessions.values()), now,
                                                     runtime.limits.idle_timeout_seconds):
                runtime.close_session(session, activity.STOPPING)
            if len(runtime.sessions) != reported:
                reported = len(runtime.sessions)
                self.notifier.status(f"Stopping: {reported} sessions still open, closed in at most "
                                     f"{max(0.0, deadline - now):.0f} s")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._hurry.wait(), DRAIN_SWEEP_SECONDS)
        left = list(runtime.sessions.values())
        if left:
            log.warning("sessions_closed_at_stop_timeout", sessions=len(left),
                        session_ids=[s.session_id for s in left])
        for session in left:
            runtime.close_session(session, activity.STOP_TIMEOUT)
        # Each closed connection reports its end (connection_lost) on the loop's next turns: wait, bounded.
        for _ in range(int(SESSION_END_SECONDS / DRAIN_SWEEP_SECONDS)):
            if not runtime.sessions:
                break
            await asyncio.sleep(DRAIN_SWEEP_SECONDS)


async def _cancel(tasks: list[asyncio.Task[None]], timeout: float = 10.0) -> None:
    """Cancel ``tasks`` and wait until they have ended (bounded).

    Python 3.11's ``asyncio.wait_for`` can swallow a cancellation that arrives as its inner wait completes, and
    the background loops use it: cancel again until each task has really ended.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    pending = {task for task in tasks if not task.done()}
    while pending and loop.time() < deadline:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.2)
    if pending:
        log.warning("background_tasks_unfinished", tasks=[task.get_name() for task in pending])


def _read_config(path: Path) -> tuple[Config, str]:
    """The configuration file again, with the digest of its bytes (logged, so nodes can be compared)."""
    try:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    return load_config(path), digest


async def _poll_catalogue(runtime: Runtime) -> None:
    """Also the node's first sign of a database outage: a read every second."""
    while True:
        try:
            await asyncio.to_thread(runtime.refresh_catalogue_now)
        except Exception as exc:
            if not runtime.database.failed(exc, "catalogue"):
                log.exception("catalogue_refresh_failed")
        await asyncio.sleep(CATALOGUE_POLL_SECONDS)


def _policy_reloader(runtime: Runtime, config: Config) -> PolicyReloader:
    """Puts each new valid policy set in force (:mod:`cfl_sftp.policy.reloader`), audited as the operator's."""

    def audit(event: str, details: dict[str, object]) -> None:
        runtime.audit_soon(AuditEvent(event, "operator", "", "local", details))

    return PolicyReloader(config.policies_dir, runtime.snapshot, runtime.install_policy, audit)


async def _close_idle_sessions(runtime: Runtime) -> None:
    """``[limits] idle_timeout_seconds``: a session that asked for nothing for that long is closed (audited as
    ``session-closed`` with ``reason`` ``idle-timeout``); read at each sweep, so a reload applies at once."""
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(IDLE_SWEEP_SECONDS)
        if runtime.stopping:
            continue  # the stop's own drain decides now
        now = loop.time()
        for session in activity.idle_sessions(list(runtime.sessions.values()), now,
                                              runtime.limits.idle_timeout_seconds):
            runtime.close_session(session, activity.IDLE, idle_seconds=int(session.idle_seconds(now)))


async def _report_status(service: RunningService) -> None:
    """Keep systemd's ``STATUS=`` (``systemctl status``) current: sessions come and go."""
    shown = ""
    while True:
        await asyncio.sleep(STATUS_SECONDS)
        line = service.status_line()
        if line != shown and not service.runtime.stopping:
            service.notifier.status(line)
            shown = line


async def _sweep_staging(runtime: Runtime) -> None:
    while True:
        try:
            expired = await asyncio.to_thread(runtime.staging.expire)
            if expired:
                log.info("staging_expired", files=expired)
        except Exception as exc:
            if not runtime.database.failed(exc, "staging-expiry"):
                log.exception("staging_sweep_failed")
        await asyncio.sleep(STAGING_SWEEP_SECONDS)


async def _sweep_after_crashes(runtime: Runtime) -> None:
    """Dead processes' scratch folders, orphan files, rows without files (:mod:`cfl_sftp.recovery`)."""
    while True:
        try:
            await asyncio.to_thread(recovery.sweep, runtime.deployment)
        except Exception as exc:
            if not runtime.database.failed(exc, "recovery-sweep"):
                log.exception("recovery_sweep_failed")
        await asyncio.sleep(recovery.SWEEP_SECONDS)


async def _checkpoint_now(
    deployment: Deployment, signer: AuditSigner | None = None, availability: DatabaseAvailability | None = None
) -> None:
    try:
        await asyncio.to_thread(make_checkpoint, deployment, dt.datetime.now(dt.UTC), signer)
    except Exception as exc:
        if availability is None or not availability.failed(exc, "checkpoint"):
            log.exception("checkpoint_failed")


async def _sign_checkpoints(runtime: Runtime, signer: AuditSigner) -> None:
    """Sign the tree whenever it has grown; cheap (one read of the head row) when it has not."""
    while True:
        await _checkpoint_now(runtime.deployment, signer, runtime.database)
        await asyncio.sleep(CHECKPOINT_SECONDS)


async def _keep_node_alive(runtime: Runtime, node_id: str, keys_event: asyncio.Event) -> None:
    """Heartbeat with this node's wrapping key id (``vault rotate-key`` waits for every live node to have the
    new ring); ``keys_event`` (a reloaded key ring) beats at once."""
    deployment = runtime.deployment
    while True:
        keys_event.clear()
        try:
            await asyncio.to_thread(record_node_heartbeat, deployment, node_id)
            runtime.database.succeeded()
        except Exception as exc:
            if not runtime.database.failed(exc, "heartbeat"):
                log.exception("node_heartbeat_failed")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(keys_event.wait(), NODE_HEARTBEAT_SECONDS)


async def start(config: Config, deployment: Deployment | None = None, notifier: Notifier | None = None
                ) -> RunningService:
    """Start listening; the caller runs the loop. Used by ``serve``, the demo and the tests."""
    drop_needless_packet_work()
    prepare_usernames_once()
    deployment = deployment or Deployment.open(config)
    signer = await asyncio.to_thread(AuditSigner.load, config)  # a bad audit key refuses to start
    await asyncio.to_thread(deployment.db.upgrade_if_empty)
    # Scratch folders are per process: only those of processes that died are cleared (cfl_sftp.recovery).
    deployment.scratch.acquire()  # at once: a node holds its claim for as long as it runs
    await asyncio.to_thread(recovery.sweep_dead_scratch, deployment)
    snapshot = await asyncio.to_thread(load_at_start, config.policies_dir)  # invalid: no start
    runtime = Runtime(deployment, snapshot)
    await asyncio.to_thread(runtime.refresh_catalogue_now)
    # Loaded once: given paths, asyncssh would re-read and re-check every host key at each login.
    host_keys = [asyncssh.read_private_key(p) for p in config.host_keys if p.exists()]
    if not host_keys:
        raise FileNotFoundError("no host key found: see host_keys in the configuration")
    servers = []
    # Behind a load balancer each connection starts with its PROXY header (SPEC 9); asyncssh's tunnel hook lets
    # sftp.proxy read it first, so that every peername asyncssh reports is the client's.
    # Otherwise our DirectListener accepts them, so that each connection's writes go out once per loop turn.
    # Either way our listener accepts them, with the backlog below (asyncssh's own backlog= does not apply then).
    extra: dict[str, object] = {"tunnel": DirectListener(LISTEN_BACKLOG)}
    if config.proxy_protocol:
        if not config.trusted_proxies:
            log.warning("proxy_headers_trusted_from_anyone",
                        message="proxy_protocol is on and trusted_proxies is empty: firewall the port to the "
                                "balancer, or list the balancer's addresses in trusted_proxies")
        extra["tunnel"] = ProxyProtocolListener(
            lambda address, reason: runtime.guard.refuse_connection(
                address, reason if reason in (WAITING_CAP_REASON, UNTRUSTED_REASON) else "bad-proxy-header"),
            cap=lambda: runtime.limits.unauthenticated_connections,
            trusted=config.trusted_proxies,
            backlog=LISTEN_BACKLOG,
        )
    for address in config.listen:
        host, port = parse_listen(address)
        servers.append(
            await asyncssh.create_server(
                lambda: LibrarySSHServer(runtime),
                host,
                port,
                **extra,
                server_host_keys=host_keys,
                allow_scp=False,
                agent_forwarding=False,
                x11_forwarding=False,
                allow_pty=False,
                # Without a pty asyncssh's line editor never edits, but it still wraps every session channel.
                line_editor=False,
                keepalive_interval=60,
                login_timeout=60,
                # No GSS-API (asyncssh would otherwise also look up this host's FQDN again at every login).
                gss_host=None,
            )
        )
    reload_event = asyncio.Event()
    keys_event = asyncio.Event()
    node_id = deployment.owner_id
    await runtime.guard.start(node_id, node_endpoint(servers))
    policies = _policy_reloader(runtime, config)
    service = RunningService(runtime, servers, [], reload_event, keys_event, node_id, policies, signer,
                             notifier or Notifier())
    service.tasks += [
        asyncio.create_task(runtime.guard.run()),
        asyncio.create_task(_keep_node_alive(runtime, node_id, keys_event)),
        asyncio.create_task(_poll_catalogue(runtime)),
        asyncio.create_task(policies.run(reload_event)),
        asyncio.create_task(_sweep_staging(runtime)),
        asyncio.create_task(_sweep_after_crashes(runtime)),
        asyncio.create_task(_sign_checkpoints(runtime, signer)),
        asyncio.create_task(_close_idle_sessions(runtime)),
        asyncio.create_task(_report_status(service)),
        asyncio.create_task(runtime.audit_writer.run()),  # last: a stop cancels it last
    ]
    # SPEC 9: each node logs the digest of its configuration beside that of its policy set, to compare nodes.
    config_digest = hashlib.sha256(config.path.read_bytes()).hexdigest() if config.path is not None else None
    log.info("service_started", listen=list(config.listen), ports=service.ports, policy_digest=snapshot.digest,
             config_digest=config_digest, node=node_id, event_loop=loop_kind(asyncio.get_running_loop()))
    return service


async def _feed_watchdog(notifier: Notifier, interval: float) -> None:
    """Tell systemd the event loop is alive, at half its ``WatchdogSec=``: if the loop hangs, the pings stop and
    systemd restarts the service (``Restart=on-failure``)."""
    while True:
        notifier.watchdog()
        await asyncio.sleep(interval / 2)


async def _serve(config: Config) -> None:
    notifier = Notifier.from_environment()
    watchdog = sdnotify.watchdog_seconds()
    pinger = asyncio.create_task(_feed_watchdog(notifier, watchdog)) if watchdog else None  # from the start on
    stop = asyncio.Event()
    running: list[RunningService] = []  # empty while starting: signals then wait for the start to finish
    hangup_pending = asyncio.Event()

    def stop_requested() -> None:
        if stop.is_set() and running:
            log.warning("service_stop_hurried")
            running[0].hurry()
        stop.set()

    def hangup() -> None:
        if running:
            running[0].hangup()
        else:
            hangup_pending.set()  # the start reads everything anyway; reload once it is done, to be sure

    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop_requested)
    loop.add_signal_handler(signal.SIGINT, stop_requested)
    loop.add_signal_handler(signal.SIGHUP, hangup)
    notifier.status("Starting: opening the database and loading the policy set")
    service = await start(config, notifier=notifier)
    settle_heap()  # the first policy set, loaded by start(), leaves the collector's scans
    running.append(service)
    notifier.ready(service.status_line())
    if hangup_pending.is_set():
        service.hangup()
    await stop.wait()
    await service.stop(service.config.limits.stop_timeout_seconds)  # as last reloaded
    if pinger is not None:
        pinger.cancel()
    log.info("service_stopped")


def serve(config: Config) -> int:
    configure_logging()
    keep_reply_buffers_on_the_heap()
    try:
        with asyncio.Runner(loop_factory=new_event_loop) as runner:
            runner.run(_serve(config))
    except PolicyError as exc:
        for problem in exc.errors:
            log.error("policy_refused", error=str(problem))
        return 1
    return 0
