"""cfl-sftp, stock asyncssh and OpenSSH's sshd side by side on loopback, with the same workloads (issue 9).

Each run starts three servers afresh, each on a spare 127.0.0.1 port:

* **OpenSSH**: ``/usr/sbin/sshd -D -e -f <private sshd_config>`` with ``Subsystem sftp internal-sftp``,
  ``MaxStartups 1000`` and ``MaxSessions 1000`` (the defaults, 10:30:100 and 10, drop or refuse logins when 200
  arrive at once), as in ``benchmarks.sftp_vs_openssh`` (never the system's sshd or its configuration; installed
  behind a ``policy-rc.d`` guard if missing); the client logs in as root;
* **asyncssh**: ``benchmarks.stock_asyncssh_server``, a plain ``asyncssh.SFTPServer`` chrooted to a temp folder,
  in its own process;
* **cfl-sftp**: ``cfl-sftp serve --config`` on a deployment built like ``tests/deployments.py``, whose policy
  entitles ``northern-ops`` to ESME 1A2B/0001/0100 images, with a 4 MiB image seeded through the gateway before
  it starts, and ``[limits]`` raised so that one user may hold 200 sessions (``sessions_per_user = 1000``,
  ``unauthenticated_connections = 1000``; the defaults are 64 and 200).

Workloads, the same for all three (server order rotated from run to run; MB = 10^6 bytes, GB = 10^9):

1. **upload** of a 1 GiB file with OpenSSH's ``sftp -b`` (``Ciphers=aes128-gcm@openssh.com``): for cfl-sftp a
   package into ``/incoming`` that the gateway accepts (a new firmware version every run), for the others the
   same bytes into a folder; timed from sftp echoing ``put`` to echoing the next command (close included);
2. **download** of that file (cfl-sftp: the accepted image under ``/images``) to ``/dev/null``, timed the same way;
3. **200 sessions**: a separate client process (asyncssh; ``--client-procs`` splits it) opens 200 connections at
   the same moment, each logs in, downloads the 4 MiB file into memory and closes: aggregate MB/s (bytes of the
   sessions that succeeded / first start to last end), failures, p95 of the session time (connect to close);
4. **sessions/s**: 20 parallel clients in a separate process, each in a loop: connect, authenticate, list the
   folder that holds the 4 MiB file, close; sessions completed / time, over ``--rate-seconds``.

The asyncssh clients use ``aes128-gcm@openssh.com``, ``curve25519-sha256`` and ``ssh-ed25519`` host keys against
every server, and are made as cheap as asyncssh allows (the key read once, uvloop, no disabled-log formatting, no
empty ``MSG_IGNORE`` per packet; see ``client_main``), so that the concurrent workloads measure the servers.
During each workload the server's whole process tree is watched: peak RSS (summed over the tree,
sampled from /proc) and CPU time (utime + stime of the live tree, plus what the processes that ended left in
their parents' cutime/cstime, so sshd's short-lived per-connection processes are counted too), given as CPU s
per GB moved (per session for sessions/s). Printed: a table of medians with cfl-sftp and asyncssh as ratios to
OpenSSH and the issue's targets; written to ``--out``: ``compare.png`` (the ratios as a chart) and
``compare.json`` (every figure of every run). ``--profile`` then records cfl-sftp under py-spy during each
workload and prints where its time goes. ``--workloads`` picks a subset of ``single,sessions,rate``.

Run as root from the repository root::

    .venv/bin/python -m benchmarks.compare                                   # 3 runs of 1 GiB, ~15 minutes
    .venv/bin/python -m benchmarks.compare --runs 1 --size 64MiB --sessions 50 --rate-seconds 3 --out /tmp/cmp
    .venv/bin/python -m benchmarks.compare --runs 1 --profile /tmp/cmp/profile
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import posixpath
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks._common import (
    GB,
    MB,
    BuiltPackage,
    FreshVersions,
    MiB,
    RssSampler,
    build_package_file,
    free_port,
    load_note,
    parse_size,
    size_label,
    tree_cpu_seconds,
    tree_pids,
    wait_for_port,
    wait_for_quiet,
)
from benchmarks.sftp_vs_openssh import (
    CIPHER,
    START_TIMEOUT,
    Client,
    Login,
    PySpyRecording,
    Server,
    ensure_openssh_server,
    keygen,
    known_hosts_line,
    privsep_dir,
    settle,
    start_cfl,
    start_sshd,
    summarise_profile,
)
from cfl_sftp.event_loop import new_event_loop
from cfl_sftp.logs import skip_disabled_asyncssh_logs
from cfl_sftp.sftp.wire import drop_needless_packet_work

REPO_ROOT = Path(__file__).resolve().parents[1]
KEX = "curve25519-sha256"
# asyncssh's client prefers RSA host keys; cfl-sftp has an RSA-3072 key beside its Ed25519 one, the others only
# Ed25519. Pinned, every server signs the key exchange with Ed25519, as the OpenSSH client would choose.
HOST_KEY_ALG = "ssh-ed25519"
SSHD_EXTRA = "MaxStartups 1000\nMaxSessions 1000\n"
CFL_LIMITS = {"sessions_per_user": "1000", "unauthenticated_connections": "1000"}
SMALL_NAME = "small.bin"
CLIENT_TIMEOUT = 300.0
LABELS = ("OpenSSH", "asyncssh", "cfl-sftp")
REFERENCE = "OpenSSH"
WORKLOADS = ("single", "sessions", "rate")


# -- the concurrent clients (a separate process: ``python -m benchmarks.compare _client ...``) ---------------


async def _connect(args: argparse.Namespace) -> Any:
    import asyncssh

    return await asyncssh.connect(
        "127.0.0.1", args.port, username=args.user, client_keys=args.client_keys, known_hosts=None,
        agent_path=None, config=None, encryption_algs=[CIPHER], kex_algs=[KEX], server_host_key_algs=[HOST_KEY_ALG],
    )


async def _download_session(args: argparse.Namespace) -> tuple[float, float, int]:
    started = time.time()
    async with await _connect(args) as conn, conn.start_sftp_client() as sftp, sftp.open(args.path, "rb") as f:
        data = await f.read()
    return started, time.time(), len(data)


async def _listing_sessions(args: argparse.Namespace, deadline: float, record: dict[str, list[Any]]) -> None:
    while time.time() < deadline:
        started = time.time()
        try:
            async with await _connect(args) as conn, conn.start_sftp_client() as sftp:
                await sftp.listdir(args.path)
            record["sessions"].append((started, time.time()))
        except Exception as exc:  # every failure is counted and described; none stops the loop
            record["errors"].append(f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(0.05)


async def _client(args: argparse.Namespace) -> dict[str, Any]:
    await asyncio.sleep(max(0.0, args.start_at - time.time()))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    started = time.time()
    record: dict[str, list[Any]] = {"sessions": [], "errors": []}
    if args.mode == "download":
        outcomes = await asyncio.gather(
            *(asyncio.wait_for(_download_session(args), args.timeout) for _ in range(args.count)),
            return_exceptions=True,
        )
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                record["errors"].append(f"{type(outcome).__name__}: {outcome}")
            elif outcome[2] != args.expect_bytes:
                record["errors"].append(f"short read: {outcome[2]} of {args.expect_bytes} bytes")
            else:
                record["sessions"].append(outcome)
    else:
        deadline = started + args.seconds
        await asyncio.gather(*(_listing_sessions(args, deadline, record) for _ in range(args.count)))
    ended = time.time()
    used = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (used.ru_utime + used.ru_stime) - (usage.ru_utime + usage.ru_stime)
    return {**record, "start": started, "end": ended, "cpu": cpu}


def client_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="the concurrent client of benchmarks.compare")
    parser.add_argument("mode", choices=["download", "listing"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--user", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--path", required=True)
    parser.add_argument("--count", type=int, required=True, help="sessions (download) or parallel loops")
    parser.add_argument("--expect-bytes", type=int, default=0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--start-at", type=float, required=True, help="wall-clock time to begin")
    parser.add_argument("--result", type=Path, required=True)
    args = parser.parse_args(argv)
    # As cheap a client as asyncssh allows, the same for every server, so that the concurrent workloads measure
    # the servers: the key is read once, not at every connect; the loop is the one cfl-sftp serves on;
    # asyncssh's disabled log calls return before formatting; and, like OpenSSH's client, it sends no empty
    # MSG_IGNORE before each packet and seals AES-GCM without extra copies (cfl_sftp.sftp.wire).
    import asyncssh

    args.client_keys = [asyncssh.read_private_key(args.key)]
    skip_disabled_asyncssh_logs()
    drop_needless_packet_work()
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        result = runner.run(_client(args))
    args.result.write_text(json.dumps(result))
    return 0


# -- the servers ----------------------------------------------------------------------------------------------


@dataclass
class Target:
    """A started server and where each workload finds its files in that server's tree."""

    server: Server
    small_path: str
    small_size: int
    list_path: str
    files_dir: Path | None  # where uploads land on disk (None for cfl-sftp: its library)
    root: Path | None = None  # a folder to remove when the target stops

    @property
    def label(self) -> str:
        return self.server.label

    def stop(self) -> None:
        self.server.stop()
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)

    def remove_uploads(self) -> None:
        if self.files_dir is not None:
            for path in self.files_dir.iterdir():
                path.unlink()


