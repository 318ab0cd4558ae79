"""Entitlements at scale (issue 5): policy reloads of 10 million devices under SFTP load, and what they stall.

It writes a policy set of ``--devices`` devices (default 10 million) over ``--models`` device models (2,000) and
``--suppliers`` Suppliers (100), one user per Supplier, with 1 % of the devices in a Change of Supplier (in two
estates, the gaining row dated) and 0.1 % dated in the future; and a library of ``--images`` images (5,000)
over those models, built in memory as the runtime builds its catalogue (no package is uploaded). Then it starts
the real service on 127.0.0.1 in this process and, from a separate client process (asyncssh), lists ``/images``
and reads ``/images/index.json`` of one Supplier in a loop, while it:

1. reloads the edited set the way ``SIGHUP`` does (the service's own watcher, which reads a set this large in a
   worker process), ``--reloads`` times;
2. reloads it once more in a worker *thread* (``--thread-too``), to show what the process avoids.

It prints, per reload: the time from the trigger until the new set is in force; how long ``install_policy``
held the loop; the peak RSS of the worker process and of the service process; the longest event-loop stall
(a ticker task on the service's loop records every gap between its 5 ms ticks) before and after the swap; the
garbage collections over 10 ms in the service process (a full collection holds the GIL, so the loop waits on
it whichever thread runs it); and p50/p99/max of the two SFTP requests while idle and during each reload.
Before that it times, once, the O(spans) and per-user work that a reload causes: building the estate view for
today (done in a thread by the reloader), unpickling the estate timeline (what crosses from the worker), and
one user's view of the catalogue (``Runtime.view_for``: built in a worker thread, once per organisation and
role set, at the first request after every reload or library change). ``--trace-stalls`` samples every
thread's stack while the loop stalls.

Run from the repository root (the 10 million device set takes about 0.35 GB on disk, in ``--workdir`` or a
temp folder, and is kept with ``--keep`` so that a second run skips writing it)::

    .venv/bin/python -m benchmarks.entitlements
    .venv/bin/python -m benchmarks.entitlements --devices 1000000 --thread-too
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import gc
import hashlib
import json
import os
import pickle
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import Any

import asyncssh

from benchmarks._common import load_note, mib, peak_rss_bytes, reset_peak_rss, rss_bytes, wait_for_quiet
from cfl_sftp.catalogue import Catalogue, CatalogueImage
from cfl_sftp.domain.entitlement import build_estate_view
from cfl_sftp.domain.model import DeviceModel, DeviceType, ImageRef, Purpose
from cfl_sftp.logs import configure_logging
from cfl_sftp.policy.reloader import PolicyReloader, ReloadSettings
from cfl_sftp.runtime import TreeCache, settle_heap
from cfl_sftp.service import RunningService, start
from tests.deployments import HEADER, make_deployment

TICK = 0.005
CLIENT_USER_INDEX = 0
MANUFACTURERS = ["1A2B", "3C4D", "5E6F", "7A8B", "9C0D", "A1B2", "C3D4", "E5F6", "0A0B", "1C1D"]
# Mostly electricity and gas meters, as in a real estate; every type appears.
DEVICE_TYPES = [DeviceType.ESME] * 4 + [DeviceType.GSME] * 3 + [DeviceType.CHF, DeviceType.IHD, DeviceType.PPMID]


# -- the data ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    devices: int
    models: int
    suppliers: int
    images: int

    def model(self, index: int) -> DeviceModel:
        return DeviceModel(MANUFACTURERS[index % len(MANUFACTURERS)], f"{index // len(MANUFACTURERS):04X}", "0100")

    def device_type(self, index: int) -> DeviceType:
        return DEVICE_TYPES[index % len(DEVICE_TYPES)]

    def supplier(self, index: int) -> str:
        return f"supplier-{index:03d}"

    def user(self, index: int) -> str:
        return f"ops-{index:03d}"


def write_policy_set(policies: Path, shape: Shape, public_key: str) -> None:
    """Organisations, users, roles and ``shape.devices`` estate rows (deterministic for a shape)."""
    if policies.exists():
        shutil.rmtree(policies)
    (policies / "estates").mkdir(parents=True)
    organisations = ['[[organisation]]\nid = "acme-meters"\nname = "Acme"\nkind = "manufacturer"\n'
                     f"manufacturer_ids = {json.dumps(MANUFACTURERS)}\n"]
    users = []
    for s in range(shape.suppliers):
        organisations.append(
            f'[[organisation]]\nid = "{shape.supplier(s)}"\nname = "Supplier {s}"\nkind = "supplier"\n'
        )
        users.append(f'[[user]]\nname = "{shape.user(s)}"\norganisation = "{shape.supplier(s)}"\n'
                     f'roles = ["import-supplier", "gas-supplier"]\nkeys = ["{public_key}"]\n')
    (policies / "organisations.toml").write_text("\n".join(organisations))
    (policies / "users.toml").write_text("\n".join(users))
    (policies / "roles.toml").write_text(
        '[roles.import-supplier]\ndevice_types = ["ESME", "CHF", "IHD", "PPMID", "CAD", "HCALCS"]\n\n'
        '[roles.gas-supplier]\ndevice_types = ["GSME", "GPF", "CHF", "IHD", "PPMID", "CAD", "HCALCS"]\n'
    )
    rng = random.Random(5)
    firmware = ["", "00000001", "00000002", "00000003", "00000010", "00000011", "00000020", "00010000"]
    rests = [f"{m.manufacturer_id},{m.model_id},{m.hardware_version},{fw},"
             for m in map(shape.model, range(shape.models)) for fw in firmware]
    moved_since = "2026-01-01"
    future_since = (dt.datetime.now(dt.UTC).date() + dt.timedelta(days=30)).isoformat()
    per_supplier = shape.devices // shape.suppliers
    incoming: dict[int, list[str]] = {s: [] for s in range(shape.suppliers)}
    for s in range(shape.suppliers):
        chosen = rng.choices(rests, k=per_supplier)
        ids = [f"D{s:03d}{i:07d}" for i in range(per_supplier)]
        lines = [f"{device},{rest}\n" for device, rest in zip(ids, chosen, strict=True)]
        gaining = (s + 1) % shape.suppliers
        for i in range(0, per_supplier, 100):  # 1 %: Change of Supplier, the gaining row dated
            since = future_since if i % 1000 == 0 else moved_since  # 0.1 % take effect in 30 days
            incoming[gaining].append(f"{ids[i]},{chosen[i]}{since}\n")
        with (policies / "estates" / f"{shape.supplier(s)}.csv").open("w") as out:
            out.write(HEADER)
            out.write("".join(lines))
    for s, lines in incoming.items():
        with (policies / "estates" / f"{shape.supplier(s)}.csv").open("a") as out:
            out.write("".join(lines))


def catalogue_of(shape: Shape) -> Catalogue:
    """``shape.images`` current images over the device models, as ``load_catalogue`` would build them."""
    added = dt.datetime(2026, 1, 15, tzinfo=dt.UTC)
    images = []
    for i in range(shape.images):
        index = i % shape.models
        ref = ImageRef(shape.device_type(index), shape.model(index), f"{i // shape.models + 0x100:08X}", "image.bin")
        manifest = json.dumps({"format": "cfl-package/1", "image": {"name": "image.bin"}, "n": i}).encode()
        images.append(CatalogueImage(
            id=i + 1, ref=ref, sha256=hashlib.sha256(str(i).encode()).hexdigest(), size=400_000 + i,
            purpose=Purpose.SECURITY_FIX, released="2026-01-15", manifest=manifest, signature=b"\x00" * 64,
            release_notes_name=None, release_notes_size=None, release_notes_sha256=None, release_notes_object=None,
            added_at=added,
        ))
    return Catalogue(version=(0, 0, 0), images=tuple(images))  # the empty database's version: never reloaded


# -- measuring the service's loop ---------------------------------------------------------------------------


@dataclass
class Ticker:
    """Records every gap between 5 ms ticks of the loop that is longer than the tick (wall clock, seconds), and
    how much of it the loop's thread spent runnable but waiting for a CPU (``/proc/thread-self/schedstat``): a
    gap that is mostly waiting is the machine's load, not the service holding its loop."""

    gaps: list[tuple[float, float, float]] = field(default_factory=list)
    last_tick: float = field(default_factory=time.monotonic)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        schedstat = Path(f"/proc/self/task/{threading.get_native_id()}/schedstat")
        while True:
            before, waited_before = loop.time(), _run_delay(schedstat)
            self.last_tick = time.monotonic()
            await asyncio.sleep(TICK)
            late = loop.time() - before - TICK
            if late > 0.002:
                self.gaps.append((time.time(), late, _run_delay(schedstat) - waited_before))

    def worst(self, start: float, end: float) -> tuple[float, float]:
        """The longest gap in the window, and how long of it the thread waited for a CPU."""
        return max(((gap, waited) for at, gap, waited in self.gaps if start <= at <= end), default=(0.0, 0.0))


