"""Put new policy sets in force while the service runs, without stalling it (SPEC 6).

:class:`PolicyReloader` watches ``policies/`` and hands each new, wholly validated :class:`PolicySnapshot` to
the service in one call (the service swaps one reference):

* **Noticing a change.** Every :attr:`ReloadSettings.poll_seconds` it stats the files of the set (size,
  mtime, ctime, inode: cheap, and it works on shared folders, where change notifications do not). When the
  stamps change it waits until they have been still for :attr:`ReloadSettings.still_seconds`, so that a
  half-written edit is not applied, then hashes the set (:func:`~cfl_sftp.policy.loader.policy_digest`); only
  a digest that differs from the set in force (and from the last refused one) is loaded. Because some
  filesystems keep coarse mtimes, the digest is checked once more :attr:`ReloadSettings.recheck_seconds` after
  each change, and once when the watcher starts (an edit made while the service was starting is not missed).
  ``SIGHUP`` (the ``forced`` event) skips the waiting and reloads at once, even an unchanged set.
* **Loading off the event loop.** Hashing and validating run in a worker thread for small sets. A set whose
  estates exceed :attr:`ReloadSettings.process_threshold_bytes` is read in a fresh worker *process* (``spawn``):
  compiling millions of estate rows holds the GIL for seconds in large C calls, which a thread would turn into
  event-loop stalls. The process returns the snapshot (a few hundred thousand spans, not the devices) and exits,
  so the service's memory does not keep the peak of the load. The estate view for today (O(spans)) is built in
  a thread too; only the swap runs on the loop.
* **Refusing a bad set.** An invalid set changes nothing: the set in force stays, and ``policy_refused`` is
  logged and audited with every problem as ``file:line: reason``. The same broken set is not re-read until it
  changes again (or ``SIGHUP``).
* **Dated rows.** At 00:00 UTC of :attr:`PolicySnapshot.next_transition` (and of each later transition of the
  estates) the snapshot in force is installed again, which rebuilds the estate view for the new date; no file
  is read.

What it leaves to others: the service decides what installing means (caches, closing the sessions the new set
refuses) and where audit entries go; the loader decides what is valid.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import multiprocessing
import os
import stat
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol

import structlog
from cryptography.hazmat.primitives import serialization

from cfl_sftp.domain.entitlement import EstateView, build_estate_view
from cfl_sftp.domain.errors import PolicyError, PolicyProblem
from cfl_sftp.domain.signature import ManufacturerKey
from cfl_sftp.policy.loader import ESTATES_DIR, load_policy_set, policy_digest
from cfl_sftp.policy.snapshot import PolicySnapshot

log = structlog.get_logger(__name__)

MiB = 1024 * 1024
MAX_DEPTH = 3
"""``policies/``, ``manufacturer-keys/``, ``manufacturer-keys/<id>/``: deeper folders are not part of a set."""


@dataclass(frozen=True, slots=True)
class ReloadSettings:
    """Every timing and size that governs reloads, in one place."""

    poll_seconds: float = 0.5
    still_seconds: float = 0.5
    recheck_seconds: float = 2.0
    process_threshold_bytes: int = 16 * MiB
    """Estates (``estates/*.csv``) larger than this in total are read in a worker process (about 400,000 rows)."""


# -- change detection ------------------------------------------------------------------------------------

FileStamp = tuple[str, int, int, int, int]
"""(path relative to ``policies/``, size, mtime ns, ctime ns, inode); -1s when the file cannot be stat'ed."""


def stamp_policy_folder(directory: Path) -> tuple[FileStamp, ...]:
    """The stamps of every file and folder of the set (hidden ones excepted, as the loader ignores them).

    Never raises: a folder that cannot be read stamps as such, so the loader gets to say why.
    """
    stamps: list[FileStamp] = []

    def visit(folder: Path, prefix: str, depth: int) -> None:
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            stamps.append((prefix or ".", -1, -1, -1, -1))
            return
        for entry in entries:
            if entry.name.startswith("."):
                continue
            name = f"{prefix}{entry.name}"
            try:
                info = entry.stat()  # follows symlinks: a swapped ConfigMap link changes the target's stamp
            except OSError:
                stamps.append((name, -1, -1, -1, -1))
                continue
            stamps.append((name, info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino))
            if stat.S_ISDIR(info.st_mode) and depth < MAX_DEPTH:
                visit(Path(entry.path), f"{name}/", depth + 1)

    visit(directory, "", 1)
    return tuple(stamps)


def estate_bytes(stamps: tuple[FileStamp, ...]) -> int:
    return sum(max(size, 0) for name, size, *_ in stamps if name.startswith(f"{ESTATES_DIR}/"))


# -- loading (in a thread or a worker process) -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Unchanged:
    """The set on disk has a digest the caller already knows (in force, or refused before)."""

    digest: str


@dataclass(frozen=True, slots=True)
class Loaded:
    snapshot: PolicySnapshot
    seconds: float


@dataclass(frozen=True, slots=True)
class Refused:
    digest: str
    problems: tuple[tuple[str, int, str], ...]
    """(file, line, reason) of each problem, as :class:`PolicyProblem` holds them."""

    def errors(self) -> list[PolicyProblem]:
        return [PolicyProblem(*problem) for problem in self.problems]


LoadResult = Unchanged | Loaded | Refused


def load_if_changed(directory: Path, today: dt.date, known_digests: frozenset[str]) -> LoadResult:
    """Hash the set; unless its digest is known, validate it whole. Blocking: a thread or a worker process."""
    digest = policy_digest(directory)
    if digest in known_digests:
        return Unchanged(digest)
    started = time.perf_counter()
    try:
        snapshot = load_policy_set(directory, today=today)
    except PolicyError as exc:
        return Refused(digest, tuple((p.file, p.line, p.reason) for p in exc.errors))
    return Loaded(snapshot, time.perf_counter() - started)


# A snapshot crosses from the worker process to the service by pickling; only the pickler of multiprocessing is
# taught the two cases below (no global copyreg change). Read-only mappings travel as dicts, and manufacturer
# keys as their SubjectPublicKeyInfo DER (the fingerprint is derived from it, as on loading). The estate
# timeline's spans are already one array of integers (see ``EstateTimeline``), which travels as one block of
# bytes: unpickling hundreds of thousands of tuples would be one C call that holds the GIL for hundreds of ms.


def _mapping_proxy(items: dict[Any, Any]) -> Mapping[Any, Any]:
    return MappingProxyType(items)


def _reduce_mapping_proxy(proxy: MappingProxyType[Any, Any]) -> tuple[Any, ...]:
    return _mapping_proxy, (dict(proxy),)


def _manufacturer_key(spki: bytes) -> ManufacturerKey:
    key = serialization.load_der_public_key(spki)
    return ManufacturerKey(public_key=key, fingerprint=hashlib.sha256(spki).hexdigest())  # type: ignore[arg-type]


def _reduce_manufacturer_key(key: ManufacturerKey) -> tuple[Any, ...]:
    spki = key.public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return _manufacturer_key, (spki,)


ForkingPickler.register(MappingProxyType, _reduce_mapping_proxy)
ForkingPickler.register(ManufacturerKey, _reduce_manufacturer_key)


def _load_and_send(directory: Path, today: dt.date, known_digests: frozenset[str], pipe: Connection) -> None:
    """The worker process's whole life: one load, its result sent back (or why it failed), then exit."""
    try:
        pipe.send(load_if_changed(directory, today, known_digests))
    except Exception as exc:  # whatever went wrong, the service must hear of it (a kill shows as EOF)
        pipe.send(RuntimeError(f"the policy worker failed: {type(exc).__name__}: {exc}"))
    finally:
        pipe.close()


def load_in_process(
    directory: Path,
    today: dt.date,
    known_digests: frozenset[str],
    *,
    started: Callable[[BaseProcess], None] | None = None,
) -> LoadResult:
    """:func:`load_if_changed` in a fresh ``spawn`` process that exits afterwards. Blocking: call it in a thread.

    ``started`` is given the process as soon as it runs, so that a caller that gives up can kill it. Raises
    ``RuntimeError`` if the worker fails or dies (killed, out of memory).
    """
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_load_and_send, args=(directory, today, known_digests, send),
                              name="cfl-sftp policy load", daemon=True)
    process.start()
    send.close()
    if started is not None:
        started(process)
    try:
        result = receive.recv()
    except EOFError:
        process.join()
        raise RuntimeError(f"the policy worker died (exit code {process.exitcode})") from None
    finally:
        receive.close()
    process.join()
    if isinstance(result, BaseException):
        raise result
    return result  # type: ignore[no-any-return]


def load_at_start(directory: Path, *, process_threshold_bytes: int | None = None) -> PolicySnapshot:
    """The policy set a service starts with, read as a reload would read it: a set whose estates exceed the
    threshold in a worker process, so the service never keeps the heap that parsing millions of rows needed
    (it kept 150 MiB more of it at random, from one start to the next). Blocking: call it in a thread.

    Raises :class:`PolicyError` for an invalid set: there is no older one to keep.
    """
    threshold = ReloadSettings().process_threshold_bytes if process_threshold_bytes is None else process_threshold_bytes
    if estate_bytes(stamp_policy_folder(directory)) <= threshold:
        return load_policy_set(directory)
    result = load_in_process(directory, utc_today(), frozenset())
    if isinstance(result, Refused):
        raise PolicyError(result.errors())
    assert isinstance(result, Loaded)  # nothing is known yet, so nothing is Unchanged
    return result.snapshot


# -- the watcher -----------------------------------------------------------------------------------------


class Install(Protocol):
    """Put a snapshot in force, with its estate view for today (built off the loop): ``install_policy``."""

    def __call__(self, snapshot: PolicySnapshot, *, estate: EstateView) -> None: ...


Audit = Callable[[str, dict[str, object]], None]
"""Record an audit entry: (event, details)."""


def utc_today() -> dt.date:
    return dt.datetime.now(dt.UTC).date()


class PolicyReloader:
    """Watches one policy folder and installs each new valid set (see the module docstring).

    ``install`` puts a snapshot in force (the runtime's ``install_policy``); ``audit`` records
    ``policy-reloaded`` and ``policy-refused``. ``in_force`` is the snapshot the service started with.
    """

    def __init__(
        self,
        directory: Path,
        in_force: PolicySnapshot,
        install: Install,
        audit: Audit,
        *,
        settings: ReloadSettings | None = None,
        today: Callable[[], dt.date] = utc_today,
    ) -> None:
        self.directory = directory
        self.in_force = in_force
        self._install = install
        self._audit = audit
        self.settings = settings or ReloadSettings()
        self._today = today
        self._view_date = today()
        self._next_transition = in_force.estates.next_transition(self._view_date)
        self._refused_digest: str | None = None
        self._stamps: tuple[FileStamp, ...] = ()
        self._reloading = asyncio.Lock()  # SIGHUP's reload and the watcher's never run at once

    # -- the loop ------------------------------------------------------------------------------------

    async def run(self, forced: asyncio.Event) -> None:
        """Until cancelled. ``forced`` (set on ``SIGHUP``) reloads at once."""
        loop = asyncio.get_running_loop()
        settings = self.settings
        self._stamps = await asyncio.to_thread(stamp_policy_folder, self.directory)
        try:  # an edit made while the service was starting is not missed
            await self.reload("start")
        except Exception:
            log.exception("policy_reload_failed")
        changed_at: float | None = None
        recheck_at: float | None = None
        while True:
            wake = loop.time() + settings.poll_seconds
            if changed_at is not None:
                wake = min(wake, changed_at + settings.still_seconds)
            if recheck_at is not None:
                wake = min(wake, recheck_at)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(forced.wait(), max(0.0, wake - loop.time()))
            try:
                if forced.is_set():
                    forced.clear()
                    changed_at = None
                    await self.reload_now()
                    continue
                await self.apply_due_transition()
                stamps = await asyncio.to_thread(stamp_policy_folder, self.directory)
                now = loop.time()
                if stamps != self._stamps:
                    self._stamps, changed_at = stamps, now
                    continue
                if changed_at is not None and now >= changed_at + settings.still_seconds - 0.01:
                    changed_at, recheck_at = None, now + settings.recheck_seconds
                    await self.reload("change")
                elif recheck_at is not None and now >= recheck_at:
                    recheck_at = None
                    await self.reload("recheck")
            except Exception:  # a bug must not end the watcher: the set in force stays, the next change retries
                log.exception("policy_reload_failed")

    # -- one reload ----------------------------------------------------------------------------------

    async def reload_now(self, trigger: str = "sighup") -> PolicySnapshot | None:
        """Read the set at once, even an unchanged one (``SIGHUP``); return once it is in force or refused."""
        self._stamps = await asyncio.to_thread(stamp_policy_folder, self.directory)
        return await self.reload(trigger, force=True)

    async def reload(self, trigger: str, *, force: bool = False) -> PolicySnapshot | None:
        """Read the set now; install it if it is valid and new. Returns the snapshot installed, if any.

        ``force`` reloads even a set whose digest is the one in force or the one last refused.
        """
        async with self._reloading:
            return await self._reload(trigger, force=force)

    async def _reload(self, trigger: str, *, force: bool) -> PolicySnapshot | None:
        known: frozenset[str] = frozenset()
        if not force:
            known = frozenset(d for d in (self.in_force.digest, self._refused_digest) if d is not None)
        stamps = self._stamps or await asyncio.to_thread(stamp_policy_folder, self.directory)
        in_process = estate_bytes(stamps) > self.settings.process_threshold_bytes
        started = time.perf_counter()
        workers: list[BaseProcess] = []
        try:
            if in_process:
                result = await asyncio.to_thread(load_in_process, self.directory, self._today(), known,
                                                 started=workers.append)
            else:
                result = await asyncio.to_thread(load_if_changed, self.directory, self._today(), known)
        except asyncio.CancelledError:  # the service is stopping: do not wait for a long load
            for worker in workers:
                worker.kill()
            raise
        if isinstance(result, Unchanged):
            log.debug("policy_unchanged", digest=result.digest, trigger=trigger)
            return None
        if isinstance(result, Refused):
            self._refused(result, trigger)
            return None
        previous = self.in_force
        await self.install(result.snapshot)
        seconds = round(time.perf_counter() - started, 3)
        details: dict[str, object] = {
            "digest": result.snapshot.digest,
            "previous_digest": previous.digest,
            "trigger": trigger,
            "users": len(result.snapshot.users),
            "devices": sum(result.snapshot.estates.device_counts.values()),
        }
        log.info("policy_reloaded", **details, seconds=seconds, validate_seconds=round(result.seconds, 3),
                 worker="process" if in_process else "thread")
        self._audit("policy-reloaded", details)
        return result.snapshot

    async def install(self, snapshot: PolicySnapshot) -> None:
        """Put ``snapshot`` in force and follow its dated rows.

        The estate view for today is built in a thread (O(spans): a few hundred milliseconds of Python for
        millions of devices); the swap itself is one call on the event loop.
        """
        today = self._today()
        estate = await asyncio.to_thread(build_estate_view, snapshot, today)
        self._install(snapshot, estate=estate)
        self.in_force = snapshot
        self._refused_digest = None
        self._view_date = today
        self._next_transition = snapshot.estates.next_transition(today)

    def _refused(self, result: Refused, trigger: str) -> None:
        self._refused_digest = result.digest
        errors = [str(problem) for problem in result.errors()]
        log.error("policy_refused", digest=result.digest, trigger=trigger, in_force=self.in_force.digest,
                  error_count=len(errors), errors=errors)
        self._audit("policy-refused", {
            "digest": result.digest,
            "in_force": self.in_force.digest,
            "errors": [{"file": f, "line": n, "reason": r} for f, n, r in result.problems],
        })

    async def apply_due_transition(self) -> bool:
        """At 00:00 UTC of a date on which dated estate rows take effect, re-install the set in force."""
        today = self._today()
        if today == self._view_date:
            return False
        self._view_date = today
        due = self._next_transition
        if due is None or today < due:
            return False
        snapshot = self.in_force
        estate = await asyncio.to_thread(build_estate_view, snapshot, today)
        self._install(snapshot, estate=estate)
        self._next_transition = snapshot.estates.next_transition(today)
        log.info("policy_transition", on=today.isoformat(), digest=self.in_force.digest,
                 next_transition=self._next_transition.isoformat() if self._next_transition else None)
        return True