def start_openssh(workdir: Path, small: bytes) -> Target:
    server = start_sshd(workdir, "OpenSSH", "internal-sftp", extra_config=SSHD_EXTRA)
    files = Path(server.upload_dir)
    small_dir = files.parent / "small"
    small_dir.mkdir()
    (small_dir / SMALL_NAME).write_bytes(small)
    return Target(server, str(small_dir / SMALL_NAME), len(small), str(small_dir), files)


def start_asyncssh(workdir: Path, small: bytes) -> Target:
    folder = workdir / "asyncssh"
    (folder / "root" / "up").mkdir(parents=True)
    (folder / "root" / "small").mkdir()
    (folder / "root" / "small" / SMALL_NAME).write_bytes(small)
    keygen(folder / "host_key")
    keygen(folder / "client_key")
    (folder / "authorized_keys").write_text((folder / "client_key.pub").read_text())
    port = free_port()
    known = folder / "known_hosts"
    known.write_text(known_hosts_line(port, folder / "host_key.pub"))
    log_path = folder / "server.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.stock_asyncssh_server", "--port", str(port), "--host-key",
             str(folder / "host_key"), "--authorized-keys", str(folder / "authorized_keys"),
             "--root", str(folder / "root")],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO_ROOT,
        )
    login = Login("bench", folder / "client_key")
    server = Server(label="asyncssh", port=port, process=process, known_hosts=known, uploader=login,
                    downloader=login, upload_dir="/up", is_cfl=False, log_path=log_path)
    target = Target(server, f"/small/{SMALL_NAME}", len(small), "/small", folder / "root" / "up", folder)
    try:
        wait_for_port(port, START_TIMEOUT, alive=lambda: process.poll() is None)
    except BaseException:
        target.stop()
        raise
    return target