def _run_delay(schedstat: Path) -> float:
    """Seconds this thread has spent runnable but not running, since it started."""
    return int(schedstat.read_text().split()[1]) / 1e9


class GcPauses:
    """Every garbage collection of this process over 10 ms (any thread: it holds the GIL, so the loop waits)."""

    def __init__(self) -> None:
        self.pauses: list[tuple[float, int, float]] = []
        self._started = 0.0

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        elif (pause := time.perf_counter() - self._started) > 0.01:
            self.pauses.append((time.time(), info["generation"], pause))

    def __enter__(self) -> GcPauses:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._callback)

    def within(self, start: float, end: float) -> str:
        found = [(generation, pause) for at, generation, pause in self.pauses if start <= at <= end]
        full = [pause for generation, pause in found if generation == 2]
        return (f"{len(found)} over 10 ms, longest {max((p for _, p in found), default=0) * 1000:.0f} ms; "
                f"{len(full)} full (gen2), longest {max(full, default=0) * 1000:.0f} ms")


def tracked_objects() -> str:
    counts: dict[str, int] = {}
    for obj in gc.get_objects():
        counts[type(obj).__name__] = counts.get(type(obj).__name__, 0) + 1
    top = ", ".join(f"{name} {count:,}" for name, count in sorted(counts.items(), key=lambda item: -item[1])[:6])
    return f"{sum(counts.values()):,} ({top}); frozen (never walked): {gc.get_freeze_count():,}"


