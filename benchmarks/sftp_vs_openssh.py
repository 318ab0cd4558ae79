"""cfl-sftp against OpenSSH's own SFTP server, with the OpenSSH ``sftp`` client on loopback (issue 4).

One run starts, on spare 127.0.0.1 ports:

* ``cfl-sftp``: ``cfl-sftp serve --config`` in a subprocess, on a deployment built like ``tests/deployments.py``
  (``acme-release`` uploads for 1A2B, ``northern-ops`` downloads ESME 1A2B/0001/0100); a fresh deployment and
  server process for each run, removed after it;
* ``sshd internal-sftp`` and (unless ``--no-sftp-server``) ``sshd sftp-server``: ``/usr/sbin/sshd -D -e -f
  <private sshd_config>`` as root, with its own host key, ``AuthorizedKeysFile`` in the temp folder, ``UsePAM
  no``, ``StrictModes no``, ``PidFile`` in the temp folder, and ``Subsystem sftp internal-sftp`` or
  ``/usr/lib/openssh/sftp-server``. The system's sshd is never started or touched. If ``/usr/sbin/sshd`` is
  missing it is installed with ``apt-get`` behind a ``policy-rc.d`` that forbids starting services; sshd's
  privilege-separation folder ``/run/sshd`` is created if missing and removed again at the end.

Every transfer is ``sftp -b <batch> -o Ciphers=aes128-gcm@openssh.com`` (no compression, known host keys,
``-F /dev/null``). Before each transfer the page cache's dirty pages are written out (``sync``) so that one
transfer's writeback does not land on the next one; files stay in the page cache, as they would on a server.
Per run and server:

1. **upload** a 1 GiB package (a ``.cfl`` into ``/incoming`` for cfl-sftp, accepted by the gateway; the same
   file into a temp folder for sshd): package bytes / the time from sftp echoing ``put`` to echoing the next
   batch command, so connection set-up is left out and the close (for cfl-sftp: the verdict) is counted;
2. **download** the ~1 GiB image to ``/dev/null`` (cfl-sftp: ``/images/...`` as ``northern-ops``; sshd: the
   file just uploaded), timed the same way;
3. during both, the server's **peak RSS**, sampled from /proc every 50 ms over its whole process tree (for
   cfl-sftp one process; for sshd the listener, the per-connection privsep monitor and session processes and,
   for ``sftp-server``, the subsystem process);
4. **end of upload to verdict** for a 1 MiB and a 1 GiB package: the same ``put`` with ``sftp -vvv``, whose
   debug lines are read from a pipe and time-stamped as they arrive: from the last ``In write loop, ack for``
   (the last WRITE acknowledged) to the ``SSH2_FXP_STATUS`` that answers ``SSH2_FXP_CLOSE`` (for cfl-sftp the
   verdict; for sshd, ``close(2)``). sftp's ``-v`` flags are kept from ssh by a tiny ``-S`` wrapper, so the
   client prints only sftp's own ~12,000 lines per GiB and stays as fast as without ``-v``.

The order of the servers rotates from run to run. Medians over ``--runs`` (default 3) are printed as a table;
MB = 10^6 bytes. ``--profile DIR`` then repeats one cfl-sftp upload and download under ``py-spy record`` (it
must be installed in the venv: ``.venv/bin/pip install py-spy``) and prints where the server's time goes.

Run as root from the repository root (about 5 minutes; needs ~4 GiB of free disk in ``--workdir``)::

    .venv/bin/python -m benchmarks.sftp_vs_openssh
    .venv/bin/python -m benchmarks.sftp_vs_openssh --runs 1 --no-sftp-server --profile /tmp/cfl-profile
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from benchmarks._common import (
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
    wait_for_port,
    wait_for_quiet,
)

if TYPE_CHECKING:
    from tests.deployments import DeploymentUnderTest

SSHD = Path("/usr/sbin/sshd")
SFTP_SERVER = Path("/usr/lib/openssh/sftp-server")
PRIVSEP_DIR = Path("/run/sshd")
POLICY_RC = Path("/usr/sbin/policy-rc.d")
CIPHER = "aes128-gcm@openssh.com"
TRANSFER_TIMEOUT = 600.0
START_TIMEOUT = 60.0
SETTLE_SECONDS = 0.5

QUIET_SSH = """\
#!/bin/sh
# ssh without the -v flags that sftp -vvv passes on: only sftp's own debug lines are wanted.
for a do shift; [ "$a" = "-v" ] || set -- "$@" "$a"; done
exec ssh "$@"
"""


# -- servers -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Login:
    user: str
    key: Path


@dataclass
class Server:
    label: str
    port: int
    process: subprocess.Popen[bytes]
    known_hosts: Path
    uploader: Login
    downloader: Login
    upload_dir: str
    is_cfl: bool
    log_path: Path

    def upload_path(self, package: BuiltPackage) -> str:
        return f"{self.upload_dir}/{package.path.name}"

    def download_path(self, package: BuiltPackage) -> str:
        return package.image_path if self.is_cfl else self.upload_path(package)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def known_hosts_line(port: int, public_key_file: Path) -> str:
    kind, key = public_key_file.read_text().split()[:2]
    return f"[127.0.0.1]:{port} {kind} {key}\n"


def start_cfl(
    workdir: Path, *, settings: dict[str, str] | None = None,
    prepare: Callable[[DeploymentUnderTest], None] | None = None,
) -> tuple[Server, Path]:
    """A fresh deployment like tests/deployments.py, served by ``cfl-sftp serve`` in a subprocess.

    ``settings`` replaces values in its config (as ``make_deployment`` does); ``prepare`` runs on the deployment
    before the server starts (e.g. to seed the library through the gateway in process).
    """
    from tests.deployments import make_deployment

    root = workdir / f"cfl-{time.monotonic_ns()}"
    root.mkdir()
    port = free_port()
    dut = make_deployment(root, settings={**(settings or {}), "listen": f'["127.0.0.1:{port}"]'})
    try:
        if prepare is not None:
            prepare(dut)
    finally:
        dut.deployment.close()
    known = root / "known_hosts"
    known.write_text("".join(known_hosts_line(port, pub) for pub in sorted((dut.root / "keys").glob("*.pub"))))
    log_path = root / "cfl-sftp.log"
    executable = Path(sys.executable).with_name("cfl-sftp")
    argv = [str(executable)] if executable.exists() else [sys.executable, "-m", "cfl_sftp.cli"]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [*argv, "serve", "--config", str(dut.config_path)], stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, cwd=root,
        )
    server = Server(
        label="cfl-sftp", port=port, process=process, known_hosts=known,
        uploader=Login("acme-release", dut.key_path("acme-release")),
        downloader=Login("northern-ops", dut.key_path("northern-ops")),
        upload_dir="/incoming", is_cfl=True, log_path=log_path,
    )
    try:
        wait_for_port(port, START_TIMEOUT, alive=lambda: process.poll() is None)
    except BaseException:
        server.stop()
        print(log_path.read_text(errors="replace")[-4000:], file=sys.stderr)
        raise
    return server, root


def ensure_openssh_server() -> None:
    """Install openssh-server when sshd is missing, without letting the package start any service."""
    if SSHD.exists():
        return
    created = False
    if not POLICY_RC.exists():
        POLICY_RC.write_text("#!/bin/sh\n# written by cfl-sftp's benchmark for one apt-get install\nexit 101\n")
        POLICY_RC.chmod(0o755)
        created = True
    try:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "install", "-y", "openssh-server"], check=True, env=env, timeout=900)
    finally:
        if created:
            POLICY_RC.unlink(missing_ok=True)


@contextlib.contextmanager
def privsep_dir() -> Iterator[None]:
    """sshd refuses connections without /run/sshd: make it if missing, keep it there while in the block, and
    remove it (if still empty) after, when this process made it.

    Keeping it matters on a shared machine: a second benchmark that found it missing, made it and finished first
    removes it, and from then on every login to this process's sshd fails ("Missing privilege separation
    directory"). A thread puts it back within 0.2 s."""
    created = False
    if not PRIVSEP_DIR.exists():
        PRIVSEP_DIR.mkdir(mode=0o755)
        created = True
    stop = threading.Event()

    def keep() -> None:
        while not stop.wait(0.2):
            with contextlib.suppress(OSError):
                PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)

    keeper = threading.Thread(target=keep, name="privsep-dir", daemon=True)
    keeper.start()
    try:
        yield
    finally:
        stop.set()
        keeper.join(timeout=5)
        if created:
            with contextlib.suppress(OSError):
                PRIVSEP_DIR.rmdir()


def keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "cfl-bench", "-f", str(path)],
                   check=True, timeout=60)


def start_sshd(workdir: Path, label: str, subsystem: str, *, extra_config: str = "") -> Server:
    """A private sshd, as root, on a spare port; nothing of the system's sshd configuration is read.

    ``extra_config`` is appended to its ``sshd_config`` (e.g. ``MaxStartups`` for many concurrent logins).
    """
    folder = workdir / label.replace(" ", "-")
    folder.mkdir()
    keygen(folder / "host_key")
    keygen(folder / "client_key")
    (folder / "authorized_keys").write_text((folder / "client_key.pub").read_text())
    files = folder / "files"
    files.mkdir()
    port = free_port()
    config = folder / "sshd_config"
    config.write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {folder / 'host_key'}\nPidFile {folder / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {folder / 'authorized_keys'}\nUsePAM no\nStrictModes no\n"
        "PermitRootLogin prohibit-password\nPubkeyAuthentication yes\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nAllowTcpForwarding no\nAllowAgentForwarding no\nX11Forwarding no\n"
        "PermitTTY no\nPrintMotd no\nPermitUserRC no\nLogLevel INFO\n"
        f"Subsystem sftp {subsystem}\n{extra_config}"
    )
    subprocess.run([str(SSHD), "-t", "-f", str(config)], check=True, timeout=60)
    known = folder / "known_hosts"
    known.write_text(known_hosts_line(port, folder / "host_key.pub"))
    log_path = folder / "sshd.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(config)], stdout=log,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    login = Login("root", folder / "client_key")
    server = Server(label=label, port=port, process=process, known_hosts=known, uploader=login,
                    downloader=login, upload_dir=str(files), is_cfl=False, log_path=log_path)
    try:
        wait_for_port(port, START_TIMEOUT, alive=lambda: process.poll() is None)
    except BaseException:
        server.stop()
        print(log_path.read_text(errors="replace")[-4000:], file=sys.stderr)
        raise
    return server


