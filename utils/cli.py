"""The stage scripts' entry point: user errors become one line on stderr and exit code 2.

A ValueError or FileNotFoundError is how gptlab reports something the user can fix (a bad value, a
missing file); its message names the problem and the fix, so a traceback would only bury it.
Set GPTLAB_DEBUG=1 to see the traceback anyway.
"""

from __future__ import annotations

import os
import sys
from typing import Callable

from utils.signals import Interrupted


def run_main(main: Callable[[], int | None]) -> None:
    try:
        code = main()
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