def full_collection_ms() -> float:
    """What one full collection of the service process costs now (the loop waits that long whenever one runs)."""
    times = []
    for _ in range(3):
        started = time.perf_counter()
        gc.collect()
        times.append((time.perf_counter() - started) * 1000)
    return min(times)


class StallTracer:
    """With ``--trace-stalls``: when the loop has not ticked for 40 ms, note every thread's innermost frames."""

    def __init__(self, ticker: Ticker) -> None:
        self.ticker = ticker
        self.seen: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = threading.get_ident()
        while not self._stop.wait(0.01):
            if time.monotonic() - self.ticker.last_tick < 0.04:
                continue
            for ident, frame in sys._current_frames().items():
                if ident == me:
                    continue
                stack = []
                current: Any = frame
                while current is not None and len(stack) < 4:
                    stack.append(f"{Path(current.f_code.co_filename).name}:{current.f_code.co_name}:{current.f_lineno}")
                    current = current.f_back
                key = " < ".join(stack)
                self.seen[key] = self.seen.get(key, 0) + 1

    def __enter__(self) -> StallTracer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def report(self) -> None:
        print("\nstack samples while the loop was stalled (10 ms each, all threads; idle pool threads left out):")
        idle = ("thread.py:_worker", "threading.py:wait")
        busy = {key: count for key, count in self.seen.items() if not key.startswith(idle)}
        for key, count in sorted(busy.items(), key=lambda item: -item[1])[:25]:
            print(f"  {count:4d}  {key}")


