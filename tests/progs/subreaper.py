"""Test helper: run a command as a child subreaper so daemons it double-forks stay reapable.

Usage: python subreaper.py CMD...
Prints "CHILD_EXIT <returncode>" when CMD exits, then reaps every orphan re-parented to us
and prints "ALL_REAPED" before exiting 0.
"""

import ctypes
import os
import subprocess
import sys

PR_SET_CHILD_SUBREAPER = 36
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
    sys.exit(f"prctl(PR_SET_CHILD_SUBREAPER) failed: errno {ctypes.get_errno()}")
proc = subprocess.Popen(sys.argv[1:])
print(f"CHILD_EXIT {proc.wait()}", flush=True)
while True:
    try:
        os.wait()
    except ChildProcessError:
        break
print("ALL_REAPED", flush=True)
