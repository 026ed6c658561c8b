"""The stage scripts' entry point: user errors become one line on stderr and exit code 2.

A ValueError or FileNotFoundError is how gptlab reports something the user can fix (a bad value, a
missing file); its message names the problem and the fix, so a traceback would only bury it.
Set GPTLAB_DEBUG=1 to see the traceback anyway.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Callable

from utils.signals import Interrupted


def run_main(main: Callable[[], int | None]) -> None:
    try:
        code = main()
        # The stage is done and has recorded how it ended: a signal during the interpreter's shutdown
        # (joining tracker threads, flushing) must not turn a completed run into exit 130.
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_IGN)
        sys.stdout.flush()
    except BrokenPipeError:
        # Whoever read our output left (`python runs.py list | head`): nothing more to tell them. Point
        # stdout at /dev/null so the interpreter's final flush does not raise again, and exit as a process
        # ended by SIGPIPE would.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(128 + signal.SIGPIPE)
    except (ValueError, FileNotFoundError) as e:
        if os.environ.get("GPTLAB_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Interrupted as e:  # a signal before there was anything to save
        print(f"interrupted: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