def child_pids() -> list[int]:
    """This process's direct children, from /proc (cheap: no scan of every process)."""
    found = []
    for task in Path("/proc/self/task").iterdir():
        try:
            found += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


class WorkerRss:
    """Peak RSS of this process's children other than ``exclude`` (the reload worker), sampled every 100 ms."""

    def __init__(self, exclude: set[int]) -> None:
        self.exclude = exclude | {os.getpid()}
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            pids = [p for p in child_pids() if p not in self.exclude]
            self.peak = max(self.peak, sum(rss_bytes(p) for p in pids))
            self._stop.wait(0.1)

    def __enter__(self) -> WorkerRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


# -- the SFTP client (a separate process) ---------------------------------------------------------------------


async def client_loop(port: int, user: str, key: str, stop_file: Path, out: Path) -> None:
    records: list[tuple[float, str, float]] = []
    async with asyncssh.connect("127.0.0.1", port, username=user, client_keys=[key], known_hosts=None,
                                agent_path=None, config=None) as conn, conn.start_sftp_client() as sftp:
        while not stop_file.exists():
            started, t0 = time.time(), time.perf_counter()
            await sftp.listdir("/images")
            records.append((started, "list /images", time.perf_counter() - t0))
            started, t0 = time.time(), time.perf_counter()
            async with sftp.open("/images/index.json", "rb") as index:
                size = len(await index.read())
            records.append((started, "read index.json", time.perf_counter() - t0))
    out.write_text(json.dumps({"records": records, "index_bytes": size}))


def stall(worst: tuple[float, float]) -> str:
    gap, waited = worst
    return f"{gap * 1000:.0f} ms ({waited * 1000:.0f} ms of it waiting for a CPU)"


def percentiles(values: list[float]) -> str:
    if len(values) < 2:
        return "n/a"
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    p50, p99, top = cuts[49] * 1000, cuts[98] * 1000, max(values) * 1000
    return f"p50 {p50:7.1f} ms  p99 {p99:7.1f} ms  max {top:7.1f} ms (n={len(values)})"


# -- the run ------------------------------------------------------------------------------------------------


@dataclass
class Window:
    name: str
    start: float
    end: float
    details: dict[str, Any]
    swap: float | None = None
    """When the new set was put in force (reload windows)."""


def prepared_policy_set(shape: Shape, workdir: Path) -> tuple[Path, Path]:
    """The generated set and the client's key, made once per shape in ``workdir`` (reused with ``--keep``)."""
    cache = workdir / f"set-{shape.devices}-{shape.models}-{shape.suppliers}"
    policies, key_path = cache / "policies", cache / "client-key"
    if (cache / "complete").exists():
        print(f"policy set: reusing {cache}", flush=True)
        return policies, key_path
    cache.mkdir(parents=True, exist_ok=True)
    key = asyncssh.generate_private_key("ssh-ed25519")
    key_path.write_bytes(key.export_private_key())
    key_path.chmod(0o600)
    public = key.export_public_key().decode().split()
    t0 = time.perf_counter()
    write_policy_set(policies, shape, f"{public[0]} {public[1]}")
    (cache / "complete").touch()
    print(f"policy set written in {time.perf_counter() - t0:.1f} s", flush=True)
    return policies, key_path


