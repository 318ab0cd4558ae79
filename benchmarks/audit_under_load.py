"""How fast a second writer can append to the audit trail while the service is busy serving downloads (SPEC 8).

A deployment built like ``tests/deployments.py`` gets one image of ``--image-size`` (default 4 MiB, seeded
through the gateway in process before the server starts); ``cfl-sftp serve`` then runs as its own process on a
free 127.0.0.1 port, with SQLite in WAL mode and ``synchronous=FULL`` as the service always runs it. A separate
client process (asyncssh, ``aes128-gcm@openssh.com``) logs in ``--sessions`` (default 20) connections as
``northern-ops`` and has each download the image into memory over and over, logging in afresh after every
``--downloads-per-login`` downloads. The service writes these entries:

* ``image-downloaded`` when a download opens: one transaction each, in a worker thread, and the OPEN reply waits
  on it;
* ``image-downloaded`` again when it closes (with ``bytes_served``), ``login-accepted`` and ``session-closed``:
  queued and written by ``audit_writer.AuditWriter`` in group commits (``append_many``) every 20 ms or so.

Meanwhile this process appends to the same SQLite database through its own ``Database`` (the service's engine
settings), in turn: no writer; ``audit_store.append`` with one transaction per entry; ``audit_store.append_many``
with ``--batch`` (default 100) entries per transaction. The same two writers also run before the clients start,
with the server idle, for comparison. Entries look like a real ``image-downloaded`` entry
(``benchmarks.audit_append.event``). Per phase it prints:

* the writer's entries and transactions per second, and per transaction the time in all, the part spent waiting
  for SQLite's write lock (``BEGIN IMMEDIATE``, timed by engine events) and the part spent in ``COMMIT`` (the WAL
  write and its fsync, plus any automatic WAL checkpoint); the rest is building and inserting the rows;
* the entries the service wrote, counted afterwards from ``audit_entries.time`` (the writer's own ``seq``
  values are left out), split by kind;
* the downloads completed and their MB/s (MB = 10^6 bytes), and the time from sending OPEN to its reply, which
  includes the service's audit transaction for the open;
* the CPU time of the service, the client process and this process, as a share of one core.

After the clients stop, the server is stopped (SIGTERM: it flushes its queue and signs a checkpoint) and the
trail is checked: ``seq`` must be exactly 1..n (count, minimum, maximum and the head row's size agree), and
``audit_trail.verify_trail`` recomputes the whole tree against the signed checkpoints.

Run from the repository root::

    .venv/bin/python -m benchmarks.audit_under_load                      # about a minute
    .venv/bin/python -m benchmarks.audit_under_load --phase-seconds 20 --downloads-per-login 1

Everything is made in a temp folder (``--workdir`` to choose where) and removed at the end; the client is
killed if it overruns its time by a minute, the server is stopped with SIGTERM (killed if it has not stopped
within 30 s).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncssh
from sqlalchemy import Engine, event, func, select
from sqlalchemy.engine import Connection

from benchmarks._common import (
    MB,
    FreshVersions,
    MiB,
    build_package_file,
    cpu_seconds,
    free_port,
    load_note,
    parse_size,
    size_label,
    wait_for_port,
    wait_for_quiet,
)
from benchmarks.audit_append import event as audit_event
from cfl_sftp.audit_trail import verify_trail
from cfl_sftp.config import load_config
from cfl_sftp.deployment import Deployment
from cfl_sftp.domain.errors import Outcome
from cfl_sftp.intake import PackageUpload, Uploader, feed_chunks, file_chunks
from cfl_sftp.logs import configure_logging
from cfl_sftp.storage import audit_store
from cfl_sftp.storage.db import Database
from cfl_sftp.storage.models import AuditEntryRow, AuditHeadRow
from tests.deployments import make_deployment

REPO_ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT = 60.0
CLIENT_GRACE = 60.0
"""How long past its window the client may take to finish its last downloads and print its results."""


# -- the client process -------------------------------------------------------------------------------------


Login = tuple[asyncssh.SSHClientConnection, asyncssh.SFTPClient]


@dataclass
class ClientRecord:
    """What the client saw: per download (OPEN sent, OPEN answered, last byte read, bytes), wall clock."""

    downloads: list[tuple[float, float, float, int]] = field(default_factory=list)
    logins: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


async def _login(args: argparse.Namespace) -> Login:
    conn = await asyncssh.connect(
        "127.0.0.1", args.port, username="northern-ops", client_keys=[args.key], known_hosts=None,
        agent_path=None, config=None, encryption_algs=["aes128-gcm@openssh.com"],
    )
    return conn, await conn.start_sftp_client()


async def _session(args: argparse.Namespace, first: Login, deadline: float, record: ClientRecord) -> None:
    """One download session: ``--downloads-per-login`` downloads per login, until ``deadline`` (wall clock)."""
    pending: Login | None = first
    while time.time() < deadline:
        try:
            if pending is None:
                pending = await _login(args)
                record.logins.append(time.time())
            conn, sftp = pending
            pending = None
            try:
                for _ in range(args.downloads_per_login):
                    if time.time() >= deadline:
                        break
                    asked = time.time()
                    async with sftp.open(args.path, "rb") as handle:
                        opened = time.time()
                        data = await handle.read()
                    record.downloads.append((asked, opened, time.time(), len(data)))
                    del data
            finally:
                sftp.exit()
                conn.close()
                await conn.wait_closed()
        except (OSError, asyncssh.Error) as exc:
            record.errors.append(f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(0.2)


async def _client(args: argparse.Namespace) -> dict[str, object]:
    record = ClientRecord()
    # Every session logs in before the window opens, so the window starts with all of them downloading.
    first = await asyncio.gather(*(_login(args) for _ in range(args.sessions)))
    start = time.time()
    temp = Path(args.start_file).with_suffix(".tmp")
    temp.write_text(json.dumps({"start": start}))
    temp.rename(args.start_file)
    await asyncio.gather(*(_session(args, login, start + args.seconds, record) for login in first))
    return {"start": start, "end": time.time(), "downloads": record.downloads, "logins": record.logins,
            "errors": record.errors}


def client_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="the download client of benchmarks.audit_under_load")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--path", required=True)
    parser.add_argument("--sessions", type=int, required=True)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--downloads-per-login", type=int, required=True)
    parser.add_argument("--start-file", required=True)
    parser.add_argument("--result-file", required=True)
    args = parser.parse_args(argv)
    result = asyncio.run(asyncio.wait_for(_client(args), args.seconds + CLIENT_GRACE))
    Path(args.result_file).write_text(json.dumps(result))
    return 0


# -- the writer in this process -----------------------------------------------------------------------------


class TransactionClock:
    """Stamps, through engine events, when ``BEGIN IMMEDIATE`` is sent and returns and when ``COMMIT`` starts.

    The engine sends ``BEGIN IMMEDIATE`` from its own ``begin`` listener (``storage/db.py``), as a statement: the
    cursor events around it time the wait for SQLite's write lock (its busy handler sleeps and retries).
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.begin_sent = self.begin_done = self.commit_sent = 0.0
        event.listen(engine, "before_cursor_execute", self._before_statement)
        event.listen(engine, "after_cursor_execute", self._after_statement)
        event.listen(engine, "commit", self._before_commit)

    def _before_statement(self, _conn: Connection, _cursor: object, statement: str, *_rest: object) -> None:
        if statement.startswith("BEGIN"):
            self.begin_sent = time.perf_counter()

    def _after_statement(self, _conn: Connection, _cursor: object, statement: str, *_rest: object) -> None:
        if statement.startswith("BEGIN"):
            self.begin_done = time.perf_counter()

    def _before_commit(self, _connection: Connection) -> None:
        self.commit_sent = time.perf_counter()

    def remove(self) -> None:
        event.remove(self.engine, "before_cursor_execute", self._before_statement)
        event.remove(self.engine, "after_cursor_execute", self._after_statement)
        event.remove(self.engine, "commit", self._before_commit)


