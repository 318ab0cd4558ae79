"""How long the gateway takes to give its verdict once the last byte of a package has arrived, in process.

For each size (default 1 MiB, 100 MiB and 1 GiB) it builds a valid, signed package streaming to a temp file
(a fresh firmware version every time, so the verdict is ``accepted``), then feeds it to
``cfl_sftp.intake.PackageUpload`` in 256 KiB pieces, as the SFTP layer does, and prints:

* ``feed MB/s``: package bytes / the time spent inside ``PackageUpload.write`` (hashing, tar parsing, spool
  encryption, writing the image temp file); ``wall MB/s`` also counts reading the package file;
* ``verdict s``: from the return of the last ``write`` to the return of ``complete()`` (the receipt), and of
  that the part spent in ``os.fsync`` (measured by wrapping ``os.fsync`` in this process only);
* ``peak RSS growth``: the process's peak RSS (VmHWM, reset before each feed) minus its RSS before the feed.

Run from the repository root::

    .venv/bin/python -m benchmarks.gateway_verdict                      # 1 MiB, 100 MiB, 1 GiB
    .venv/bin/python -m benchmarks.gateway_verdict --sizes 1MiB,100MiB --repeat 3

Everything is made in a temp folder (``--workdir`` to choose where) and removed at the end. After a package is
built its dirty pages are written out (``sync``), so feeding it does not wait on their writeback, but it stays in
the page cache: it is read back from memory, as an upload's bytes would come from the network.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks._common import (
    MB,
    FreshVersions,
    build_package_file,
    file_chunks,
    load_note,
    mib,
    parse_size,
    peak_rss_bytes,
    reset_peak_rss,
    rss_bytes,
    size_label,
    wait_for_quiet,
)
from cfl_sftp.domain.errors import Outcome
from cfl_sftp.intake import PackageUpload, Uploader
from cfl_sftp.logs import configure_logging
from tests.deployments import make_deployment

PIECE = 256 * 1024


class FsyncClock:
    """Wraps ``os.fsync`` in this process to add up the time spent in it (the product calls ``os.fsync``)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0
        self._original = os.fsync

    def __enter__(self) -> FsyncClock:
        original = self._original

        def timed(fd: Any) -> None:
            start = time.perf_counter()
            try:
                original(fd)
            finally:
                self.seconds += time.perf_counter() - start
                self.calls += 1

        os.fsync = timed
        return self

    def __exit__(self, *exc: object) -> None:
        os.fsync = self._original


@dataclass
class Result:
    size_label: str
    package_bytes: int
    feed_seconds: float
    wall_seconds: float
    verdict_seconds: float
    fsync_seconds: float
    fsync_calls: int
    rss_before: int
    rss_growth: int
    outcome: str

    @property
    def feed_mbps(self) -> float:
        return self.package_bytes / self.feed_seconds / MB

    @property
    def wall_mbps(self) -> float:
        return self.package_bytes / self.wall_seconds / MB


def run_one(deployment_root: Path, deployment: object, size: int, version: str, piece: int) -> Result:
    package = build_package_file(deployment_root / "bench.cfl", size, version)
    try:
        os.sync()  # the package file's own dirty pages are not the upload's: write them out before feeding
        gc.collect()
        if not reset_peak_rss():
            print("warning: cannot reset VmHWM; the RSS growth figure includes earlier peaks", file=sys.stderr)
        before = rss_bytes()
        uploader = Uploader("acme-release", "acme-meters", "benchmark")
        started = time.perf_counter()
        upload = PackageUpload(deployment, uploader, f"bench-{version}.cfl")  # type: ignore[arg-type]
        feed = 0.0
        for chunk in file_chunks(package.path, piece):
            t0 = time.perf_counter()
            upload.write(chunk)
            feed += time.perf_counter() - t0
        last_write = time.perf_counter()
        with FsyncClock() as fsyncs:
            receipt = upload.complete()
        verdict_at = time.perf_counter()
        peak = peak_rss_bytes()
        if receipt.outcome is not Outcome.ACCEPTED:
            raise SystemExit(f"the gateway did not accept the benchmark package: {receipt.reason.value}")
        return Result(
            size_label=size_label(size),
            package_bytes=package.size,
            feed_seconds=feed,
            wall_seconds=last_write - started,
            verdict_seconds=verdict_at - last_write,
            fsync_seconds=fsyncs.seconds,
            fsync_calls=fsyncs.calls,
            rss_before=before,
            rss_growth=max(0, peak - before),
            outcome=f"{receipt.outcome.value}/{receipt.reason.value}",
        )
    finally:
        package.path.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1MiB,100MiB,1GiB", help="package sizes, comma-separated")
    parser.add_argument("--repeat", type=int, default=1, help="runs per size (medians are printed)")
    parser.add_argument("--piece", type=parse_size, default=PIECE, help="bytes per write (default 256KiB)")
    parser.add_argument("--workdir", type=Path, default=None, help="where the temp folder goes")
    parser.add_argument("--wait-quiet", type=float, default=0, metavar="S",
                        help="first wait up to S seconds for the 1-minute load average to drop below 0.7")
    args = parser.parse_args(argv)
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    if not 1 <= args.repeat <= 10:
        parser.error("--repeat is 1 to 10")

    configure_logging(level="warning")
    if args.wait_quiet:
        wait_for_quiet(args.wait_quiet)
    tmp = Path(tempfile.mkdtemp(prefix="cfl-bench-gateway-", dir=args.workdir))
    versions = FreshVersions()
    results: list[list[Result]] = []
    print(f"start: {load_note()}", flush=True)
    try:
        dut = make_deployment(tmp)
        try:
            for size in sizes:
                runs = []
                for _ in range(args.repeat):
                    result = run_one(tmp, dut.deployment, size, versions(), args.piece)
                    print(
                        f"  {result.size_label}: verdict {result.verdict_seconds * 1000:.1f} ms, "
                        f"feed {result.feed_mbps:.0f} MB/s, RSS +{mib(result.rss_growth)} MiB ({result.outcome})",
                        flush=True,
                    )
                    runs.append(result)
                results.append(runs)
        finally:
            dut.deployment.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"\ngateway verdict, in process (PackageUpload, {args.piece // 1024} KiB pieces, "
          f"median of {args.repeat} run{'s' if args.repeat > 1 else ''}; MB = 10^6 bytes; end: {load_note()})")
    header = (f"{'package':>9} {'bytes':>12} {'feed MB/s':>10} {'wall MB/s':>10} {'verdict ms':>11} "
              f"{'of it fsync ms':>15} {'RSS before MiB':>15} {'peak RSS growth MiB':>20}")
    print(header)
    print("-" * len(header))
    for runs in results:
        med = statistics.median
        print(
            f"{runs[0].size_label:>9} {runs[0].package_bytes:>12} {med(r.feed_mbps for r in runs):>10.0f} "
            f"{med(r.wall_mbps for r in runs):>10.0f} {med(r.verdict_seconds for r in runs) * 1000:>11.1f} "
            f"{med(r.fsync_seconds for r in runs) * 1000:>15.1f} {mib(med(r.rss_before for r in runs)):>15} "
            f"{mib(med(r.rss_growth for r in runs)):>20}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
