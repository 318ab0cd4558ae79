"""Sessions per second and aggregate download speed: one node, and two nodes behind HAProxy (SPEC 9, issue #8).

A deployment built like ``tests/deployments.py`` on a fresh PostgreSQL database (``--postgresql-url``, default
``$CFL_SFTP_TEST_POSTGRESQL_URL``), with ``[limits]`` raised so that every client below is allowed
(``sessions_per_user`` and ``unauthenticated_connections`` 1000), and one 4 MiB image (``--image-size``) seeded
through the gateway before any node starts (and the same on SQLite, for the single-node default). Then, for each
set-up in turn:

* ``1 node, SQLite``: one node on the default database, clients straight to it;
* ``1 node``: one ``cfl-sftp serve`` process, clients straight to it (``proxy_protocol = false``);
* ``1 node + HAProxy``: the same behind a private HAProxy (``mode tcp``, ``send-proxy-v2``): the balancer's cost;
* ``2 nodes + HAProxy``: two ``serve`` processes on the same database and data folder, round robin.

Two workloads, each from ``--client-processes`` (default 2) client processes (asyncssh, ``aes128-gcm``) so that the
client is not one Python thread's worth of CPU:

* **sessions/s**: ``--clients`` (default 20) loops in parallel, each over and over: connect, authenticate
  (Ed25519 key), start SFTP, list ``/images``, close; counted over ``--seconds`` (default 10);
* **download MB/s**: ``--downloads`` (default 200) sessions log in first; once all have, each downloads the image
  once, at the same moment; MB/s = bytes / (last byte - start), MB = 10^6 bytes.

The machine's load average is printed beside the figures; the HAProxy helper of ``tests/cluster.py`` starts and
stops the processes (only those it started).

    CFL_SFTP_TEST_POSTGRESQL_URL=postgresql+psycopg://postgres@127.0.0.1:5432/test \\
        .venv/bin/python -m benchmarks.sessions_multinode
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import shutil
import tempfile
import time
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any

import asyncssh

from benchmarks._common import MB, PACKAGE_OVERHEAD_ALLOWANCE, MiB, load_note, parse_size, wait_for_quiet
from benchmarks.audit_under_load import seed_library
from tests.cluster import running_cluster
from tests.databases import POSTGRESQL_URL_ENV, fresh_postgresql_database
from tests.deployments import DeploymentUnderTest, make_deployment

SETUPS = (("1 node", 1, False), ("1 node + HAProxy", 1, True), ("2 nodes + HAProxy", 2, True))


async def _connect(port: int, key: str) -> asyncssh.SSHClientConnection:
    return await asyncio.wait_for(asyncssh.connect(
        "127.0.0.1", port, username="northern-ops", client_keys=[key], known_hosts=None, agent_path=None,
        config=None, encryption_algs=["aes128-gcm@openssh.com"], preferred_auth="publickey"), 60)


async def _session_loops(port: int, key: str, clients: int, seconds: float, start: float) -> dict[str, Any]:
    await asyncio.sleep(max(0.0, start - time.time()))
    deadline = start + seconds
    done = 0
    errors: list[str] = []

    async def loop() -> None:
        nonlocal done
        while time.time() < deadline:
            try:
                async with await _connect(port, key) as conn, conn.start_sftp_client() as sftp:
                    await sftp.listdir("/images")
                if time.time() <= deadline:
                    done += 1
            except (OSError, asyncssh.Error, TimeoutError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(0.1)

    await asyncio.gather(*(loop() for _ in range(clients)))
    return {"sessions": done, "errors": errors}


async def _downloads(port: int, key: str, sessions: int, path: str, barrier: Barrier) -> dict[str, Any]:
    logins = []
    for _ in range(sessions):  # one after another: a burst of handshakes is the other workload
        conn = await _connect(port, key)
        logins.append((conn, await conn.start_sftp_client()))
    await asyncio.to_thread(barrier.wait)
    start = time.time()

    async def one(sftp: asyncssh.SFTPClient) -> int:
        received = 0
        async with sftp.open(path, "rb") as handle:
            while chunk := await handle.read(MiB):  # pipelined reads; a MiB held at a time
                received += len(chunk)
        return received

    sizes = await asyncio.gather(*(one(sftp) for _, sftp in logins))
    end = time.time()
    for conn, sftp in logins:
        sftp.exit()
        conn.close()
    return {"bytes": sum(sizes), "start": start, "end": end}


def _client(kind: str, args: tuple[Any, ...], results: Any) -> None:
    if kind == "sessions":
        results.put(asyncio.run(_session_loops(*args)))
    else:
        results.put(asyncio.run(_downloads(*args)))


def _run_clients(kind: str, per_process: list[tuple[Any, ...]]) -> list[dict[str, Any]]:
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    processes = [context.Process(target=_client, args=(kind, args, results)) for args in per_process]
    for process in processes:
        process.start()
    found = [results.get(timeout=600) for _ in processes]
    for process in processes:
        process.join(timeout=60)
    return found


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def measure(port: int, key: str, image_path: str, args: argparse.Namespace) -> tuple[float, int, float]:
    """Sessions per second (and errors), and aggregate download MB/s, against ``port``."""
    start = time.time() + 2.0
    runs = _run_clients("sessions", [(port, key, n, args.seconds, start)
                                     for n in _split(args.clients, args.client_processes)])
    sessions = sum(r["sessions"] for r in runs)
    errors = [e for r in runs for e in r["errors"]]
    if errors:
        print(f"    {len(errors)} session errors, e.g. {errors[0]}")
    barrier = multiprocessing.get_context("fork").Barrier(args.client_processes)
    downloads = _run_clients("downloads", [(port, key, n, image_path, barrier)
                                           for n in _split(args.downloads, args.client_processes)])
    total = sum(d["bytes"] for d in downloads)
    seconds = max(d["end"] for d in downloads) - min(d["start"] for d in downloads)
    return sessions / args.seconds, len(errors), total / MB / seconds


def seeded_deployment(folder: Path, url: str | None, image_size: int) -> tuple[DeploymentUnderTest, str, int]:
    """A deployment with raised limits and one image; its image path and size."""
    td = make_deployment(folder, database_url=url, settings={
        "listen": '["127.0.0.1:0"]', "host_keys": '["keys/ssh_host_ed25519_key"]',
        "sessions_per_user": "1000", "unauthenticated_connections": "1000",
    })
    try:
        image_path, size = seed_library(td.deployment, folder, image_size + PACKAGE_OVERHEAD_ALLOWANCE)
    finally:
        td.deployment.close()
    return td, image_path, size


def run(args: argparse.Namespace, tmp: Path) -> int:
    with fresh_postgresql_database() as url:
        (tmp / "pg").mkdir()
        (tmp / "sqlite").mkdir()
        postgresql = seeded_deployment(tmp / "pg", url, args.image_size)
        sqlite = seeded_deployment(tmp / "sqlite", None, args.image_size)
        print(f"image {postgresql[2]} bytes; {args.clients} clients for sessions/s over {args.seconds:g} s; "
              f"{args.downloads} simultaneous downloads; {args.client_processes} client processes")
        print(f"{'set-up':<28} {'sessions/s':>11} {'errors':>7} {'download MB/s':>14}   load")
        setups = [("1 node, SQLite", 1, False, sqlite)] + [
            (f"{label}, PostgreSQL", count, balancer, postgresql) for label, count, balancer in SETUPS]
        for label, count, balancer, (td, image_path, _) in setups:
            folder = tmp / label.replace(" ", "-").replace("+", "").replace(",", "")
            folder.mkdir()
            wait_for_quiet(args.wait_quiet)
            with running_cluster(td.root, folder, count, balancer=balancer) as cluster:
                rate, errors, mbps = measure(cluster.balanced_port, str(td.key_path("northern-ops")), image_path,
                                             args)
            print(f"{label:<28} {rate:>11.1f} {errors:>7} {mbps:>14.1f}   {load_note()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--postgresql-url", default=os.environ.get(POSTGRESQL_URL_ENV))
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--downloads", type=int, default=200)
    parser.add_argument("--image-size", type=parse_size, default=4 * MiB)
    parser.add_argument("--client-processes", type=int, default=2)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--wait-quiet", type=float, default=0.0)
    args = parser.parse_args(argv)
    if not args.postgresql_url:
        raise SystemExit(f"needs a PostgreSQL server: --postgresql-url or ${POSTGRESQL_URL_ENV}")
    os.environ[POSTGRESQL_URL_ENV] = args.postgresql_url
    tmp = Path(tempfile.mkdtemp(prefix="cfl-bench-multinode-", dir=args.workdir))
    try:
        return run(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
