"""``gpt`` and ``python -m gptlab ...`` (what ``torchrun -m gptlab run ...`` starts): the command
line of :mod:`gptlab.cli`, with Ctrl-C made one ``Error: interrupted ...`` line and exit code
130 wherever it comes: while the command line loads (torch takes seconds), while plugins load,
or in a command (training saves first). A second Ctrl-C while gptlab stops (its clean-up, or
Python's at exit) ends the process at once, never with a traceback."""

import os
import signal
import sys


def main(argv=None):
    # not where SIGINT is ignored (a background job); again where an earlier call left it
    ours = signal.getsignal(signal.SIGINT) in (signal.default_int_handler, _exit_at_once)
    if ours:
        signal.signal(signal.SIGINT, _interrupt)
    try:
        from gptlab.cli import main as gpt

        return gpt(argv)
    except KeyboardInterrupt:  # before a command runs (a command's own is its one line)
        sys.stderr.write("Error: interrupted\n")
        raise SystemExit(130) from None
    finally:
        if ours:
            signal.signal(signal.SIGINT, _exit_at_once)


def _interrupt(signum, frame):
    """The first Ctrl-C: a KeyboardInterrupt, as Python's own handler raises; the next one
    ends the process."""
    signal.signal(signal.SIGINT, _exit_at_once)
    raise KeyboardInterrupt


def _exit_at_once(signum, frame):
    os._exit(130)


if __name__ == "__main__":
    main()
