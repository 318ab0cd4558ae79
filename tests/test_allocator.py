"""glibc's malloc thresholds (cfl_sftp/allocator.py): reply-sized buffers are reused, not faulted in afresh.

Counted in page faults, not time: each check runs in a fresh interpreter, so the test process's own malloc
settings stay as they were.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the thresholds are glibc's")

REPLIES = 400
PAGES_PER_REPLY = 5 * 255 * 1024 // 4096  # five buffers of a READ reply's size, alive at once

CHURN = f"""
import resource, sys
from cfl_sftp.allocator import keep_reply_buffers_on_the_heap
if sys.argv[1] == "tuned":
    assert keep_reply_buffers_on_the_heap()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def reply():
    buffers = [bytearray(255 * 1024) for _ in range(5)]
    del buffers
for _ in range(20):
    reply()
before = faults()
for _ in range({REPLIES}):
    reply()
print(faults() - before)
"""


def page_faults_of_replies(mode: str) -> int:
    """In a fresh interpreter whose malloc starts from glibc's own defaults: the environment's malloc settings
    (``MALLOC_*`` variables, ``GLIBC_TUNABLES``) are left out, since "default" means glibc's."""
    env = {name: value for name, value in os.environ.items()
           if not name.startswith("MALLOC_") and name != "GLIBC_TUNABLES"}
    result = subprocess.run([sys.executable, "-c", CHURN, mode], capture_output=True, text=True, check=True, env=env)
    return int(result.stdout)


def test_reply_sized_buffers_reuse_their_pages_once_the_thresholds_are_set() -> None:
    touched = REPLIES * PAGES_PER_REPLY
    assert page_faults_of_replies("tuned") < touched // 100
    # glibc's own dynamic thresholds map and zero them again for every reply: what the setting is for.
    assert page_faults_of_replies("default") > touched // 2
