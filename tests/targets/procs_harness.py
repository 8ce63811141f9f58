"""Run a ProcessManager as a child subreaper in its own process (tests must not make pytest
a subreaper). Usage: python -m targets.procs_harness CMD...

Spawns CMD, prints "EXIT <rc>" when it is reaped, "ADOPTED <pid> <rc>" for each reaped orphan,
then, once stdin is closed, closes the manager and prints "CLOSED <n children left>".
"""

import os
import sys

from multibus.procs import ProcessManager, set_child_subreaper


def main() -> None:
    set_child_subreaper()
    out = sys.stdout

    def on_exit(child):
        print(f"EXIT {child.returncode}", file=out, flush=True)

    def on_adopted(pid, rc):
        print(f"ADOPTED {pid} {rc}", file=out, flush=True)

    def on_line(child, stream, line):
        print(f"LINE {stream} {line}", file=out, flush=True)

    pm = ProcessManager(on_line=on_line, on_exit=on_exit, on_adopted=on_adopted).start()
    pm.spawn("cmd", sys.argv[1:])
    sys.stdin.read()  # the test closes stdin when done
    pm.close()
    with open(f"/proc/{os.getpid()}/task/{os.getpid()}/children") as children:
        left = len(children.read().split())
    print(f"CLOSED {left}", file=out, flush=True)


if __name__ == "__main__":
    main()
