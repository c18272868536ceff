"""Container health probe: exit 0 when the service answers GET /readyz with 200 (model loaded,
inference worker running, gallery open), 1 otherwise.

Python's standard library instead of curl keeps the runtime image free of extra packages.
"""

from __future__ import annotations

import os
import sys
import urllib.request

URL = os.environ.get("GSP_HEALTHCHECK_URL", "http://127.0.0.1:8000/readyz")

try:
    with urllib.request.urlopen(URL, timeout=4) as response:
        sys.exit(0 if response.status == 200 else 1)
except OSError as error:
    print(f"healthcheck failed: {error}", file=sys.stderr)
    sys.exit(1)