def start_cfl_target(workdir: Path, small_package_size: int) -> Target:
    from benchmarks.audit_under_load import seed_library

    seeded: list[tuple[str, int]] = []

    def seed(dut: Any) -> None:
        seeded.append(seed_library(dut.deployment, dut.root, small_package_size))

    server, root = start_cfl(workdir, settings=CFL_LIMITS, prepare=seed)
    image_path, image_size = seeded[0]
    return Target(server, image_path, image_size, posixpath.dirname(image_path), None, root)


# -- measuring one workload -----------------------------------------------------------------------------------


def wait_tree_settled(target: Target, timeout: float = 30.0) -> None:
    """Until the server's per-connection processes (sshd) have gone, so one workload's end is not the next's."""
    deadline = time.monotonic() + timeout
    while len(tree_pids(target.server.process.pid)) > 1 and time.monotonic() < deadline:
        time.sleep(0.1)


def listen_overflows() -> int:
    """The kernel's count of connections dropped because a listen queue was full (``nstat`` TcpExtListenOverflows):
    each costs its client a 1 s SYN retransmit, so it shows whether a server's listen backlog was too short."""
    lines = Path("/proc/net/netstat").read_text().splitlines()
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            return int(dict(zip(names.split(), values.split(), strict=True))["ListenOverflows"])
    return 0


class Watch:
    """Peak RSS (sampled every ``interval`` s, unless None) and CPU time of a server's process tree over a block.

    A sample walks all of /proc (about 4 ms of CPU with 160 processes, more with sshd's 600 during 200 sessions),
    so only one sampler runs at a time: ``sftp_vs_openssh.Client.run`` already samples the single streams."""

    def __init__(self, target: Target, interval: float | None) -> None:
        self.pid = target.server.process.pid
        self.sampler = RssSampler(self.pid, tree=True, interval=interval) if interval else None
        self.cpu = 0.0
        self._cpu_start = 0.0
        self.listen_overflows = 0
        self._overflows_start = 0

    def __enter__(self) -> Watch:
        self._cpu_start = tree_cpu_seconds(self.pid)
        self._overflows_start = listen_overflows()
        if self.sampler:
            self.sampler.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.sampler:
            self.sampler.__exit__(*exc)

    def finish(self, target: Target) -> None:
        """After the workload's sessions have ended: the CPU they cost, all of it."""
        wait_tree_settled(target)
        self.cpu = tree_cpu_seconds(self.pid) - self._cpu_start
        self.listen_overflows = listen_overflows() - self._overflows_start

    @property
    def peak_mib(self) -> float:
        return self.sampler.peak / MiB if self.sampler else float("nan")