@dataclass
class WriterRun:
    entries: int = 0
    seqs: list[int] = field(default_factory=list)
    total_ms: list[float] = field(default_factory=list)
    lock_ms: list[float] = field(default_factory=list)
    commit_ms: list[float] = field(default_factory=list)


def write_until(db: Database, clock: TransactionClock, batch: int, until: float) -> WriterRun:
    """Append until the wall clock reaches ``until``: ``batch`` 1 through ``append``, otherwise ``append_many``."""
    run = WriterRun()
    while time.time() < until:
        started = time.perf_counter()
        with db.writing() as session:
            if batch == 1:
                run.seqs.append(audit_store.append(session, audit_event(run.entries)))
            else:
                events = [audit_event(run.entries + i) for i in range(batch)]
                run.seqs.extend(audit_store.append_many(session, events))
        ended = time.perf_counter()
        run.entries += batch
        run.total_ms.append(1000 * (ended - started))
        run.lock_ms.append(1000 * (clock.begin_done - clock.begin_sent))
        run.commit_ms.append(1000 * (ended - clock.commit_sent))
    return run


# -- phases -------------------------------------------------------------------------------------------------


@dataclass
class Phase:
    label: str
    batch: int  # 0: no writer in this process
    start: float = 0.0
    end: float = 0.0
    writer: WriterRun = field(default_factory=WriterRun)
    cpu: dict[str, float] = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return self.end - self.start


