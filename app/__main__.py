"""`python -m app`. Ctrl-C and SIGTERM end it with exit code 130 from the first moment; while the libraries are
imported (nothing is held yet) at once, since an exception raised inside an import can leave one half-initialised.
`--help` is answered before the MONAI Deploy SDK is imported."""

import os
import signal
import sys

from app.settings import help_text
from meddpm.errors import Interrupted

if "-h" in sys.argv or "--help" in sys.argv:
    print(help_text())
    raise SystemExit(0)


def _stop_while_importing(signum, frame):
    os.write(2, f"error: {Interrupted.while_starting}\n".encode())
    os._exit(Interrupted.exit_code)


for _signal in (signal.SIGINT, signal.SIGTERM):
    signal.signal(_signal, _stop_while_importing)

from app.app import main  # noqa: E402 (after the handlers)

raise SystemExit(main())
