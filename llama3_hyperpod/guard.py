"""A single-threaded process between the launcher and what it launches, so a dead launcher is told exactly once.

Why: PR_SET_PDEATHSIG fires each time the child's parent *thread* exits, and a launcher killed with SIGKILL has
several (pyarrow's jemalloc thread, torch's pools): the kernel moves the child to the next live thread of the group
and signals it again (kernel/exit.c, forget_original_parent). torchrun takes the first SIGTERM as "shut the workers
down gracefully"; a second one, a millisecond later, raises in the middle of that wait (torch elastic agent
server/api.py run() -> _shutdown -> multiprocessing/api.py _close) and torchrun exits, so the workers die before
their step-boundary checkpoint. This guard dies at once with the launcher (SIGKILL as its own death signal, any
number of times) and, being single-threaded, hands its child one SIGTERM.

It keeps the signals the launcher forwards blocked (the launcher addresses the launched process and its workers),
unblocks them for the child, and exits with the child's code (128 + N when the child died of signal N).
Run by path with the project's interpreter: `python -I -S guard.py LAUNCHER_PID ARGV...`.
"""

from __future__ import annotations

import os
import signal
import sys

if __name__ == "__main__":  # run by path (-I: no cwd or PYTHONPATH on sys.path): make the package importable
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from llama3_hyperpod.procs import die_with_parent

STOPPING = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)  # blocked here, the child's to handle
IGNORED = (signal.SIGUSR1, signal.SIGUSR2)  # ignored by the launched process until it installs handlers (launch.py)
EXIT_EXEC_FAILED = 127


def main(argv: list[str]) -> int:
    """Start `argv[1:]` and wait for it; `argv[0]` is the launcher's pid (whose death ends this process)."""
    launcher, command = int(argv[0]), argv[1:]
    # Blocked, not ignored: the child inherits the mask and unblocks it before exec, so a signal sent to it in
    # between is pending, not lost; the dispositions it inherits are the defaults (Python's SIGINT handler is not).
    signal.pthread_sigmask(signal.SIG_BLOCK, STOPPING)
    for sig in STOPPING:
        signal.signal(sig, signal.SIG_DFL)
    for sig in IGNORED:
        signal.signal(sig, signal.SIG_IGN)
    die_with_parent(signal.SIGKILL, launcher)
    guard = os.getpid()
    pid = os.fork()
    if pid == 0:
        die_with_parent(signal.SIGTERM, guard)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOPPING)
        try:
            os.execvp(command[0], command)
        except OSError as exc:
            print(f"error: {command[0]}: {exc.strerror}", file=sys.stderr, flush=True)
        os._exit(EXIT_EXEC_FAILED)
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    return 128 - code if code < 0 else code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