def run_phase(phase: Phase, db: Database, clock: TransactionClock, until: float, pids: dict[str, int]) -> None:
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    phase.start = time.time()
    if phase.batch:
        phase.writer = write_until(db, clock, phase.batch, until)
    else:
        time.sleep(max(0.0, until - time.time()))
    phase.end = time.time()
    phase.cpu = {name: (cpu_seconds(pid) - before[name]) / phase.seconds for name, pid in pids.items()}


# -- the server and the client ------------------------------------------------------------------------------


def seed_library(deployment: Deployment, tmp: Path, package_size: int) -> tuple[str, int]:
    """Put one fresh package through the gateway; return its image's path in the tree and its size."""
    package = build_package_file(tmp / "bench.cfl", package_size, FreshVersions()())
    try:
        upload = PackageUpload(deployment, Uploader("acme-release", "acme-meters", "benchmark"), "bench.cfl")
        with package.path.open("rb") as source:
            receipt = feed_chunks(upload, file_chunks(source, MiB))
    finally:
        package.path.unlink(missing_ok=True)
    if receipt.outcome is not Outcome.ACCEPTED:
        raise SystemExit(f"the gateway did not accept the benchmark package: {receipt.reason.value}")
    return package.image_path, package.image_size


def start_server(config_path: Path, port: int, log_path: Path) -> subprocess.Popen[bytes]:
    executable = Path(sys.executable).with_name("cfl-sftp")
    argv = [str(executable)] if executable.exists() else [sys.executable, "-m", "cfl_sftp.cli"]
    with log_path.open("wb") as log:
        server = subprocess.Popen([*argv, "serve", "--config", str(config_path)], stdout=log,
                                  stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=config_path.parent)
    try:
        wait_for_port(port, START_TIMEOUT, alive=lambda: server.poll() is None)
    except BaseException:
        stop(server)
        print(log_path.read_text(errors="replace")[-4000:], file=sys.stderr)
        raise
    return server


