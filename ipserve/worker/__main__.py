"""`python -m ipserve.worker`: capabilities go first, before gevent or the app.

A master holding CAP_NET_ADMIN (as root, or through systemd's ambient
capabilities) must not pass it on to application code.
"""

import sys

from ipserve.privileges import drop_capabilities

try:
    drop_capabilities()
except OSError as exc:
    print(f"ipserve: error: worker cannot drop its capabilities: {exc}", file=sys.stderr)
    sys.exit(3)

from ipserve.worker.main import main  # noqa: E402

main()