Run = dict[str, float]  # one server's figures in one run


def single_stream(client: Client, target: Target, package: BuiltPackage, run: Run) -> None:
    server = target.server
    remote = server.upload_path(package)
    for what, login, command, size in (
        ("upload", server.uploader, f"put {package.path} {remote}", package.size),
        ("download", server.downloader, f"get {server.download_path(package)} /dev/null",
         package.image_size if server.is_cfl else package.size),
    ):
        settle()
        with Watch(target, None) as watch:
            result = client.run(server, login, [command])  # samples the peak RSS every 50 ms
        watch.finish(target)
        if result.returncode != 0:
            raise RuntimeError(f"{what} on {target.label} failed (sftp exit {result.returncode}):\n{result.text()}")
        seconds = result.command_seconds(command.split()[0])
        run[f"{what}_mbps"] = size / seconds / MB
        run[f"{what}_cpu_per_gb"] = watch.cpu / (size / GB)
        run[f"{what}_peak_rss_mib"] = result.peak_rss / MiB
        run[f"{what}_client_cpu"] = result.client_cpu
        print(f"    {target.label:<9} {what:<8} {run[f'{what}_mbps']:8.1f} MB/s   server CPU "
              f"{run[f'{what}_cpu_per_gb']:5.2f} s/GB   peak RSS {result.peak_rss / MiB:7.1f} MiB", flush=True)


def run_clients(target: Target, mode: str, args: argparse.Namespace, workdir: Path, *,
                count: int, path: str) -> list[dict[str, Any]]:
    """``--client-procs`` client processes sharing ``count`` sessions (or loops), started at the same moment."""
    server = target.server
    login = server.downloader
    procs = max(1, min(args.client_procs, count))
    start_at = time.time() + 2.0  # every process has imported asyncssh and waits by then
    children = []
    for index in range(procs):
        share = count // procs + (1 if index < count % procs else 0)
        result = workdir / f"client-{mode}-{index}.json"
        result.unlink(missing_ok=True)
        log = (workdir / f"client-{mode}-{index}.log").open("wb")
        process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.compare", "_client", mode, "--port", str(server.port),
             "--user", login.user, "--key", str(login.key), "--path", path, "--count", str(share),
             "--expect-bytes", str(target.small_size), "--seconds", str(args.rate_seconds),
             "--start-at", str(start_at), "--result", str(result)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO_ROOT,
        )
        children.append((process, result, log))
    results = []
    for process, result, log in children:
        try:
            process.wait(timeout=CLIENT_TIMEOUT + args.rate_seconds)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        log.close()
        if process.returncode != 0 or not result.exists():
            text = Path(log.name).read_text(errors="replace")[-3000:]
            raise RuntimeError(f"a {mode} client for {target.label} exited with {process.returncode}:\n{text}")
        results.append(json.loads(result.read_text()))
    return results


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def client_share(results: list[dict[str, Any]]) -> float:
    """The busiest client process's CPU time as a share of one core over its workload (near 1: client-bound)."""
    return max(r["cpu"] / max(r["end"] - r["start"], 1e-9) for r in results)


@dataclass
class ClientsOutcome:
    """What the client processes of one concurrent workload saw, and what the server spent meanwhile."""

    results: list[dict[str, Any]]
    watch: Watch
    log_path: Path

    @property
    def sessions(self) -> list[list[float]]:
        return [s for r in self.results for s in r["sessions"]]

    @property
    def errors(self) -> list[str]:
        return [e for r in self.results for e in r["errors"]]

    def print_errors(self) -> None:
        """A few of the client's errors and the end of the server's log, which usually says why."""
        for error in sorted(set(self.errors))[:3]:
            print(f"      e.g. {error}")
        if self.errors and self.log_path.exists():
            for line in self.log_path.read_text(errors="replace").splitlines()[-3:]:
                print(f"      server log: {line[:200]}")


