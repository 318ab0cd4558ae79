"""The release-note vault's costs: reading a 64 MiB release note over SFTP against an image of the same size, and
rotating the key-encryption key over 10,000 notes.

**Reads.** One package with a 64 MiB image and 64 MiB of release notes (the default
``gateway.max_release_notes_bytes``; incompressible bytes) is put through the gateway in process, then
``cfl-sftp serve`` runs as its own process on a free 127.0.0.1 port and asyncssh's client, in this process, reads
both files into memory as ``northern-ops`` (which holds ``release-notes``). The image is served with ``pread``;
the note is decrypted segment by segment (AES-256-GCM, 64 KiB segments) in a worker thread. Each file is read
with two request sizes: asyncssh's default (the server's ``limits@openssh.com`` maximum) and 32 KiB requests
with 64 in flight, as OpenSSH's ``sftp`` sends them; a 32 KiB request decrypts the whole 64 KiB segment that
holds it. The best of ``--repeat`` runs is printed, in MB/s (10^6 bytes per second).

**Rotation.** A fresh deployment gets 10,000 release notes as database rows only (an image row and a vault row
with a data key wrapped for that image's SHA-256; no file, since rotation never touches one), then
``cfl_sftp.vault_admin.rotate_key`` (new key in the ring, every data key re-wrapped in batches, each batch one
transaction with its audit entry) and ``finish_rotation`` are timed.

Run from the repository root::

    .venv/bin/python -m benchmarks.vault
    .venv/bin/python -m benchmarks.vault --repeat 5 --notes 20000

Everything is made in a temp folder (``--workdir`` to choose where) and removed at the end; the server process
is stopped with SIGTERM (and killed if it does not stop within 30 s).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import asyncssh

from benchmarks._common import (
    DEVICE_MODEL,
    HARDWARE,
    MB,
    GeneratedImage,
    MiB,
    free_port,
    wait_for_port,
)
from cfl_sftp.domain.build import build_package
from cfl_sftp.domain.errors import Outcome
from cfl_sftp.domain.vault import new_data_key
from cfl_sftp.intake import PackageUpload, Uploader, feed_chunks, file_chunks
from cfl_sftp.logs import configure_logging
from cfl_sftp.storage.models import ImageRow, VaultObjectRow
from cfl_sftp.storage.sealed import note_context
from cfl_sftp.vault_admin import finish_rotation, rotate_key
from tests.deployments import DeploymentUnderTest, make_deployment
from tests.factory import SIGNING_KEY, ota_image

FILE_SIZE = 64 * MiB
FIRMWARE_VERSION = "00000010"
FOLDER = "/images/ESME/{}/{}/{}/{}".format(*DEVICE_MODEL, FIRMWARE_VERSION)
IMAGE_NAME = "firmware.ota"
NOTES_NAME = "release-notes.pdf"
READ_MODES = (("asyncssh default", -1, -1), ("32 KiB x 64 (OpenSSH)", 32 * 1024, 64))


# -- reads ------------------------------------------------------------------------------------------------


def build_big_package(path: Path) -> None:
    """A signed package with a 64 MiB OTA image and 64 MiB of release notes, written streaming."""
    header = ota_image(DEVICE_MODEL[0], FIRMWARE_VERSION, 60, (HARDWARE, HARDWARE), total_image_size=FILE_SIZE)
    image = io.BufferedReader(GeneratedImage(header, FILE_SIZE, seed=b"cfl-bench/vault/image"), MiB)
    notes = io.BufferedReader(GeneratedImage(b"%PDF-1.7\n", FILE_SIZE, seed=b"cfl-bench/vault/notes"), MiB)
    manifest = {
        "format": "cfl-package/1",
        "manufacturer_id": DEVICE_MODEL[0],
        "model_id": DEVICE_MODEL[1],
        "hardware_version": DEVICE_MODEL[2],
        "device_type": "ESME",
        "firmware_version": FIRMWARE_VERSION,
        "purpose": "security-fix",
        "specifications": ["SMETS2 v5.0"],
        "released": "2026-01-15",
    }
    with path.open("wb") as out:
        build_package(out, manifest, image, IMAGE_NAME, SIGNING_KEY, release_notes=notes,
                      release_notes_name=NOTES_NAME)


def seed(dut: DeploymentUnderTest, package: Path) -> None:
    upload = PackageUpload(dut.deployment, Uploader("acme-release", "acme-meters", "benchmark"), "bench.cfl")
    with package.open("rb") as source:
        receipt = feed_chunks(upload, file_chunks(source, MiB))
    if receipt.outcome is not Outcome.ACCEPTED:
        raise SystemExit(f"the gateway did not accept the benchmark package: {receipt.reason.value}")


@dataclass
class ReadResult:
    what: str
    mode: str
    best_seconds: float
    digest_ok: bool

    @property
    def mbps(self) -> float:
        return FILE_SIZE / self.best_seconds / MB


async def read_files(port: int, key: Path, expected: dict[str, str], repeat: int) -> list[ReadResult]:
    results = []
    async with asyncssh.connect(
        "127.0.0.1", port, username="northern-ops", client_keys=[str(key)], known_hosts=None, agent_path=None,
        config=None,
    ) as conn, conn.start_sftp_client() as sftp:
        for mode, block_size, max_requests in READ_MODES:
            for what, name in (("image", IMAGE_NAME), ("release note", NOTES_NAME)):
                best, ok = float("inf"), True
                for _ in range(repeat):
                    started = time.perf_counter()
                    async with sftp.open(f"{FOLDER}/{name}", "rb", block_size=block_size,
                                         max_requests=max_requests) as handle:
                        data = await handle.read()
                    best = min(best, time.perf_counter() - started)
                    ok = ok and hashlib.sha256(data).hexdigest() == expected[name] and len(data) == FILE_SIZE
                    del data
                results.append(ReadResult(what, mode, best, ok))
    return results


def expected_digests() -> dict[str, str]:
    digests = {}
    for name, head, seed_bytes in ((IMAGE_NAME, None, b"cfl-bench/vault/image"),
                                   (NOTES_NAME, b"%PDF-1.7\n", b"cfl-bench/vault/notes")):
        header = head or ota_image(DEVICE_MODEL[0], FIRMWARE_VERSION, 60, (HARDWARE, HARDWARE),
                                   total_image_size=FILE_SIZE)
        source = GeneratedImage(header, FILE_SIZE, seed=seed_bytes)
        sha = hashlib.sha256()
        while chunk := source.read(MiB):
            sha.update(chunk)
        digests[name] = sha.hexdigest()
    return digests


def bench_reads(tmp: Path, repeat: int) -> list[ReadResult]:
    port = free_port()
    dut = make_deployment(tmp / "reads", settings={"listen": f'["127.0.0.1:{port}"]'})
    package = tmp / "reads" / "bench.cfl"
    try:
        build_big_package(package)
        seed(dut, package)
    finally:
        package.unlink(missing_ok=True)
        dut.deployment.close()
    server = subprocess.Popen(
        [sys.executable, "-m", "cfl_sftp.cli", "serve", "--config", str(dut.config_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, 60, alive=lambda: server.poll() is None)
        return asyncio.run(read_files(port, dut.key_path("northern-ops"), expected_digests(), repeat))
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


# -- rotation ---------------------------------------------------------------------------------------------


def add_note_rows(dut: DeploymentUnderTest, count: int) -> None:
    """``count`` library images, each with a release note's vault row (no files: rotation reads none)."""
    deployment = dut.deployment
    keyring = deployment.keyring
    now = dt.datetime.now(dt.UTC)
    with deployment.db.writing() as session:
        for i in range(count):
            sha = hashlib.sha256(b"bench image %d" % i).hexdigest()
            object_id = hashlib.sha256(b"bench note %d" % i).hexdigest()[:32]
            wrapped = keyring.wrap(new_data_key(), note_context(sha))
            session.add(VaultObjectRow(object_id=object_id, kind="release-note", wrapped_key=wrapped.to_str(),
                                       kek_id=wrapped.kek_id, created_at=now))
            session.flush()
            session.add(ImageRow(
                sha256=sha, size=1024, device_type="ESME", manufacturer_id=DEVICE_MODEL[0],
                model_id=DEVICE_MODEL[1], hardware_version=DEVICE_MODEL[2], firmware_version=f"{i + 1:08X}",
                purpose="security-fix", released="2026-01-15", image_name="firmware.bin", manifest=b"{}",
                signature=b"", release_notes_name="notes.md", release_notes_size=1, release_notes_sha256=sha,
                release_notes_object=object_id, upload_id="bench", added_at=now,
            ))