def stop(process: subprocess.Popen[bytes], *, sigterm_wait: float = 30.0) -> None:
    """SIGTERM this process (one this script started), then SIGKILL if it is still there after the wait."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=sigterm_wait)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def wait_for_file(path: Path, timeout: float, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            raise RuntimeError(f"the client exited ({process.returncode}) before its window opened")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the client's sessions did not all log in within {timeout} s")
        time.sleep(0.01)


def fsync_ms(folder: Path, seconds: float = 1.0) -> float:
    """Median time of a 4 KiB write plus ``fsync`` in ``folder``: the floor under one SQLite commit."""
    path = folder / "fsync-probe"
    times: list[float] = []
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and len(times) < 10_000:
            started = time.perf_counter()
            os.pwrite(fd, b"\0" * 4096, 4096 * (len(times) % 64))
            os.fsync(fd)
            times.append(1000 * (time.perf_counter() - started))
    finally:
        os.close(fd)
        path.unlink()
    return percentile(times, 50)


# -- what the trail holds -----------------------------------------------------------------------------------


def utc(moment: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(moment, dt.UTC)


def server_entries(db: Database, start: float, end: float, ours: set[int]) -> Counter[str]:
    """The service's entries stamped in [start, end), by kind (an ``image-downloaded`` open or close)."""
    kinds: Counter[str] = Counter()
    query = select(AuditEntryRow.seq, AuditEntryRow.event, AuditEntryRow.entry).where(
        AuditEntryRow.time >= utc(start), AuditEntryRow.time < utc(end))
    with db.reading() as session:
        for seq, name, entry in session.execute(query):
            if seq in ours:
                continue
            if name == "image-downloaded":
                kinds[name + (" (close)" if "bytes_served" in json.loads(entry)["details"] else " (open)")] += 1
            else:
                kinds[name] += 1
    return kinds


@dataclass(frozen=True)
class SeqCheck:
    count: int
    lowest: int | None
    highest: int | None
    head_size: int

    @property
    def gap_free(self) -> bool:
        return self.count == self.head_size and self.lowest == 1 and self.highest == self.count


def check_seq(db: Database) -> SeqCheck:
    with db.reading() as session:
        count, lowest, highest = session.execute(
            select(func.count(), func.min(AuditEntryRow.seq), func.max(AuditEntryRow.seq))).one()
        head = session.get(AuditHeadRow, 1)
    return SeqCheck(int(count), lowest, highest, head.size if head is not None else 0)


# -- the report ---------------------------------------------------------------------------------------------


def percentile(values: list[float], share: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(share / 100 * len(ordered)) - 1))]


