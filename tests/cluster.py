"""Several real ``cfl-sftp serve`` processes behind a private HAProxy (SPEC 9 "Several nodes").

The nodes share one deployment folder (``data_dir``, ``policies/``, keys) and one database; each has its own
config file, a copy of the deployment's (``listen`` on port 0: the node logs the port it bound in
its ``service_started`` line). HAProxy runs as our own subprocess (``haproxy -db -f <tmp>/haproxy.cfg``, never the
system service) in ``mode tcp`` with ``send-proxy-v2``, and offers three frontends: ``balanced`` (round robin
over every node, on 127.0.0.1 and on ::1) and one per node (``via(i)``), so a test can choose the node and
still go through the balancer.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

STARTUP_SECONDS = 60.0


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def require_haproxy() -> str:
    path = shutil.which("haproxy") or ("/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None)
    if path is None:
        pytest.skip("haproxy is not installed (.ci/install-tools installs it; on Debian: apt-get install haproxy)")
    return path


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


@dataclass
class Node:
    config: Path
    log: Path
    process: subprocess.Popen[bytes]
    port: int = 0


@dataclass
class Cluster:
    """Running nodes and HAProxy; :meth:`stop` ends only the processes this object started."""

    folder: Path
    nodes: list[Node]
    haproxy: subprocess.Popen[bytes] | None = None
    balanced_port: int = 0
    node_ports: list[int] = field(default_factory=list)
    ipv6: bool = False

    def via(self, index: int) -> int:
        """The HAProxy port that always goes to node ``index`` (with a PROXY header, like the others)."""
        return self.node_ports[index]

    def log_lines(self, index: int) -> list[dict[str, object]]:
        lines = []
        for line in self.nodes[index].log.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                lines.append(json.loads(line))
        return lines

    def stop(self) -> None:
        if self.haproxy is not None and self.haproxy.poll() is None:
            self.haproxy.terminate()
        for node in self.nodes:
            if node.process.poll() is None:
                node.process.send_signal(signal.SIGTERM)
        for process in [n.process for n in self.nodes] + ([self.haproxy] if self.haproxy else []):
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


def _started_port(node: Node, deadline: float) -> int:
    while time.monotonic() < deadline:
        if node.process.poll() is not None:
            raise AssertionError(f"node exited with {node.process.returncode}:\n{node.log.read_text()[-4000:]}")
        for line in node.log.read_text(errors="replace").splitlines():
            if '"service_started"' in line:
                return int(json.loads(line)["ports"][0])
        time.sleep(0.05)
    raise AssertionError(f"node did not start within {STARTUP_SECONDS} s:\n{node.log.read_text()[-4000:]}")


def _wait_for_banner(port: int, host: str, deadline: float) -> None:
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=2) as sock:
            if sock.recv(8).startswith(b"SSH-"):
                return
        time.sleep(0.05)
    raise AssertionError(f"no SSH banner through HAProxy on {host}:{port}")


def haproxy_config(node_ports: list[int], balanced: int, per_node: list[int], ipv6: bool) -> str:
    """The configuration that docs/operating.md shows, with one extra frontend per node for the tests."""
    # Health checks every 200 ms, one failure marks a node down: a node that mishandled the check's PROXY LOCAL
    # header would drop out of the balanced backend at once, and the tests going through it would fail.
    servers = "".join(f"    server node{i} 127.0.0.1:{p} send-proxy-v2 check check-send-proxy inter 200ms fall 1"
                      " rise 1\n" for i, p in enumerate(node_ports))
    binds = f"    bind 127.0.0.1:{balanced}\n" + (f"    bind [::1]:{balanced}\n" if ipv6 else "")
    text = (
        "global\n    maxconn 2000\n\n"
        "defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 1h\n    timeout server 1h\n\n"
        f"frontend balanced\n{binds}    default_backend nodes\n\n"
        "backend nodes\n    balance roundrobin\n    option tcp-check\n    tcp-check expect string SSH-2.0-\n"
        f"{servers}\n"
    )
    for i, (node_port, port) in enumerate(zip(node_ports, per_node, strict=True)):
        text += (f"frontend only{i}\n    bind 127.0.0.1:{port}\n" + (f"    bind [::1]:{port}\n" if ipv6 else "")
                 + f"    default_backend node{i}\n\nbackend node{i}\n"
                 f"    server node{i} 127.0.0.1:{node_port} send-proxy-v2\n\n")
    return text


def start_cluster(root: Path, folder: Path, count: int = 2, *, balancer: bool = True) -> Cluster:
    """Start ``count`` nodes on the deployment at ``root`` (its ``cfl-sftp.toml``) and HAProxy before them;
    with ``balancer=False`` (benchmarks only) the nodes serve clients directly, without PROXY headers."""
    haproxy = require_haproxy() if balancer else ""
    base = re.sub(r"^proxy_protocol = .*$", f"proxy_protocol = {'true' if balancer else 'false'}",
                  (root / "cfl-sftp.toml").read_text(), flags=re.MULTILINE)
    base = re.sub(r"^trusted_proxies = .*$", 'trusted_proxies = ["127.0.0.1"]',  # HAProxy, as in production
                  base, flags=re.MULTILINE)
    nodes = []
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for i in range(count):
        config = root / f"node{i}.toml"
        config.write_text(base)
        log = folder / f"node{i}.log"
        with log.open("wb") as out:
            process = subprocess.Popen([sys.executable, "-m", "cfl_sftp.cli", "serve", "--config", str(config)],
                                       stdout=out, stderr=subprocess.STDOUT, env=env)
        nodes.append(Node(config, log, process))
    cluster = Cluster(folder, nodes, ipv6=ipv6_loopback())
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        for node in nodes:
            node.port = _started_port(node, deadline)
        if not balancer:
            cluster.balanced_port = nodes[0].port
            cluster.node_ports = [n.port for n in nodes]
            return cluster
        cluster.balanced_port = free_port()
        cluster.node_ports = [free_port() for _ in nodes]
        cfg = folder / "haproxy.cfg"
        cfg.write_text(haproxy_config([n.port for n in nodes], cluster.balanced_port, cluster.node_ports,
                                      cluster.ipv6))
        hlog = (folder / "haproxy.log").open("wb")
        cluster.haproxy = subprocess.Popen([haproxy, "-db", "-f", str(cfg)], stdout=hlog, stderr=subprocess.STDOUT)
        for port in [cluster.balanced_port, *cluster.node_ports]:
            _wait_for_banner(port, "127.0.0.1", deadline)
    except BaseException:
        cluster.stop()
        raise
    return cluster


@contextlib.contextmanager
def running_cluster(root: Path, folder: Path, count: int = 2, *, balancer: bool = True) -> Iterator[Cluster]:
    cluster = start_cluster(root, folder, count, balancer=balancer)
    try:
        yield cluster
    finally:
        cluster.stop()