def measure_clients(target: Target, mode: str, args: argparse.Namespace, workdir: Path, *, count: int,
                    path: str) -> ClientsOutcome:
    settle()
    with Watch(target, 0.1) as watch:
        results = run_clients(target, mode, args, workdir, count=count, path=path)
    watch.finish(target)
    return ClientsOutcome(results, watch, target.server.log_path)


def many_sessions(target: Target, args: argparse.Namespace, workdir: Path, run: Run) -> None:
    outcome = measure_clients(target, "download", args, workdir, count=args.sessions, path=target.small_path)
    sessions, errors, watch = outcome.sessions, outcome.errors, outcome.watch
    moved = sum(s[2] for s in sessions)
    span = (max(s[1] for s in sessions) - min(s[0] for s in sessions)) if sessions else float("nan")
    run["many_mbps"] = moved / span / MB if sessions else 0.0
    run["many_failures"] = len(errors)
    run["many_p95_s"] = percentile([s[1] - s[0] for s in sessions], 0.95)
    run["many_peak_rss_mib"] = watch.peak_mib
    run["many_cpu_per_gb"] = watch.cpu / (moved / GB) if moved else float("nan")
    run["many_client_share"] = client_share(outcome.results)
    run["many_listen_overflows"] = watch.listen_overflows
    print(f"    {target.label:<9} {args.sessions} sessions {run['many_mbps']:7.1f} MB/s   failures {len(errors)}   "
          f"p95 {run['many_p95_s']:.2f} s   peak RSS {watch.peak_mib:7.1f} MiB   server CPU "
          f"{run['many_cpu_per_gb']:.2f} s/GB   client busy {run['many_client_share']:.0%}   "
          f"listen overflows {watch.listen_overflows}", flush=True)
    outcome.print_errors()


def session_rate(target: Target, args: argparse.Namespace, workdir: Path, run: Run) -> None:
    outcome = measure_clients(target, "listing", args, workdir, count=args.parallel, path=target.list_path)
    sessions, errors, watch, results = outcome.sessions, outcome.errors, outcome.watch, outcome.results
    span = max(r["end"] for r in results) - min(r["start"] for r in results)
    run["rate_sps"] = len(sessions) / span
    run["rate_failures"] = len(errors)
    run["rate_p95_ms"] = percentile([(s[1] - s[0]) * 1000 for s in sessions], 0.95)
    run["rate_peak_rss_mib"] = watch.peak_mib
    run["rate_cpu_ms_per_session"] = watch.cpu * 1000 / max(len(sessions), 1)
    run["rate_client_share"] = client_share(results)
    print(f"    {target.label:<9} {args.parallel} parallel {run['rate_sps']:7.1f} sessions/s   "
          f"failures {len(errors)}   "
          f"server CPU {run['rate_cpu_ms_per_session']:.2f} ms/session   peak RSS {watch.peak_mib:7.1f} MiB   "
          f"client busy {run['rate_client_share']:.0%}", flush=True)
    outcome.print_errors()


# -- runs -----------------------------------------------------------------------------------------------------


def start_targets(workdir: Path, args: argparse.Namespace, small: bytes) -> list[Target]:
    targets: list[Target] = []
    try:
        targets.append(start_openssh(workdir, small))
        targets.append(start_asyncssh(workdir, small))
        targets.append(start_cfl_target(workdir, args.small_size + 16 * 1024))
    except BaseException:
        for target in targets:
            target.stop()
        raise
    return targets


def one_run(index: int, args: argparse.Namespace, workdir: Path, client: Client, *, versions: FreshVersions,
            small: bytes) -> dict[str, Run]:
    folder = workdir / f"run-{index}"
    folder.mkdir()
    targets = start_targets(folder, args, small)
    shift = index % len(targets)
    targets = targets[shift:] + targets[:shift]
    print(f"run {index + 1}/{args.runs} ({load_note()}): order {', '.join(t.label for t in targets)}", flush=True)
    figures: dict[str, Run] = {t.label: {"load_before": os.getloadavg()[0]} for t in targets}
    package = build_package_file(folder / "bench.cfl", args.size, versions()) if "single" in args.workloads else None
    try:
        for target in targets if package else []:
            single_stream(client, target, package, figures[target.label])
            target.remove_uploads()
        for target in targets if "sessions" in args.workloads else []:
            many_sessions(target, args, folder, figures[target.label])
        for target in targets if "rate" in args.workloads else []:
            session_rate(target, args, folder, figures[target.label])
    finally:
        if package:
            package.path.unlink(missing_ok=True)
        for target in targets:
            target.stop()
        shutil.rmtree(folder, ignore_errors=True)
    return figures


