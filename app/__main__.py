"""`python -m app`. SIGTERM acts as Ctrl-C from the first moment, while the SDK is still being imported."""

import signal
import sys

from meddpm.errors import Interrupted

signal.signal(signal.SIGTERM, signal.default_int_handler)
try:
    from app.app import main
except KeyboardInterrupt:
    print("error: stopped by Ctrl-C or SIGTERM while starting; no mask was started, nothing was written", file=sys.stderr)
    raise SystemExit(Interrupted.exit_code) from None

raise SystemExit(main())
