"""Who held the GIL while the event loop waited for it: a reading of a py-spy speedscope recording.

A stall of the service's event loop that is not spent waiting for a CPU is the loop thread waiting for the GIL
(in ``pthread_cond_timedwait`` under a C function that released it: a socket call, ``epoll_wait``) while another
thread of the process runs Python or a C call that does not release it: a garbage collection, an unpickle, a
long ``bytes.join``. Python-level samplers cannot see that holder, since they need the GIL themselves; py-spy reads
the process from outside. Record with every thread sampled at every tick, so the threads' samples line up::

    py-spy record --pid PID --rate 250 --native --threads --idle --format speedscope -o spy.json --duration 40
    .venv/bin/python -m benchmarks.gil_waits spy.json --longer-than-ms 30

For each run of consecutive samples in which the main thread waited for the GIL (longest first), it prints the
run's length and what the other threads were doing meanwhile, most frequent first. Sample times are py-spy's
(when it falls behind, runs look longer than they were; it says so when it does).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path
from typing import Any

WAITING_FOR_GIL = "pthread_cond_timedwait"
"""CPython 3.11's ``take_gil`` is inlined; its wait shows as this, innermost under the function that released."""
IDLE = ("epoll_wait", "pthread_cond_wait", "sem_wait", "do_futex_wait", "__futex_abstimed_wait_common",
        "PyThread_acquire_lock_timed", "__libc_read", "read", "recv", "waitpid", "poll", "select")


def _names(frames: list[dict[str, Any]], stack: list[int]) -> list[str]:
    return [frames[i]["name"] for i in stack]


def _waits(names: list[str]) -> bool:
    return WAITING_FOR_GIL in names[-3:]


def _busy(names: list[str]) -> bool:
    return not _waits(names) and not any(name in IDLE for name in names[-4:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recording", type=Path, help="py-spy --format speedscope output")
    parser.add_argument("--longer-than-ms", type=float, default=30.0)
    parser.add_argument("--runs", type=int, default=12, help="how many of the longest waits to show")
    args = parser.parse_args(argv)
    data = json.loads(args.recording.read_text())
    frames = data["shared"]["frames"]
    profiles = data["profiles"]
    main_thread = next(p for p in profiles if "MainThread" in p["name"])
    others = [p for p in profiles if p is not main_thread]
    samples, weights = main_thread["samples"], main_thread["weights"]
    runs: list[tuple[float, int, int]] = []
    start = None
    for i, stack in enumerate([*samples, []]):
        if stack and _waits(_names(frames, stack)):
            start = i if start is None else start
        elif start is not None:
            runs.append((sum(weights[start:i]), start, i))
            start = None
    runs.sort(reverse=True)
    print(f"{len(samples)} samples of {len(profiles)} threads over {sum(weights):.1f} s; the main thread waited "
          f"for the GIL in {sum(w for w, _, _ in runs):.2f} s of them, in {len(runs)} runs")
    for seconds, first, end in runs[: args.runs]:
        if seconds * 1000 < args.longer_than_ms:
            break
        print(f"\n== {seconds * 1000:.0f} ms from sample {first} (t = {sum(weights[:first]):.2f} s)")
        holders: Counter[tuple[str, str]] = Counter()
        for profile in others:
            offset = len(samples) - len(profile["samples"])  # a thread started later has fewer samples
            for i in range(max(first - offset, 0), max(end - offset, 0)):
                names = _names(frames, profile["samples"][i])
                if _busy(names):
                    holders[(profile["name"], " < ".join(reversed(names[-7:])))] += 1
        for (thread, stack), count in holders.most_common(5):
            print(f"  {count:4d}  {thread[:32]}: {stack}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