# -- the client ----------------------------------------------------------------------------------------------


@dataclass
class SftpResult:
    returncode: int
    stdout: list[tuple[float, str]]
    stderr: list[tuple[float, str]]
    peak_rss: int
    idle_rss: int
    started: float
    server_cpu: float
    client_cpu: float

    def echo_time(self, prefix: str) -> float:
        for at, line in self.stdout:
            if line.startswith(f"sftp> {prefix}"):
                return at
        raise RuntimeError(f"sftp never echoed {prefix!r}:\n" + self.text())

    @property
    def setup_seconds(self) -> float:
        """From starting sftp to its echo of the first batch command: connection, key exchange, login."""
        return self.stdout[0][0] - self.started if self.stdout else float("nan")

    def command_seconds(self, command: str) -> float:
        """From the echo of ``command`` to the echo of the batch's next command (``pwd``)."""
        return self.echo_time("pwd") - self.echo_time(command)

    def text(self) -> str:
        return "\n".join(line for _, line in self.stdout + self.stderr[-40:])


@dataclass
class CloseTiming:
    """From sftp -vvv: the last WRITE's ack, the CLOSE sent, and the CLOSE's reply (all perf_counter)."""

    last_ack: float
    close_sent: float
    close_reply: float
    status: int

    @property
    def verdict_seconds(self) -> float:
        return self.close_reply - self.last_ack


def close_timing(lines: list[tuple[float, str]]) -> CloseTiming:
    last_ack = close_sent = None
    for index, (at, line) in enumerate(lines):
        if "In write loop, ack for" in line:
            last_ack = at
        elif "Sent message SSH2_FXP_CLOSE" in line and last_ack is not None:
            close_sent = at
            for reply_at, reply in lines[index + 1 :]:
                match = re.search(r"SSH2_FXP_STATUS (\d+)", reply)
                if match:
                    return CloseTiming(last_ack, close_sent, reply_at, int(match.group(1)))
            break
    raise RuntimeError("no WRITE ack / CLOSE / STATUS sequence in sftp's debug output")


