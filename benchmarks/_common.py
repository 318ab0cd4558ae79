"""What both benchmark scripts share: large valid packages built streaming, fresh versions, RSS readings.

Packages are real and signed (by ``tests.factory.SIGNING_KEY``, which ``tests.deployments`` registers for
manufacturer 1A2B), so the gateway's verdict is ``accepted``. The image is a ZigBee OTA header that agrees with
the manifest (``tests.factory.ota_image`` with its ``total_image_size`` field set to the real size) followed by
an AES-CTR keystream: incompressible, deterministic for a seed, and generated at several GB/s, so neither memory
nor a second temp file is needed to build a 1 GiB package.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from cfl_sftp.domain.build import build_package
from tests.factory import SIGNING_KEY, ota_image

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
GB = 1_000_000_000
MB = 1_000_000  # throughput figures are decimal MB/s, as OpenSSH and most tools print them

# What a package adds around its image (tar headers, manifest, signature, end blocks, record padding) is under
# 16 KiB; the image is that much smaller than the package size asked for, so a "1 GiB" package stays within
# the default ``gateway.max_package_bytes`` of exactly 1 GiB.
PACKAGE_OVERHEAD_ALLOWANCE = 16 * KiB

DEVICE_MODEL = ("1A2B", "0001", "0100")
HARDWARE = 0x0100
_BLOCK = 1 * MiB


def parse_size(text: str) -> int:
    """``1MiB``, ``100MiB``, ``1GiB``, ``4096`` -> bytes."""
    match = re.fullmatch(r"\s*(\d+)\s*(KiB|MiB|GiB|K|M|G)?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"not a size: {text!r}")
    unit = (match.group(2) or "").lower().rstrip("ib")
    return int(match.group(1)) * {"": 1, "k": KiB, "m": MiB, "g": GiB}[unit]


def size_label(size: int) -> str:
    for unit, name in ((GiB, "GiB"), (MiB, "MiB"), (KiB, "KiB")):
        if size >= unit and size % unit == 0:
            return f"{size // unit} {name}"
    return f"{size} B"


class FreshVersions:
    """Firmware versions never used before: a random 24-bit base per process, then a counter."""

    def __init__(self) -> None:
        self._next = (secrets.randbits(24) << 8) | 0x10000000

    def __call__(self) -> str:
        value = self._next
        self._next += 1
        return f"{value & 0xFFFFFFFF:08X}"


class GeneratedImage(io.RawIOBase):
    """A read-only, seekable file of ``size`` bytes: ``header`` then an AES-CTR keystream keyed by ``seed``."""

    def __init__(self, header: bytes, size: int, seed: bytes) -> None:
        super().__init__()
        self._header = header
        self._size = size
        self._key = hashlib.sha256(seed).digest()[:16]
        self._pos = 0
        self._block_index = -1
        self._block = b""

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def _block_at(self, index: int) -> bytes:
        if index != self._block_index:
            nonce = (index * (_BLOCK // 16)).to_bytes(16, "big")  # the counter block where this MiB starts
            encryptor = Cipher(algorithms.AES(self._key), modes.CTR(nonce)).encryptor()
            self._block = encryptor.update(bytes(_BLOCK))
            self._block_index = index
        return self._block

    def _byte_range(self, start: int, end: int) -> bytes:
        parts = []
        if start < len(self._header):
            parts.append(self._header[start : min(end, len(self._header))])
            start = len(self._header)
        while start < end:
            index, offset = divmod(start, _BLOCK)
            take = min(end - start, _BLOCK - offset)
            parts.append(self._block_at(index)[offset : offset + take])
            start += take
        return b"".join(parts)

    def read(self, size: int | None = -1) -> bytes:
        end = self._size if size is None or size < 0 else min(self._size, self._pos + size)
        if self._pos >= end:
            return b""
        data = self._byte_range(self._pos, end)
        self._pos = end
        return data

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self.read(len(buffer))
        memoryview(buffer)[: len(data)] = data
        return len(data)


@dataclass(frozen=True)
class BuiltPackage:
    path: Path
    size: int
    image_size: int
    image_name: str
    firmware_version: str

    @property
    def image_path(self) -> str:
        """Where the accepted image appears in the virtual tree (SPEC 5)."""
        m = DEVICE_MODEL
        return f"/images/ESME/{m[0]}/{m[1]}/{m[2]}/{self.firmware_version}/{self.image_name}"


def build_package_file(path: Path, package_size: int, firmware_version: str) -> BuiltPackage:
    """Write a valid, signed ``.cfl`` of at most ``package_size`` bytes to ``path``, streaming."""
    if package_size <= PACKAGE_OVERHEAD_ALLOWANCE + 4 * KiB:
        raise ValueError("packages this small are not what these benchmarks are for")
    image_size = package_size - PACKAGE_OVERHEAD_ALLOWANCE
    header = ota_image(
        DEVICE_MODEL[0], firmware_version, 60, (HARDWARE, HARDWARE), total_image_size=image_size
    )
    assert len(header) == 60
    image = GeneratedImage(header, image_size, seed=f"cfl-bench/{firmware_version}".encode())
    image_name = f"firmware-{firmware_version}.ota"
    manifest = {
        "format": "cfl-package/1",
        "manufacturer_id": DEVICE_MODEL[0],
        "model_id": DEVICE_MODEL[1],
        "hardware_version": DEVICE_MODEL[2],
        "device_type": "ESME",
        "firmware_version": firmware_version,
        "purpose": "security-fix",
        "specifications": ["SMETS2 v5.0", "GBCS v4.0"],
        "released": "2026-01-15",
    }
    with path.open("wb") as out:
        build_package(out, manifest, io.BufferedReader(image, 1 * MiB), image_name, SIGNING_KEY)
    size = path.stat().st_size
    if size > package_size:
        raise AssertionError(f"package is {size} bytes, more than the {package_size} asked for")
    return BuiltPackage(path, size, image_size, image_name, firmware_version)


# -- memory -----------------------------------------------------------------------------------------------


def _status_kib(pid: int | str, field: str) -> int:
    """A ``VmRSS``/``VmHWM`` figure of /proc/<pid>/status in KiB (0 when the process is gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return 0
    match = re.search(rf"^{field}:\s+(\d+) kB", text, flags=re.MULTILINE)
    return int(match.group(1)) if match else 0


def rss_bytes(pid: int | str = "self") -> int:
    return _status_kib(pid, "VmRSS") * KiB


def peak_rss_bytes(pid: int | str = "self") -> int:
    return _status_kib(pid, "VmHWM") * KiB


def reset_peak_rss(pid: int | str = "self") -> bool:
    """Reset VmHWM to the current RSS (Linux ``clear_refs`` 5); False where the kernel refuses."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_text()
        except OSError:
            continue
        # the command name is in parentheses and may hold spaces: the ppid is the 2nd field after the last ')'
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def tree_pids(root: int) -> list[int]:
    children = _children_map()
    pids, stack = [], [root]
    while stack:
        pid = stack.pop()
        pids.append(pid)
        stack.extend(children.get(pid, []))
    return pids


def tree_rss_bytes(root: int) -> int:
    return sum(rss_bytes(pid) for pid in tree_pids(root))


_TICKS = os.sysconf("SC_CLK_TCK")


def _stat_seconds(pid: int, fields: slice) -> float:
    """The sum of some clock-tick fields of /proc/<pid>/stat, in seconds (0 when the process is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    # the command name is in parentheses and may hold spaces: count the fields after the last ')'
    return sum(int(f) for f in stat.rsplit(")", 1)[1].split()[fields]) / _TICKS


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process so far (0 when it is gone)."""
    return _stat_seconds(pid, slice(11, 13))  # utime, stime: fields 14 and 15 of stat(5)


def reaped_cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process and of all the children it has waited for (0 when it is gone)."""
    return _stat_seconds(pid, slice(11, 15))  # utime, stime, cutime, cstime: fields 14 to 17


def tree_cpu_seconds(root: int) -> float:
    """CPU time of a process tree, including descendants that have ended: a process that exits and is waited
    for adds its time (and its own reaped children's) to its parent's ``cutime``/``cstime``. The difference of
    two readings is exact for a server such as sshd that forks a short-lived process per connection and reaps
    it, where sampling live processes would miss most of them."""
    return sum(reaped_cpu_seconds(pid) for pid in tree_pids(root))


class RssSampler:
    """Samples a process (and, with ``tree``, all its descendants) every ``interval`` s: the peak of their summed
    RSS, and the CPU time they used meanwhile (a process that exits between two samples loses at most one
    interval of CPU time from the sum)."""

    def __init__(self, pid: int, *, tree: bool, interval: float = 0.05) -> None:
        self.pid = pid
        self.tree = tree
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self._cpu_start: dict[int, float] = {}
        self._cpu_last: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _pids(self) -> list[int]:
        return tree_pids(self.pid) if self.tree else [self.pid]

    def sample(self) -> int:
        return sum(rss_bytes(pid) for pid in self._pids())

    def _take(self) -> None:
        pids = self._pids()
        self.peak = max(self.peak, sum(rss_bytes(pid) for pid in pids))
        for pid in pids:
            used = cpu_seconds(pid)
            if used:
                self._cpu_last[pid] = max(used, self._cpu_last.get(pid, 0.0))
        self.samples += 1

    @property
    def cpu_seconds(self) -> float:
        return sum(last - self._cpu_start.get(pid, 0.0) for pid, last in self._cpu_last.items())

    def _run(self) -> None:
        while not self._stop.is_set():
            self._take()
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._cpu_start = {pid: cpu_seconds(pid) for pid in self._pids()}
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._take()


# -- odds and ends ----------------------------------------------------------------------------------------


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on now (bind to 0, read it, release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float, *, alive: Callable[[], bool] | None = None) -> None:
    """Until something accepts TCP connections on 127.0.0.1:``port``; ``alive()`` False gives up early."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if alive is not None and not alive():
            raise RuntimeError(f"the server meant for port {port} exited before listening")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def file_chunks(path: Path, piece: int) -> Iterator[bytes]:
    with path.open("rb", buffering=0) as source:
        while chunk := source.read(piece):
            yield chunk


def load_note() -> str:
    """The 1-minute load average and core count: the machine may be shared, and the figures depend on it."""
    return f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores"


def wait_for_quiet(max_seconds: float, threshold: float = 0.7) -> None:
    """Wait (at most ``max_seconds``) until the 1-minute load average is below ``threshold``: other work on a
    small machine moves the figures more than anything measured here."""
    deadline = time.monotonic() + max_seconds
    while os.getloadavg()[0] >= threshold and time.monotonic() < deadline:
        time.sleep(5)


def mib(value: float) -> str:
    return f"{value / MiB:.1f}"