async def run(shape: Shape, workdir: Path, args: argparse.Namespace) -> None:
    prepared, key_path = prepared_policy_set(shape, workdir)
    dut = make_deployment(Path(tempfile.mkdtemp(dir=workdir, prefix="run-")), settings={"listen": '["127.0.0.1:0"]'})
    policies = dut.deployment.config.policies_dir
    shutil.rmtree(policies)
    shutil.copytree(prepared, policies)  # the run edits its copy
    size = sum(p.stat().st_size for p in (policies / "estates").iterdir())
    print(f"policy set: {shape.devices:,} devices, {shape.models} models, {shape.suppliers} suppliers; "
          f"estates {mib(size)} MiB", flush=True)

    t0 = time.perf_counter()
    service: RunningService = await start(dut.deployment.config, dut.deployment)
    runtime = service.runtime
    installs: list[tuple[float, float]] = []
    install = runtime.install_policy

    def timed_install(snapshot: Any, on: dt.date | None = None, *, estate: Any = None) -> None:
        started = time.perf_counter()
        install(snapshot, on, estate=estate)
        installs.append((time.time(), time.perf_counter() - started))

    settle_heap()  # as `serve` does once started
    runtime.install_policy = timed_install  # type: ignore[method-assign]
    service.policies._install = timed_install  # the service's watcher took the bound method at start
    print(f"service started in {time.perf_counter() - t0:.1f} s (a set this large loads in a worker process); "
          f"service RSS {mib(rss_bytes())} MiB", flush=True)
    runtime._trees = TreeCache.of(catalogue_of(shape))  # the benchmark stands in for the database

    snapshot = runtime.snapshot
    today = dt.datetime.now(dt.UTC).date()
    t0 = time.perf_counter()
    build_estate_view(snapshot, today)
    estate_view_s = time.perf_counter() - t0
    pickled = bytes(ForkingPickler.dumps(snapshot.estates))  # as the policy worker sends it
    t0 = time.perf_counter()
    pickle.loads(pickled)
    unpickle_s = time.perf_counter() - t0
    user = shape.user(CLIENT_USER_INDEX)
    view_times = []
    for _ in range(3):
        runtime._drop_views()
        t0 = time.perf_counter()
        view = await runtime.view_for(user)  # what a user's first request waits for (built in a worker thread)
        view_times.append(time.perf_counter() - t0)
    assert view is not None
    assert view.images is not None
    print(f"spans {snapshot.estates.span_count:,}; transitions {len(snapshot.estates.transitions)}; "
          f"estate view build {estate_view_s * 1000:.0f} ms; timeline pickle {mib(len(pickled))} MiB, "
          f"unpickle {unpickle_s * 1000:.0f} ms", flush=True)
    print(f"one user's view of {shape.images} images ({user}): {min(view_times) * 1000:.0f} ms "
          f"(min of 3; index.json {len(view.images.sight.index.content):,} bytes)", flush=True)  # type: ignore[union-attr]

    ticker = Ticker()
    ticker_task = asyncio.create_task(ticker.run())
    stop_file, client_out = workdir / "client-stop", workdir / "client-out.json"
    stop_file.unlink(missing_ok=True)
    client = subprocess.Popen([sys.executable, "-m", "benchmarks.entitlements", "--client", str(service.ports[0]),
                               user, str(key_path), str(stop_file), str(client_out)])
    windows: list[Window] = []
    tracer = StallTracer(ticker) if args.trace_stalls else None
    if tracer is not None:
        tracer.__enter__()
    gc_pauses = GcPauses().__enter__()
    try:
        await asyncio.sleep(args.idle)
        windows.append(Window("idle", time.time() - args.idle, time.time(), {"machine": load_note()}))
        estate = policies / "estates" / f"{shape.supplier(shape.suppliers // 2)}.csv"
        for round_ in range(args.reloads):
            with estate.open("a") as out:
                out.write(f"X{round_:07d},{shape.model(0).manufacturer_id},{shape.model(0).model_id},0100,,\n")
            how = "worker process" if size > ReloadSettings().process_threshold_bytes else "worker thread (small set)"
            windows.append(await reload_window(f"reload {round_ + 1} via SIGHUP, {how}", runtime, installs,
                                               ticker, client.pid, service.reload_event.set, args))
        if args.thread_too:
            for task in service.tasks:  # the service's own watcher would notice the edit and reload it too
                if task.get_coro().__qualname__ == "PolicyReloader.run":  # type: ignore[union-attr]
                    task.cancel()
            reloader = PolicyReloader(policies, runtime.snapshot, runtime.install_policy, lambda e, d: None,
                                      settings=ReloadSettings(process_threshold_bytes=1 << 62))
            with estate.open("a") as out:
                out.write(f"Y0000000,{shape.model(0).manufacturer_id},{shape.model(0).model_id},0100,,\n")
            windows.append(await reload_window("reload in a thread (for comparison)", runtime, installs, ticker,
                                               client.pid, lambda: asyncio.ensure_future(reloader.reload("bench")),
                                               args))
    finally:
        gc_pauses.__exit__()
        print(f"\nobjects the collector tracks at the end: {tracked_objects()}")
        print(f"a full collection now takes {full_collection_ms():.1f} ms (min of 3, holding the GIL)")
        if tracer is not None:
            tracer.__exit__()
            tracer.report()
        stop_file.touch()
        await asyncio.to_thread(client.wait, 60)
        ticker_task.cancel()
        await service.stop()
    records = json.loads(client_out.read_text())["records"]
    print(f"\nindex.json for {user}: {json.loads(client_out.read_text())['index_bytes']:,} bytes")
    for window in windows:
        print(f"\n== {window.name}: {window.end - window.start:.1f} s")
        for name, value in window.details.items():
            print(f"   {name}: {value}")
        if window.swap is None:
            print(f"   longest event-loop stall: {stall(ticker.worst(window.start, window.end))}")
        else:
            before, after = ticker.worst(window.start, window.swap), ticker.worst(window.swap, window.end)
            print(f"   longest event-loop stall, trigger to swap: {stall(before)}; after: {stall(after)}")
        print(f"   garbage collections: {gc_pauses.within(window.start, window.end)}")
        for op in ("list /images", "read index.json"):
            latencies = [lat for at, name, lat in records if name == op and window.start <= at <= window.end]
            print(f"   {op:16} {percentiles(latencies)}")