def _pump(fd: int, sink: list[tuple[float, str]]) -> None:
    """Read a pipe until EOF, stamping each line with the time its bytes arrived."""
    pending = b""
    while chunk := os.read(fd, 1 << 16):
        now = time.perf_counter()
        pending += chunk
        *lines, pending = pending.split(b"\n")
        sink.extend((now, line.decode("utf-8", "replace")) for line in lines)
    if pending:
        sink.append((time.perf_counter(), pending.decode("utf-8", "replace")))


class Client:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.quiet_ssh = workdir / "ssh-quiet"
        self.quiet_ssh.write_text(QUIET_SSH)
        self.quiet_ssh.chmod(0o755)
        self.sftp = shutil.which("sftp") or "/usr/bin/sftp"

    def run(self, server: Server, login: Login, commands: list[str], *, verbose: bool = False) -> SftpResult:
        batch = self.workdir / "batch"
        batch.write_text("\n".join([*commands, "pwd"]) + "\n")
        argv = [
            self.sftp, *(["-vvv", "-S", str(self.quiet_ssh)] if verbose else []), "-b", str(batch),
            "-F", "/dev/null", "-P", str(server.port), "-i", str(login.key),
            "-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none", "-o", "BatchMode=yes",
            "-o", f"UserKnownHostsFile={server.known_hosts}", "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", "StrictHostKeyChecking=yes", "-o", f"Ciphers={CIPHER}", "-o", "Compression=no",
            "-o", "ConnectTimeout=30", f"{login.user}@127.0.0.1",
        ]
        stdout: list[tuple[float, str]] = []
        stderr: list[tuple[float, str]] = []
        with RssSampler(server.process.pid, tree=True) as sampler:
            idle = sampler.sample()
            children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
            started = time.perf_counter()
            process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE)
            assert process.stdout is not None
            assert process.stderr is not None
            pumps = [threading.Thread(target=_pump, args=(process.stdout.fileno(), stdout), daemon=True),
                     threading.Thread(target=_pump, args=(process.stderr.fileno(), stderr), daemon=True)]
            for pump in pumps:
                pump.start()
            try:
                process.wait(timeout=TRANSFER_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
            for pump in pumps:
                pump.join(timeout=10)
            process.stdout.close()
            process.stderr.close()
            children = resource.getrusage(resource.RUSAGE_CHILDREN)
        client_cpu = (children.ru_utime + children.ru_stime) - (children_before.ru_utime + children_before.ru_stime)
        return SftpResult(process.returncode, stdout, stderr, sampler.peak, idle, started, sampler.cpu_seconds,
                          client_cpu)


def settle() -> None:
    """Write out dirty pages so one transfer's writeback does not slow the next; then let things go quiet."""
    os.sync()
    time.sleep(SETTLE_SECONDS)


# -- one run -------------------------------------------------------------------------------------------------


@dataclass
class Figures:
    upload_mbps: list[float] = field(default_factory=list)
    download_mbps: list[float] = field(default_factory=list)
    upload_peak_rss: list[int] = field(default_factory=list)
    download_peak_rss: list[int] = field(default_factory=list)
    idle_rss: list[int] = field(default_factory=list)
    verdict_small: list[float] = field(default_factory=list)
    verdict_large: list[float] = field(default_factory=list)
    verbose_upload_mbps: list[float] = field(default_factory=list)
    upload_server_cpu: list[float] = field(default_factory=list)
    download_server_cpu: list[float] = field(default_factory=list)
    upload_client_cpu: list[float] = field(default_factory=list)
    download_client_cpu: list[float] = field(default_factory=list)
    setup_seconds: list[float] = field(default_factory=list)


def check(result: SftpResult, what: str, server: Server) -> None:
    if result.returncode != 0:
        raise RuntimeError(f"{what} on {server.label} failed (sftp exit {result.returncode}):\n{result.text()}")


def upload_and_download(client: Client, server: Server, package: BuiltPackage, figures: Figures) -> None:
    settle()
    remote = server.upload_path(package)
    up = client.run(server, server.uploader, [f"put {package.path} {remote}"])
    check(up, "upload", server)
    upload_seconds = up.command_seconds("put")
    settle()
    down = client.run(server, server.downloader, [f"get {server.download_path(package)} /dev/null"])
    check(down, "download", server)
    download_seconds = down.command_seconds("get")
    download_bytes = package.image_size if server.is_cfl else package.size
    figures.upload_mbps.append(package.size / upload_seconds / MB)
    figures.download_mbps.append(download_bytes / download_seconds / MB)
    figures.upload_peak_rss.append(up.peak_rss)
    figures.download_peak_rss.append(down.peak_rss)
    figures.idle_rss.append(up.idle_rss)
    figures.upload_server_cpu.append(up.server_cpu)
    figures.download_server_cpu.append(down.server_cpu)
    figures.upload_client_cpu.append(up.client_cpu)
    figures.download_client_cpu.append(down.client_cpu)
    figures.setup_seconds.extend([up.setup_seconds, down.setup_seconds])
    print(f"    {server.label:<20} upload {figures.upload_mbps[-1]:7.1f} MB/s  download "
          f"{figures.download_mbps[-1]:7.1f} MB/s  peak RSS {up.peak_rss / MiB:6.1f} / {down.peak_rss / MiB:6.1f} "
          f"MiB (idle {up.idle_rss / MiB:.1f})  server CPU {up.server_cpu:.1f} / {down.server_cpu:.1f} s  "
          f"client CPU {up.client_cpu:.1f} / {down.client_cpu:.1f} s", flush=True)
    if not server.is_cfl:
        Path(remote).unlink(missing_ok=True)


def verdict_time(client: Client, server: Server, package: BuiltPackage) -> tuple[float, float]:
    """(seconds from the last WRITE ack to the CLOSE reply, upload MB/s of that same verbose put)."""
    settle()
    remote = server.upload_path(package)
    result = client.run(server, server.uploader, [f"put {package.path} {remote}"], verbose=True)
    check(result, "verbose upload", server)
    timing = close_timing(result.stderr)
    if timing.status != 0:
        raise RuntimeError(f"the close on {server.label} answered status {timing.status}")
    if not server.is_cfl:
        Path(remote).unlink(missing_ok=True)
    return timing.verdict_seconds, package.size / result.command_seconds("put") / MB


def one_run(
    run: int, args: argparse.Namespace, *, workdir: Path, client: Client, sshds: list[Server],
    versions: FreshVersions, figures: dict[str, Figures],
) -> None:
    cfl, cfl_root = start_cfl(workdir)
    try:
        servers = [cfl, *sshds]
        shift = run % len(servers)
        servers = servers[shift:] + servers[:shift]
        print(f"run {run + 1}/{args.runs} ({load_note()}): order {', '.join(s.label for s in servers)}",
              flush=True)

        package = build_package_file(workdir / f"bench-{run}-t.cfl", args.size, versions())
        try:
            for server in servers:
                upload_and_download(client, server, package, figures[server.label])
        finally:
            package.path.unlink(missing_ok=True)

        for size, attribute in ((args.small_size, "verdict_small"), (args.size, "verdict_large")):
            package = build_package_file(workdir / f"bench-{run}-v{size}.cfl", size, versions())
            try:
                for server in servers:
                    seconds, mbps = verdict_time(client, server, package)
                    getattr(figures[server.label], attribute).append(seconds)
                    if attribute == "verdict_large":
                        figures[server.label].verbose_upload_mbps.append(mbps)
                    print(f"    {server.label:<20} {size_label(size)}: last WRITE ack -> CLOSE reply "
                          f"{seconds * 1000:8.1f} ms", flush=True)
            finally:
                package.path.unlink(missing_ok=True)
    finally:
        cfl.stop()
        shutil.rmtree(cfl_root, ignore_errors=True)


# -- the profile ---------------------------------------------------------------------------------------------


def py_spy() -> str | None:
    candidate = Path(sys.executable).with_name("py-spy")
    return str(candidate) if candidate.exists() else shutil.which("py-spy")


def _frame_name(frame: str) -> str:
    """``func (path/to/file.py:123)`` -> ``func (file.py)``; the line is dropped to add up whole functions."""
    match = re.fullmatch(r"(.*) \((.*?):\d+\)", frame)
    if not match:
        return frame
    return f"{match.group(1)} ({Path(match.group(2)).name})"


def summarise_profile(raw: Path, seconds: float, rate: int, top: int = 12) -> str:
    """Busy share per thread, then the functions with the most samples on top of the stack and anywhere."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        thread = frames[0] if frames[0].startswith(("thread", "process")) else "?"
        frames = [f for f in frames if not f.startswith(("thread", "process"))]
        if not frames:
            continue
        total += count
        threads[re.sub(r"\s*\(?0x[0-9a-f]+\)?|\s+\d+$", "", thread)] += count
        own[_frame_name(frames[-1])] += count
        for name in {_frame_name(f) for f in frames}:
            inclusive[name] += count
    possible = seconds * rate
    out = [f"  {total} busy samples in {seconds:.1f} s at {rate} Hz (one fully busy thread = {possible:.0f})"]
    out.append("  busy share of one core, per thread:")
    out += [f"    {count / possible:6.1%}  {name}" for name, count in threads.most_common(6)]
    out.append(f"  top {top} functions by own samples (share of all busy samples):")
    out += [f"    {count / max(total, 1):6.1%}  {name}" for name, count in own.most_common(top)]
    out.append(f"  top {top} functions by inclusive samples:")
    out += [f"    {count / max(total, 1):6.1%}  {name}" for name, count in inclusive.most_common(top)]
    return "\n".join(out)


class PySpyRecording:
    """``py-spy record`` (raw stacks, per thread, without pausing the target) on ``pid`` while in the block;
    ``seconds`` is then the time the block took, for :func:`summarise_profile`."""

    def __init__(self, pid: int, out: Path, rate: int) -> None:
        spy = py_spy()
        if spy is None:
            raise SystemExit("py-spy is not installed: .venv/bin/pip install py-spy")
        self.argv = [spy, "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw", "--threads",
                     "--nonblocking", "--output", str(out)]
        self.seconds = 0.0
        self._started = 0.0
        self._recorder: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> PySpyRecording:
        self._recorder = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)  # py-spy attaches
        self._started = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._started
        assert self._recorder is not None
        self._recorder.send_signal(signal.SIGINT)
        try:
            self._recorder.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self._recorder.kill()
            self._recorder.wait(timeout=10)


def profiled(client: Client, server: Server, login: Login, command: str, *, out: Path, rate: int) -> str:
    settle()
    with PySpyRecording(server.process.pid, out, rate) as recording:
        result = client.run(server, login, [command])
    check(result, command, server)
    return summarise_profile(out, recording.seconds, rate)


def profile_cfl(args: argparse.Namespace, workdir: Path, client: Client, versions: FreshVersions) -> None:
    out_dir: Path = args.profile
    out_dir.mkdir(parents=True, exist_ok=True)
    cfl, cfl_root = start_cfl(workdir)
    package = build_package_file(workdir / "bench-profile.cfl", args.size, versions())
    rate = 100
    try:
        print(f"\npy-spy profile of cfl-sftp, one {size_label(args.size)} upload (raw stacks in {out_dir}):")
        print(profiled(client, cfl, cfl.uploader, f"put {package.path} {cfl.upload_path(package)}",
                       out=out_dir / "upload.txt", rate=rate))
        print(f"\npy-spy profile of cfl-sftp, one {size_label(args.size)} download:")
        print(profiled(client, cfl, cfl.downloader, f"get {cfl.download_path(package)} /dev/null",
                       out=out_dir / "download.txt", rate=rate))
    finally:
        package.path.unlink(missing_ok=True)
        cfl.stop()
        shutil.rmtree(cfl_root, ignore_errors=True)


# -- the table -----------------------------------------------------------------------------------------------


def print_table(args: argparse.Namespace, labels: list[str], figures: dict[str, Figures]) -> None:
    med = statistics.median
    size, small = size_label(args.size), size_label(args.small_size)
    rows: list[tuple[str, Callable[[Figures], str]]] = [
        (f"upload {size} (MB/s)", lambda f: f"{med(f.upload_mbps):.1f}"),
        (f"download {size} image (MB/s)", lambda f: f"{med(f.download_mbps):.1f}"),
        ("server RSS idle before upload (MiB)", lambda f: f"{med(f.idle_rss) / MiB:.1f}"),
        ("server peak RSS during upload (MiB)", lambda f: f"{med(f.upload_peak_rss) / MiB:.1f}"),
        ("server peak RSS during download (MiB)", lambda f: f"{med(f.download_peak_rss) / MiB:.1f}"),
        ("server CPU during upload (s)", lambda f: f"{med(f.upload_server_cpu):.2f}"),
        ("server CPU during download (s)", lambda f: f"{med(f.download_server_cpu):.2f}"),
        ("client CPU, sftp + ssh, upload (s)", lambda f: f"{med(f.upload_client_cpu):.2f}"),
        ("client CPU, sftp + ssh, download (s)", lambda f: f"{med(f.download_client_cpu):.2f}"),
        ("session set-up: start to first command (ms)", lambda f: f"{med(f.setup_seconds) * 1000:.0f}"),
        (f"last WRITE ack -> CLOSE reply, {small} (ms)", lambda f: f"{med(f.verdict_small) * 1000:.1f}"),
        (f"last WRITE ack -> CLOSE reply, {size} (ms)", lambda f: f"{med(f.verdict_large) * 1000:.1f}"),
        (f"upload {size} with sftp -vvv (MB/s)", lambda f: f"{med(f.verbose_upload_mbps):.1f}"),
    ]
    width = max(len(r[0]) for r in rows)
    columns = [max(len(label), 10) for label in labels]
    print(f"\nmedians of {args.runs} run{'s' if args.runs > 1 else ''}; sftp client OpenSSH, cipher {CIPHER}, "
          f"127.0.0.1; MB = 10^6 bytes; at the end: {load_note()}")
    header = f"{'':<{width}}  " + "  ".join(f"{label:>{w}}" for label, w in zip(labels, columns, strict=True))
    print(header)
    print("-" * len(header))
    for name, cell in rows:
        cells = "  ".join(f"{cell(figures[label]):>{w}}" for label, w in zip(labels, columns, strict=True))
        print(f"{name:<{width}}  {cells}")
    print("(for cfl-sftp the CLOSE reply is the gateway's verdict; for sshd it is close(2) of a plain file)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="runs (medians are printed); 1 to 7")
    parser.add_argument("--size", type=parse_size, default=parse_size("1GiB"), help="large package (1GiB)")
    parser.add_argument("--small-size", type=parse_size, default=parse_size("1MiB"), help="small package (1MiB)")
    parser.add_argument("--no-sftp-server", action="store_true", help="skip sshd with /usr/lib/openssh/sftp-server")
    parser.add_argument("--profile", type=Path, metavar="DIR", help="also profile cfl-sftp with py-spy into DIR")
    parser.add_argument("--workdir", type=Path, default=None, help="where the temp folder goes")
    parser.add_argument("--wait-quiet", type=float, default=0, metavar="S",
                        help="first wait up to S seconds for the 1-minute load average to drop below 0.7")
    args = parser.parse_args(argv)
    if not 1 <= args.runs <= 7:
        parser.error("--runs is 1 to 7")
    if os.geteuid() != 0:
        parser.error("sshd must run as root for public-key logins to root; run this as root")
    if args.size > parse_size("1GiB"):
        parser.error("--size above 1GiB exceeds the default gateway.max_package_bytes")

    ensure_openssh_server()
    if args.wait_quiet:
        wait_for_quiet(args.wait_quiet)
    workdir = Path(tempfile.mkdtemp(prefix="cfl-bench-sftp-", dir=args.workdir))
    versions = FreshVersions()
    sshds: list[Server] = []
    try:
        with privsep_dir():
            client = Client(workdir)
            sshds.append(start_sshd(workdir, "sshd internal-sftp", "internal-sftp"))
            if not args.no_sftp_server:
                sshds.append(start_sshd(workdir, "sshd sftp-server", str(SFTP_SERVER)))
            labels = ["cfl-sftp", *(s.label for s in sshds)]
            figures = {label: Figures() for label in labels}
            for run in range(args.runs):
                one_run(run, args, workdir=workdir, client=client, sshds=sshds, versions=versions, figures=figures)
            print_table(args, labels, figures)
            if args.profile is not None:
                profile_cfl(args, workdir, client, versions)
            for server in sshds:
                server.stop()
    finally:
        for server in sshds:
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