@dataclass
class RotationResult:
    notes: int
    rotate_seconds: float
    rewrapped: int
    finish_seconds: float
    final_key_ids: tuple[str, ...]


def bench_rotation(tmp: Path, notes: int) -> RotationResult:
    dut = make_deployment(tmp / "rotation")
    try:
        add_note_rows(dut, notes)
        started = time.perf_counter()
        report = rotate_key(dut.deployment)
        rotated = time.perf_counter()
        finish_rotation(dut.deployment)
        finished = time.perf_counter()
        return RotationResult(notes, rotated - started, report.rewrap.rewrapped, finished - rotated,
                              dut.deployment.keyring.key_ids)
    finally:
        dut.deployment.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="reads per file and request size (best is kept)")
    parser.add_argument("--notes", type=int, default=10_000, help="release notes to rotate (default 10000)")
    parser.add_argument("--workdir", type=Path, default=None, help="where the temp folder goes")
    args = parser.parse_args(argv)
    if not 1 <= args.repeat <= 10:
        parser.error("--repeat is 1 to 10")

    configure_logging(level="warning")
    tmp = Path(tempfile.mkdtemp(prefix="cfl-bench-vault-", dir=args.workdir))
    try:
        reads = bench_reads(tmp, args.repeat)
        rotation = bench_rotation(tmp, args.notes)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"\nreads over SFTP on 127.0.0.1 (asyncssh client, `cfl-sftp serve` in its own process; "
          f"{FILE_SIZE // MiB} MiB files; best of {args.repeat}; MB = 10^6 bytes; {os.cpu_count()} CPUs)")
    header = f"{'request size':<24} {'image MB/s':>11} {'note MB/s':>10} {'note / image':>13}"
    print(header)
    print("-" * len(header))
    for mode, _, _ in READ_MODES:
        image = next(r for r in reads if r.mode == mode and r.what == "image")
        note = next(r for r in reads if r.mode == mode and r.what == "release note")
        print(f"{mode:<24} {image.mbps:>11.0f} {note.mbps:>10.0f} {note.mbps / image.mbps:>12.0%}")
    if not all(r.digest_ok for r in reads):
        print("ERROR: a file read back differs from what was uploaded")
        return 1

    print(f"\nKEK rotation over {rotation.notes} release notes (SQLite, batches of 500 rows, one audit entry each)")
    print(f"  rotate-key: {rotation.rotate_seconds:.2f} s ({rotation.rewrapped / rotation.rotate_seconds:,.0f} "
          f"data keys/s); --finish: {rotation.finish_seconds:.2f} s; ring afterwards: "
          f"{', '.join(rotation.final_key_ids)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