async def reload_window(  # noqa: PLR0917 - a benchmark step, called twice
    name: str, runtime: Any, installs: list[tuple[float, float]], ticker: Ticker, client_pid: int, trigger: Any,
    args: argparse.Namespace,
) -> Window:
    reset_peak_rss()
    before_rss = rss_bytes()
    count = len(installs)
    with WorkerRss({client_pid}) as worker:
        started = time.time()
        trigger()
        while len(installs) == count:
            await asyncio.sleep(0.01)
        installed_at, install_s = installs[-1]
    await asyncio.sleep(args.after)  # requests after the swap rebuild the user's view on the loop
    return Window(name, started, time.time(), swap=installed_at, details={
        "machine at the end": load_note(),
        "trigger to new set in force": f"{installed_at - started:.2f} s",
        "install_policy on the loop": f"{install_s * 1000:.0f} ms",
        "worker process peak RSS": f"{mib(worker.peak)} MiB" if worker.peak else "(no worker process)",
        "service process RSS before / peak": f"{mib(before_rss)} / {mib(peak_rss_bytes())} MiB",
    })


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=10_000_000)
    parser.add_argument("--models", type=int, default=2000)
    parser.add_argument("--suppliers", type=int, default=100)
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--reloads", type=int, default=2)
    parser.add_argument("--idle", type=float, default=5.0, help="seconds of requests before the first reload")
    parser.add_argument("--after", type=float, default=3.0, help="seconds of requests after each swap")
    parser.add_argument("--thread-too", action="store_true", help="also reload once in a thread, to compare")
    parser.add_argument("--trace-stalls", action="store_true", help="sample stacks while the loop is stalled")
    parser.add_argument("--wait-quiet", type=float, default=0, metavar="S",
                        help="first wait up to S seconds for the 1-minute load average to drop below 0.7")
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--client", nargs=5, metavar=("PORT", "USER", "KEY", "STOP", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.client:
        port, user, key, stop, out = args.client
        asyncio.run(client_loop(int(port), user, key, Path(stop), Path(out)))
        return 0
    configure_logging(level="warning")
    if args.wait_quiet:
        wait_for_quiet(args.wait_quiet)
    shape = Shape(args.devices, args.models, args.suppliers, args.images)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="cfl-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        asyncio.run(run(shape, workdir, args))
    finally:
        if args.keep:
            for run_dir in workdir.glob("run-*"):
                shutil.rmtree(run_dir, ignore_errors=True)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