# -- the profile ----------------------------------------------------------------------------------------------


def profile_cfl(args: argparse.Namespace, workdir: Path, client: Client, versions: FreshVersions,
                small: bytes) -> dict[str, str]:
    """Each workload once more against a fresh cfl-sftp, under ``py-spy record``; summaries by workload."""
    out: Path = args.profile
    out.mkdir(parents=True, exist_ok=True)
    folder = workdir / "profile"
    folder.mkdir()
    target = start_cfl_target(folder, args.small_size + 16 * 1024)
    server = target.server
    rate = 100
    summaries: dict[str, str] = {}
    package = build_package_file(folder / "bench.cfl", args.size, versions())
    scratch: Run = {}
    workloads: list[tuple[str, Callable[[], None]]] = [
        ("upload", lambda: _check(client.run(server, server.uploader,
                                             [f"put {package.path} {server.upload_path(package)}"]))),
        ("download", lambda: _check(client.run(server, server.downloader,
                                               [f"get {server.download_path(package)} /dev/null"]))),
        ("sessions", lambda: many_sessions(target, args, folder, scratch)),
        ("rate", lambda: session_rate(target, args, folder, scratch)),
    ]
    try:
        for name, workload in workloads:
            if {"upload": "single", "download": "single"}.get(name, name) not in args.workloads:
                continue
            settle()
            raw = out / f"{name}.raw.txt"
            with PySpyRecording(server.process.pid, raw, rate) as recording:
                workload()
            summary = summarise_profile(raw, recording.seconds, rate, top=15)
            (out / f"{name}.summary.txt").write_text(summary + "\n")
            summaries[name] = summary
            print(f"\npy-spy profile of cfl-sftp, {name} (raw stacks in {raw}):\n{summary}", flush=True)
    finally:
        package.path.unlink(missing_ok=True)
        target.stop()
    return summaries


def _check(result: Any) -> None:
    if result.returncode != 0:
        raise RuntimeError(f"sftp exited with {result.returncode}:\n{result.text()}")


# -- the table, the chart, the JSON ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Metric:
    key: str
    name: str
    unit: str
    target: str = ""  # ">= 1.0", "<= 0.15" (ratios to OpenSSH) or "= 0" (the figure itself), for cfl-sftp
    chart: bool = True  # drawn as a ratio to OpenSSH
    digits: int = 1

    @property
    def workload(self) -> str:
        return {"download": "single", "upload": "single", "many": "sessions", "rate": "rate"}[self.key.split("_")[0]]

    @property
    def better(self) -> str:
        return "higher" if self.unit in {"MB/s", "1/s"} else "lower"


def metrics(args: argparse.Namespace) -> list[Metric]:
    size, n, p = size_label(args.size), args.sessions, args.parallel
    every = [
        Metric("download_mbps", f"{size} download", "MB/s", ">= 1.0"),
        Metric("upload_mbps", f"{size} upload (cfl-sftp: gateway)", "MB/s", ">= 0.9"),
        Metric("download_cpu_per_gb", f"{size} download, server CPU", "s/GB", digits=2),
        Metric("upload_cpu_per_gb", f"{size} upload, server CPU", "s/GB", digits=2),
        Metric("download_peak_rss_mib", f"{size} download, server peak RSS", "MiB"),
        Metric("upload_peak_rss_mib", f"{size} upload, server peak RSS", "MiB"),
        Metric("many_mbps", f"{n} sessions x {size_label(args.small_size)}: aggregate", "MB/s", ">= 1.5"),
        Metric("many_failures", f"{n} sessions: failures", "", "= 0", chart=False, digits=0),
        Metric("many_p95_s", f"{n} sessions: p95 session time", "s", digits=2),
        Metric("many_peak_rss_mib", f"{n} sessions: server peak RSS", "MiB", "<= 0.15"),
        Metric("many_cpu_per_gb", f"{n} sessions: server CPU", "s/GB", digits=2),
        Metric("many_client_share", f"{n} sessions: busiest client process", "core", chart=False, digits=2),
        Metric("many_listen_overflows", f"{n} sessions: listen queue overflows", "", chart=False, digits=0),
        Metric("rate_sps", f"sessions/s, {p} parallel (connect, login, ls, close)", "1/s", ">= 3.0"),
        Metric("rate_failures", "sessions/s: failures", "", "= 0", chart=False, digits=0),
        Metric("rate_p95_ms", "sessions/s: p95 session time", "ms"),
        Metric("rate_cpu_ms_per_session", "sessions/s: server CPU per session", "ms", digits=2),
        Metric("rate_peak_rss_mib", "sessions/s: server peak RSS", "MiB"),
        Metric("rate_client_share", "sessions/s: busiest client process", "core", chart=False, digits=2),
    ]
    return [m for m in every if m.workload in args.workloads]


