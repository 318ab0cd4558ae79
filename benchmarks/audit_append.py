"""How fast the audit trail grows on SQLite, and what checking a large one costs (SPEC 8).

On a fresh deployment (``cfl-sftp init`` in a temp folder: SQLite in WAL mode with ``synchronous=FULL``, as
the service runs it) it measures and prints:

* ``append, one transaction each``: entries per second through ``audit_store.append``, each in its own
  writing transaction (``BEGIN IMMEDIATE`` ... ``COMMIT``, one fsync), as the service writes most entries;
* ``append_many, N per transaction``: entries per second through ``audit_store.append_many`` (a group commit);
* the big trail: ``--entries`` (default 1,000,000) entries appended with ``append_many``, then one checkpoint;
* ``verify``: the time ``audit_trail.verify_trail`` takes over the whole trail, and the peak RSS growth;
* ``prove``: the time of one ``audit_trail.prove_entry`` at that size, the inclusion path's length, and the
  proof's size (path bytes, and the JSON that ``cfl-sftp audit prove`` prints);
* ``checkpoint``: the time ``make_checkpoint`` takes (it reads only the head row, whatever the size).

Entries look like a real ``image-downloaded`` entry (about 330 bytes). Run from the repository root::

    .venv/bin/python -m benchmarks.audit_append                      # 1,000,000 entries (a few minutes)
    .venv/bin/python -m benchmarks.audit_append --entries 100000     # quicker; figures scale linearly

Everything is made in a temp folder (``--workdir`` to choose where) and removed at the end.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._common import mib, peak_rss_bytes, reset_peak_rss, rss_bytes
from cfl_sftp.audit_trail import make_checkpoint, prove_entry, verify_trail
from cfl_sftp.config import load_config
from cfl_sftp.deployment import Deployment
from cfl_sftp.init import init_deployment
from cfl_sftp.logs import configure_logging
from cfl_sftp.storage import audit_store
from cfl_sftp.storage.audit_store import AuditEvent


def event(n: int) -> AuditEvent:
    return AuditEvent(
        "image-downloaded", "northern-ops", "northern-energy", f"203.0.113.{n % 250}:{40000 + n % 20000}",
        {
            "path": "/images/ESME/1A2B/0001/0100/00000010/firmware.bin",
            "sha256": f"{n:064x}",
            "session": f"{n:012x}",
            "bytes_served": 1_048_576,
            "opened_seq": n,
        },
    )


def append_singly(deployment: Deployment, count: int) -> float:
    start = time.perf_counter()
    for n in range(count):
        with deployment.db.writing() as session:
            audit_store.append(session, event(n))
    return count / (time.perf_counter() - start)


def append_batched(deployment: Deployment, count: int, batch: int, *, report: bool = False) -> float:
    start = time.perf_counter()
    done = 0
    while done < count:
        size = min(batch, count - done)
        with deployment.db.writing() as session:
            audit_store.append_many(session, [event(done + i) for i in range(size)])
        done += size
        if report and done % (batch * 10) == 0:
            rate = done / (time.perf_counter() - start)
            print(f"  ... {done:,} entries ({rate:,.0f}/s)", file=sys.stderr)
    return count / (time.perf_counter() - start)


def run(workdir: Path, entries: int, single: int, batch: int) -> None:
    config = load_config(init_deployment(workdir / "deployment", with_policy_examples=False))
    deployment = Deployment.open(config)
    try:
        rate = append_singly(deployment, single)
        print(f"append, one transaction each     {rate:10,.0f} entries/s   ({single:,} entries)")
        rate = append_batched(deployment, single * 10, batch)
        print(f"append_many, {batch:,} per transaction {rate:10,.0f} entries/s   ({single * 10:,} entries)")

        remaining = entries - single * 11
        print(f"growing the trail to {entries:,} entries ...", file=sys.stderr)
        rate = append_batched(deployment, remaining, 10_000, report=True)
        print(f"append_many, 10,000 per transaction {rate:7,.0f} entries/s   ({remaining:,} entries)")
        start = time.perf_counter()
        row = make_checkpoint(deployment, dt.datetime.now(dt.UTC))
        assert row is not None
        assert row.tree_size == entries
        print(f"checkpoint                       {1000 * (time.perf_counter() - start):10.1f} ms")
        database = Path(config.database_url.removeprefix("sqlite:///"))
        print(f"database size                    {mib(database.stat().st_size):>10} MiB")

        before = rss_bytes()
        reset_peak_rss()
        start = time.perf_counter()
        report = verify_trail(deployment)
        seconds = time.perf_counter() - start
        growth = peak_rss_bytes() - before
        assert (report.entries, report.covered) == (entries, entries)
        print(f"verify {entries:,} entries       {seconds:10.1f} s       ({seconds / entries * 1e6:.1f} us/entry, "
              f"peak RSS growth {mib(growth)} MiB)")

        seq = entries // 3
        start = time.perf_counter()
        proof = prove_entry(deployment, seq)
        seconds = time.perf_counter() - start
        printed = json.dumps(proof.as_json(), indent=2)
        path_bytes = sum(len(p) for p in proof.inclusion_path)
        print(f"prove seq {seq:,}                {seconds:10.1f} s")
        print(f"inclusion proof at {entries:,}    {len(proof.inclusion_path):>10} hashes = {path_bytes} bytes "
              f"({len(printed.encode()):,} bytes of JSON with the entry and the checkpoint)")
    finally:
        deployment.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=1_000_000, help="size of the trail to verify")
    parser.add_argument("--single", type=int, default=1_000, help="entries appended one transaction each")
    parser.add_argument("--batch", type=int, default=1_000, help="entries per append_many transaction")
    parser.add_argument("--workdir", type=Path, help="where to make the temp folder")
    args = parser.parse_args()
    if args.entries < args.single * 11:
        parser.error("--entries must be at least 11 x --single")
    configure_logging(level="warning")
    workdir = Path(tempfile.mkdtemp(prefix="cfl-audit-bench-", dir=args.workdir))
    try:
        run(workdir, args.entries, args.single, args.batch)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
