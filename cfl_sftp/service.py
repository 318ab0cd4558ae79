"""``cfl-sftp serve``: wire the deployment, the policy in force and the SSH listener, and run until stopped.

Background duties run here too: noticing library changes made by other nodes, putting new policy sets in force,
and expiring staging files. ``SIGHUP`` re-reads the policy set at once; ``SIGTERM``/``SIGINT`` stop accepting
connections, let open transfers finish for up to ``stop_timeout_seconds``, then close.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import signal
from dataclasses import dataclass

import asyncssh
import structlog

from cfl_sftp.config import Config
from cfl_sftp.deployment import Deployment
from cfl_sftp.domain.errors import PolicyError
from cfl_sftp.logs import configure_logging
from cfl_sftp.policy import PolicySnapshot, load_policy_set
from cfl_sftp.policy.loader import policy_digest
from cfl_sftp.runtime import Runtime
from cfl_sftp.sftp.ssh import LibrarySSHServer

log = structlog.get_logger(__name__)

CATALOGUE_POLL_SECONDS = 1.0
POLICY_POLL_SECONDS = 0.5
STAGING_SWEEP_SECONDS = 600.0


def parse_listen(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


@dataclass
class RunningService:
    """A started service: its runtime, its listeners and the ports they are bound to."""

    runtime: Runtime
    servers: list[asyncssh.SSHAcceptor]
    tasks: list[asyncio.Task[None]]
    reload_event: asyncio.Event

    @property
    def ports(self) -> list[int]:
        return [s.get_port() for s in self.servers]

    async def stop(self, timeout: float | None = None) -> None:
        for server in self.servers:
            server.close()
        for task in self.tasks:
            task.cancel()
        for server in self.servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), timeout or 5)
        self.runtime.deployment.close()


def load_policy_or_empty(config: Config) -> PolicySnapshot:
    """The policy set at start-up; an invalid set refuses to start (there is no older one to keep)."""
    return load_policy_set(config.policies_dir)


async def _poll_catalogue(runtime: Runtime) -> None:
    while True:
        try:
            await asyncio.to_thread(runtime.refresh_catalogue_now)
        except Exception:
            log.exception("catalogue_refresh_failed")
        await asyncio.sleep(CATALOGUE_POLL_SECONDS)


async def _watch_policies(runtime: Runtime, config: Config, reload_now: asyncio.Event) -> None:
    """Poll the policy folder's digest; apply a changed set once it has been still for 0.5 s, or on SIGHUP."""
    in_force = runtime.snapshot.digest
    seen = in_force
    seen_at = asyncio.get_running_loop().time()
    today = dt.datetime.now(dt.UTC).date()
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(reload_now.wait(), POLICY_POLL_SECONDS)
        forced = reload_now.is_set()
        reload_now.clear()
        now = asyncio.get_running_loop().time()
        digest = await asyncio.to_thread(policy_digest, config.policies_dir)
        if digest != seen:
            seen, seen_at = digest, now
            if not forced:
                continue
        date_changed = dt.datetime.now(dt.UTC).date() != today
        if not forced and not date_changed and (digest == in_force or now - seen_at < 0.5):
            continue
        today = dt.datetime.now(dt.UTC).date()
        try:
            snapshot = await asyncio.to_thread(load_policy_set, config.policies_dir)
        except PolicyError as exc:
            in_force = digest  # do not retry the same broken set until it changes again
            log.error("policy_refused", errors=[str(p) for p in exc.errors])
            continue
        runtime.install_policy(snapshot)
        in_force = snapshot.digest
        log.info("policy_reloaded", digest=snapshot.digest, users=len(snapshot.users))


async def _sweep_staging(runtime: Runtime) -> None:
    while True:
        try:
            expired = await asyncio.to_thread(runtime.staging.expire)
            if expired:
                log.info("staging_expired", files=expired)
        except Exception:
            log.exception("staging_sweep_failed")
        await asyncio.sleep(STAGING_SWEEP_SECONDS)


async def start(config: Config, deployment: Deployment | None = None) -> RunningService:
    """Start listening; the caller runs the loop. Used by ``serve``, the demo and the tests."""
    deployment = deployment or Deployment.open(config)
    await asyncio.to_thread(deployment.db.upgrade_if_empty)
    await asyncio.to_thread(deployment.data.clear_tmp)
    snapshot = await asyncio.to_thread(load_policy_or_empty, config)
    runtime = Runtime(deployment, snapshot)
    await asyncio.to_thread(runtime.refresh_catalogue_now)
    host_keys = [str(p) for p in config.host_keys if p.exists()]
    if not host_keys:
        raise FileNotFoundError("no host key found: see host_keys in the configuration")
    servers = []
    for address in config.listen:
        host, port = parse_listen(address)
        servers.append(
            await asyncssh.create_server(
                lambda: LibrarySSHServer(runtime),
                host,
                port,
                server_host_keys=host_keys,
                allow_scp=False,
                agent_forwarding=False,
                x11_forwarding=False,
                allow_pty=False,
                keepalive_interval=60,
                login_timeout=60,
            )
        )
    reload_event = asyncio.Event()
    tasks = [
        asyncio.create_task(_poll_catalogue(runtime)),
        asyncio.create_task(_watch_policies(runtime, config, reload_event)),
        asyncio.create_task(_sweep_staging(runtime)),
    ]
    service = RunningService(runtime, servers, tasks, reload_event)
    log.info("service_started", listen=list(config.listen), ports=service.ports, policy_digest=snapshot.digest)
    return service


async def _serve(config: Config) -> None:
    service = await start(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, service.reload_event.set)
    await stop.wait()
    log.info("service_stopping")
    await service.stop(config.limits.stop_timeout_seconds)
    log.info("service_stopped")


def serve(config: Config) -> int:
    configure_logging()
    try:
        asyncio.run(_serve(config))
    except PolicyError as exc:
        for problem in exc.errors:
            log.error("policy_refused", error=str(problem))
        return 1
    return 0
