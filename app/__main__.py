"""`python -m app`. Ctrl-C and SIGTERM end it with exit code 130 from the first moment; while the libraries are
imported (nothing is held yet) at once, since an exception raised inside an import can leave one half-initialised.
`--help` is answered, and a bad setting refused, before the MONAI Deploy SDK is imported (seconds)."""

import os
import signal
import sys

from app.settings import help_text, parse_settings
from meddpm.errors import ConfigurationError, Interrupted
from meddpm.names import printable

if "-h" in sys.argv or "--help" in sys.argv:
    print(help_text())
    raise SystemExit(0)
try:
    parse_settings(sys.argv[1:])  # parsed again with the SDK's arguments; here only to refuse a bad one at once
except ConfigurationError as error:
    print(f"error: {printable(str(error))}", file=sys.stderr)
    raise SystemExit(error.exit_code) from None


def _stop_while_importing(signum, frame):
    os.write(2, f"error: {Interrupted.while_starting}\n".encode())
    os._exit(Interrupted.exit_code)


for _signal in (signal.SIGINT, signal.SIGTERM):
    signal.signal(_signal, _stop_while_importing)

from app.app import main  # noqa: E402 (after the handlers)

raise SystemExit(main())