def p50_p99(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{percentile(values, 50):.1f} / {percentile(values, 99):.1f}"


SHOWN_KINDS = ("image-downloaded (open)", "image-downloaded (close)", "login-accepted", "session-closed")
Download = list[float]  # OPEN sent, OPEN answered, last byte read (wall clock), bytes


def print_table(phases: list[Phase], kinds: list[Counter[str]], downloads: list[list[Download]]) -> None:
    rows: list[tuple[str, list[str]]] = []

    def row(label: str, values: list[str]) -> None:
        rows.append((label, values))

    row("seconds", [f"{p.seconds:.1f}" for p in phases])
    row("writer: entries/s", [f"{p.writer.entries / p.seconds:,.0f}" if p.batch else "-" for p in phases])
    row("writer: transactions/s", [f"{len(p.writer.total_ms) / p.seconds:,.0f}" if p.batch else "-"
                                   for p in phases])
    row("writer: ms per transaction p50 / p99", [p50_p99(p.writer.total_ms) for p in phases])
    row("  of it waiting for the lock p50 / p99", [p50_p99(p.writer.lock_ms) for p in phases])
    row("  of it in COMMIT p50 / p99", [p50_p99(p.writer.commit_ms) for p in phases])
    row("writer: % of the phase waiting / in COMMIT",
        [f"{sum(p.writer.lock_ms) / 10 / p.seconds:.0f} / {sum(p.writer.commit_ms) / 10 / p.seconds:.0f}"
         if p.batch else "-" for p in phases])
    row("writer: longest transaction ms", [f"{max(p.writer.total_ms):.0f}" if p.writer.total_ms else "-"
                                           for p in phases])
    by_phase = list(zip(phases, kinds, strict=True))
    row("service: audit entries/s", [f"{sum(k.values()) / p.seconds:,.0f}" for p, k in by_phase])
    for kind in SHOWN_KINDS:
        row(f"  {kind}/s", [f"{k[kind] / p.seconds:,.1f}" for p, k in by_phase])
    row("  entries of other kinds", [str(sum(n for kind, n in k.items() if kind not in SHOWN_KINDS))
                                     for k in kinds])
    row("downloads/s", [f"{len(d) / p.seconds:,.1f}" if d else "-" for p, d in zip(phases, downloads, strict=True)])
    row("download MB/s (all sessions)", [f"{sum(r[3] for r in d) / p.seconds / MB:,.0f}" if d else "-"
                                         for p, d in zip(phases, downloads, strict=True)])
    row("OPEN -> reply ms p50 / p99", [p50_p99([1000 * (r[1] - r[0]) for r in d])
                                        for d in downloads])
    for name in ("service", "client", "this process"):
        row(f"CPU, % of a core: {name}", [f"{100 * p.cpu[name]:.0f}" if name in p.cpu else "-" for p in phases])

    width = max(len(label) for label, _ in rows) + 2
    column = max(14, *(len(p.label) + 2 for p in phases), *(len(v) + 2 for _, vs in rows for v in vs))
    print(" " * width + "".join(f"{p.label:>{column}}" for p in phases))
    print("-" * (width + column * len(phases)))
    for label, values in rows:
        print(f"{label:<{width}}" + "".join(f"{v:>{column}}" for v in values))


# -- the run ------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace, tmp: Path) -> int:
    port = free_port()
    dut = make_deployment(tmp, settings={"listen": f'["127.0.0.1:{port}"]'})
    try:
        image_path, image_size = seed_library(dut.deployment, tmp, args.image_size)
    finally:
        dut.deployment.close()
    config = load_config(dut.config_path)
    fsync_idle = fsync_ms(config.data_dir)

    server = start_server(dut.config_path, port, tmp / "cfl-sftp.log")
    client: subprocess.Popen[bytes] | None = None
    db = Database(config.database_url)
    clock = TransactionClock(db.engine)
    idle = [Phase("idle: append", 1), Phase(f"idle: many({args.batch})", args.batch)]
    loaded = [Phase("load: none", 0), Phase("load: append", 1), Phase(f"load: many({args.batch})", args.batch)]
    window = args.warmup + args.phase_seconds * len(loaded)
    try:
        pids = {"service": server.pid, "this process": os.getpid()}
        for phase in idle:
            run_phase(phase, db, clock, time.time() + args.idle_seconds, pids)

        start_file, result_file = tmp / "client-start.json", tmp / "client-result.json"
        with (tmp / "client.log").open("wb") as log:
            client = subprocess.Popen(
                [sys.executable, "-m", "benchmarks.audit_under_load", "_client", "--port", str(port),
                 "--key", str(dut.key_path("northern-ops")), "--path", image_path,
                 "--sessions", str(args.sessions), "--seconds", str(window + 0.5),
                 "--downloads-per-login", str(args.downloads_per_login),
                 "--start-file", str(start_file), "--result-file", str(result_file)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO_ROOT,
            )
        wait_for_file(start_file, START_TIMEOUT, client)
        window_start = json.loads(start_file.read_text())["start"] + args.warmup
        time.sleep(max(0.0, window_start - time.time()))
        pids["client"] = client.pid
        for i, phase in enumerate(loaded):
            run_phase(phase, db, clock, window_start + (i + 1) * args.phase_seconds, pids)
        window_end = loaded[-1].end

        try:
            client.wait(timeout=window + CLIENT_GRACE + 10)
        except subprocess.TimeoutExpired:
            stop(client, sigterm_wait=5)
            raise
        if client.returncode != 0:
            print((tmp / "client.log").read_text(errors="replace")[-4000:], file=sys.stderr)
            raise SystemExit(f"the client exited with {client.returncode}")
        result: dict[str, Any] = json.loads(result_file.read_text())
    finally:
        if client is not None:
            stop(client, sigterm_wait=5)
        stop(server)  # SIGTERM: the service flushes its queued entries and signs a checkpoint
        clock.remove()

    phases = idle + loaded
    ours = {seq for phase in phases for seq in phase.writer.seqs}
    kinds = [server_entries(db, p.start, p.end, ours) for p in phases]
    downloads = [[r for r in result["downloads"] if p.start <= r[2] < p.end] for p in phases]
    window_kinds = server_entries(db, window_start, window_end, ours)
    window_downloads = [r for r in result["downloads"] if window_start <= r[2] < window_end]
    seq = check_seq(db)
    db.dispose()

    deployment = Deployment.open(config)
    try:
        started = time.perf_counter()
        report = verify_trail(deployment)
        verify_seconds = time.perf_counter() - started
    finally:
        deployment.close()

    print(f"\naudit appends under download load (SQLite WAL, synchronous=FULL; {args.sessions} asyncssh sessions "
          f"in one client process, {args.downloads_per_login} downloads of a {size_label(image_size)} image "
          f"per login; {load_note()} at the end)")
    print(f"writer in this process on the same database: append = one transaction per entry, many = "
          f"append_many of {args.batch}; 4 KiB write + fsync on this disk, idle: {fsync_idle:.2f} ms\n")
    print_table(phases, kinds, downloads)
    seconds = window_end - window_start
    print(f"\nthe service over the whole loaded window ({seconds:.1f} s): "
          f"{sum(window_kinds.values()) / seconds:,.0f} audit entries/s, "
          f"{len(window_downloads) / seconds:,.1f} downloads/s, "
          f"{sum(r[3] for r in window_downloads) / seconds / MB:,.0f} MB/s; logins in the window "
          f"{sum(window_start <= t < window_end for t in result['logins'])}; client errors "
          f"{len(result['errors'])}")
    for line in result["errors"][:5]:
        print(f"  {line}")
    print(f"seq: {seq.count:,} entries, lowest {seq.lowest}, highest {seq.highest}, head size {seq.head_size:,}: "
          f"{'1..n with no gap' if seq.gap_free else 'NOT CONTIGUOUS'}")
    print(f"verify_trail: {report.entries:,} entries, {report.covered:,} under {report.checkpoints} signed "
          f"checkpoint(s), root {report.root.hex()[:16]}... ({verify_seconds:.1f} s)")
    return 0 if seq.gap_free and not result["errors"] else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_client"]:
        return client_main(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=20, help="concurrent download sessions (default 20)")
    parser.add_argument("--downloads-per-login", type=int, default=5,
                        help="downloads on one connection before it logs in again (default 5)")
    parser.add_argument("--image-size", type=parse_size, default=4 * MiB,
                        help="package size; the image is 16 KiB less (default 4MiB)")
    parser.add_argument("--batch", type=int, default=100, help="entries per append_many transaction")
    parser.add_argument("--phase-seconds", type=float, default=10.0,
                        help="length of each loaded phase (no writer, append, append_many; default 10)")
    parser.add_argument("--idle-seconds", type=float, default=5.0,
                        help="length of each writer phase before the clients start (default 5)")
    parser.add_argument("--warmup", type=float, default=2.0, help="load before the first phase (default 2 s)")
    parser.add_argument("--workdir", type=Path, default=None, help="where the temp folder goes")
    parser.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                        help="first wait up to S s for the 1-minute load average to fall below 0.7")
    args = parser.parse_args(argv)
    if not 1 <= args.sessions <= 60:
        parser.error("--sessions is 1 to 60 (the service allows 64 per user)")
    if not (1 <= args.phase_seconds <= 120 and 1 <= args.idle_seconds <= 60 and 0 <= args.warmup <= 30):
        parser.error("--phase-seconds is 1 to 120, --idle-seconds 1 to 60, --warmup 0 to 30")
    if not 1 <= args.downloads_per_login <= 1000 or not 2 <= args.batch <= 10_000:
        parser.error("--downloads-per-login is 1 to 1000, --batch 2 to 10000")

    configure_logging(level="warning")
    wait_for_quiet(args.wait_quiet)
    tmp = Path(tempfile.mkdtemp(prefix="cfl-bench-audit-load-", dir=args.workdir))
    try:
        return run(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
