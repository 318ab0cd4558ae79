"""A stock asyncssh SFTP server, for ``benchmarks.compare`` to measure against: what asyncssh gives unchanged.

Plain ``asyncssh.SFTPServer`` with ``chroot`` set to ``--root``, public-key logins from ``--authorized-keys``
for any user name, asyncssh's default algorithms, listen backlog and event loop. No audit, no policy, no limits:
the ceiling that cfl-sftp's own features are built on. Runs until SIGTERM or SIGINT::

    .venv/bin/python -m benchmarks.stock_asyncssh_server --port 2222 --host-key K --authorized-keys A --root DIR
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

import asyncssh


def sftp_factory(root: str) -> object:
    def make(chan: asyncssh.SSHServerChannel[bytes]) -> asyncssh.SFTPServer:
        return asyncssh.SFTPServer(chan, chroot=root.encode())

    return make


async def serve(args: argparse.Namespace) -> None:
    server = await asyncssh.listen(
        "127.0.0.1", args.port, server_host_keys=[args.host_key], authorized_client_keys=args.authorized_keys,
        sftp_factory=sftp_factory(args.root), allow_scp=False,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()
    await server.wait_closed()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host-key", required=True)
    parser.add_argument("--authorized-keys", required=True)
    parser.add_argument("--root", required=True, help="the chroot folder of every session")
    asyncio.run(serve(parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
