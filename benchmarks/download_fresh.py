"""Downloads only, from a freshly started ``cfl-sftp serve``: what a node that serves Suppliers' batch jobs does.

``compare.py`` downloads the 1 GiB image from the server that has just taken the upload, and that upload leaves
glibc's malloc with a raised dynamic mmap threshold and a large heap; a node that has only served downloads since
it started has neither. Here the image is put through the gateway in this process before the server starts, then
``--runs`` downloads with OpenSSH's ``sftp`` (``aes128-gcm@openssh.com``) follow, each timed as in
``compare.py``, with the server's CPU (utime + stime, user and system apart) and its minor page faults::

    .venv/bin/python -m benchmarks.download_fresh --runs 3
    .venv/bin/python -m benchmarks.download_fresh --runs 2 --profile /tmp/dl.raw   # py-spy on the last run
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks._common import GB, MB, parse_size
from benchmarks.audit_under_load import seed_library
from benchmarks.sftp_vs_openssh import Client, py_spy, settle, start_cfl, summarise_profile

PROFILE_RATE = 200


def process_counters(pid: int) -> tuple[float, float, int]:
    """User and system CPU seconds, and minor page faults, of one process (``/proc/<pid>/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / ticks, int(fields[12]) / ticks, int(fields[7])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=parse_size, default=parse_size("1GiB"), help="the image's package (1GiB)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--profile", type=Path, metavar="RAW", help="py-spy raw stacks of the last run")
    parser.add_argument("--workdir", type=Path, default=None, help="where the temp folder goes")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="cfl-download-", dir=args.workdir))
    seeded: list[tuple[str, int]] = []

    def seed(dut: Any) -> None:
        seeded.append(seed_library(dut.deployment, dut.root, args.size))

    server, _ = start_cfl(workdir, prepare=seed)
    image_path, image_size = seeded[0]
    client = Client(workdir)
    pid = server.process.pid
    figures: list[tuple[float, float]] = []
    try:
        for index in range(args.runs):
            settle()
            spy = None
            if args.profile is not None and index == args.runs - 1:
                spy = subprocess.Popen([py_spy() or "py-spy", "record", "--pid", str(pid), "--rate", str(PROFILE_RATE),
                                        "--format", "raw", "--nonblocking", "-o", str(args.profile)],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(1.0)
            user0, system0, faults0 = process_counters(pid)
            command = f"get {image_path} /dev/null"
            result = client.run(server, server.downloader, [command])
            user1, system1, faults1 = process_counters(pid)
            if spy is not None:
                spy.send_signal(2)
                spy.wait(30)
            if result.returncode != 0:
                raise SystemExit(f"download failed:\n{result.text()}")
            seconds = result.command_seconds("get")
            gb = image_size / GB
            figures.append((image_size / seconds / MB, (user1 - user0 + system1 - system0) / gb))
            print(f"run {index + 1}: {figures[-1][0]:7.1f} MB/s   server CPU {figures[-1][1]:.2f} s/GB "
                  f"(user {(user1 - user0) / gb:.2f}, system {(system1 - system0) / gb:.2f})   "
                  f"page faults {(faults1 - faults0) / gb:,.0f}/GB   load {os.getloadavg()[0]:.1f}", flush=True)
            if spy is not None:
                print(summarise_profile(args.profile, seconds + 1.0, PROFILE_RATE))
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"median of {args.runs}: {statistics.median(f[0] for f in figures):.1f} MB/s, "
          f"{statistics.median(f[1] for f in figures):.2f} s of server CPU per GB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