def medians(runs: list[dict[str, Run]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for label in LABELS:
        keys = {k for run in runs for k in run[label]}
        out[label] = {k: statistics.median(run[label][k] for run in runs if k in run[label]) for k in sorted(keys)}
    return out


def ratio(med: dict[str, dict[str, float]], label: str, key: str) -> float:
    reference = med[REFERENCE].get(key, float("nan"))
    return med[label].get(key, float("nan")) / reference if reference else float("nan")


def verdict(metric: Metric, med: dict[str, dict[str, float]]) -> str:
    if not metric.target:
        return ""
    op, limit = metric.target.split()
    value = med["cfl-sftp"][metric.key] if op == "=" else ratio(med, "cfl-sftp", metric.key)
    met = {">=": value >= float(limit), "<=": value <= float(limit), "=": value == float(limit)}[op]
    return "met" if met else "MISSED"


def print_table(args: argparse.Namespace, med: dict[str, dict[str, float]], loads: list[float]) -> str:
    rows = []
    header = ["figure (medians)", "unit", *LABELS, "cfl/OpenSSH", "asyncssh/OpenSSH", "target (cfl)", ""]
    for metric in metrics(args):
        cells = [metric.name, metric.unit]
        cells += [f"{med[label].get(metric.key, float('nan')):,.{metric.digits}f}" for label in LABELS]
        for label in ("cfl-sftp", "asyncssh"):
            cells.append(f"{ratio(med, label, metric.key):.2f}" if metric.chart else "")
        cells += [metric.target, verdict(metric, med)]
        rows.append(cells)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [f"\nmedians of {args.runs} run{'s' if args.runs > 1 else ''}; 127.0.0.1; sftp client OpenSSH with "
             f"{CIPHER}; load average (1 min) at the start of each run {', '.join(f'{x:.2f}' for x in loads)} "
             f"on {os.cpu_count()} cores; MB = 10^6 bytes"]
    for cells in [header, *rows]:
        lines.append("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in
                               enumerate(zip(cells, widths, strict=True))).rstrip())
        if cells is header:
            lines.append("-" * len(lines[-1]))
    lines.append("targets are ratios to OpenSSH in the same run (issue 9), except failures; for RSS and CPU lower "
                 "is better")
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def draw_chart(args: argparse.Namespace, med: dict[str, dict[str, float]], loads: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    shown = [m for m in metrics(args) if m.chart]
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(shown) + 1.8))
    height = 0.38
    for offset, label, colour in ((-height / 2, "cfl-sftp", "tab:blue"), (height / 2, "asyncssh", "tab:gray")):
        values = [ratio(med, label, m.key) for m in shown]
        ys = [i + offset for i in range(len(shown))]
        bars = ax.barh(ys, values, height=height, color=colour, label=label)
        ax.bar_label(bars, labels=[f"{v:.2f}" for v in values], padding=2, fontsize=7)
    for i, metric in enumerate(shown):
        if metric.target:
            op, limit = metric.target.split()
            ax.plot([float(limit)] * 2, [i - 0.45, i + 0.45], color="tab:red", linewidth=2, label="cfl-sftp target")
            ax.annotate(op, (float(limit), i - 0.45), fontsize=7, color="tab:red", ha="center", va="bottom")
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ticks = [0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10]
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_yticks(range(len(shown)), [f"{m.name} ({m.unit}; {m.better} is better)" for m in shown], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("ratio to OpenSSH sshd internal-sftp (log scale; 1 = same)")
    ax.set_title(f"cfl-sftp and stock asyncssh against OpenSSH sshd on 127.0.0.1\nmedians of {args.runs} run(s) "
                 f"on {os.cpu_count()} cores, load average {min(loads):.1f} to {max(loads):.1f}; "
                 "targets of issue 9 in red",
                 fontsize=9)
    handles, names = ax.get_legend_handles_labels()
    unique = dict(zip(names, handles, strict=True))
    ax.legend(unique.values(), unique.keys(), fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_client"]:
        return client_main(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="runs; medians are reported (default 3)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/compare"),
                        help="folder for compare.txt, .png and .json (default benchmarks/out/compare, git-ignored)")
    parser.add_argument("--size", type=parse_size, default=parse_size("1GiB"), help="the big file (1GiB)")
    parser.add_argument("--small-size", type=parse_size, default=4 * MiB, help="each session's file (4MiB)")
    parser.add_argument("--sessions", type=int, default=200, help="simultaneous download sessions (200)")
    parser.add_argument("--parallel", type=int, default=20, help="parallel clients for sessions/s (20)")
    parser.add_argument("--rate-seconds", type=float, default=10.0, help="length of the sessions/s workload (10)")
    parser.add_argument("--workloads", type=lambda text: set(text.split(",")), default=set(WORKLOADS),
                        help="a comma-separated subset of single,sessions,rate (default all three)")
    parser.add_argument("--client-procs", type=int, default=1,
                        help="client processes sharing the concurrent workloads (1; see the README)")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="then profile cfl-sftp under py-spy in each workload, raw stacks into DIR")
    parser.add_argument("--workdir", type=Path, default=None, help="where the temp folder goes")
    parser.add_argument("--wait-quiet", type=float, default=0, metavar="S",
                        help="first wait up to S seconds for the 1-minute load average to drop below 0.7")
    args = parser.parse_args(argv)
    if not args.workloads or not args.workloads <= set(WORKLOADS):
        parser.error(f"--workloads is a comma-separated subset of {','.join(WORKLOADS)}")
    if not 1 <= args.runs <= 9:
        parser.error("--runs is 1 to 9")
    if not (1 <= args.sessions <= 900 and 1 <= args.parallel <= 200 and 1 <= args.client_procs <= 8):
        parser.error("--sessions is 1 to 900, --parallel 1 to 200, --client-procs 1 to 8")
    if not 0.5 <= args.rate_seconds <= 300:
        parser.error("--rate-seconds is 0.5 to 300")
    if args.size > parse_size("1GiB") or args.size < parse_size("1MiB"):
        parser.error("--size is 1MiB to 1GiB (the default gateway.max_package_bytes is 1 GiB)")
    if not 64 * 1024 <= args.small_size <= 256 * MiB:
        parser.error("--small-size is 64KiB to 256MiB")
    if os.geteuid() != 0:
        parser.error("sshd must run as root for public-key logins to root; run this as root")

    from cfl_sftp.logs import configure_logging

    configure_logging(level="warning")  # the seeding of cfl-sftp's library runs the gateway in this process
    ensure_openssh_server()
    if args.wait_quiet:
        wait_for_quiet(args.wait_quiet)
    args.out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="cfl-bench-compare-", dir=args.workdir))
    versions = FreshVersions()
    small = os.urandom(args.small_size)  # cfl-sftp's image is the same size: its package's image
    runs: list[dict[str, Run]] = []
    try:
        with privsep_dir():
            client = Client(workdir)
            for index in range(args.runs):
                runs.append(one_run(index, args, workdir, client, versions=versions, small=small))
            med = medians(runs)
            loads = [run[REFERENCE]["load_before"] for run in runs]
            table = print_table(args, med, loads)
            draw_chart(args, med, loads, args.out / "compare.png")
            (args.out / "compare.txt").write_text(table + "\n")
            profiles = profile_cfl(args, workdir, client, versions, small) if args.profile else {}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    record = {
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {"cores": os.cpu_count(), "load_end": os.getloadavg()},
        "options": {k: sorted(v) if isinstance(v, set) else str(v) if isinstance(v, Path) else v
                    for k, v in vars(args).items()},
        "metrics": [m.__dict__ for m in metrics(args)],
        "runs": runs,
        "medians": med,
        "ratios_to_openssh": {label: {k: ratio(med, label, k) for k in med[label]} for label in LABELS},
        "profiles": profiles,
    }
    (args.out / "compare.json").write_text(json.dumps(record, indent=1, default=str))
    print(f"\nwritten: {args.out / 'compare.png'}, {args.out / 'compare.json'}, {args.out / 'compare.txt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
