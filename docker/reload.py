"""Ask the running API to swap in the gallery that a job just rebuilt.

POSTs ``$GSP_API_URL/v1/admin/reload-gallery`` with the ``X-API-Key`` header set to the first
key of ``GSP_API_KEYS`` (the API's own setting, so one env file serves both services).  Retries
while the API is starting; exits non-zero when the reload is refused or never answered.  When the
API's host name does not resolve, no API is running (compose names only running services): the
updated gallery is what it opens when it starts, so there is nothing to reload.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import urllib.error
import urllib.request

ATTEMPTS = 10
PAUSE_S = 3.0


def main() -> int:
    base = os.environ.get("GSP_API_URL", "http://api:8000").rstrip("/")
    keys = [key.strip() for key in os.environ.get("GSP_API_KEYS", "").split(",") if key.strip()]
    if not keys:
        print("reload: GSP_API_KEYS is empty; set it in .env to let jobs reload", file=sys.stderr)
        return 2
    request = urllib.request.Request(
        f"{base}/v1/admin/reload-gallery", method="POST", headers={"X-API-Key": keys[0]}
    )
    for attempt in range(1, ATTEMPTS + 1):
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                print(f"reload: {json.loads(response.read())}")
                return 0
        except urllib.error.HTTPError as error:
            print(f"reload refused ({error.code}): {error.read().decode()}", file=sys.stderr)
            return 1
        except OSError as error:
            if isinstance(getattr(error, "reason", None), socket.gaierror):
                print(f"reload: no API running at {base}; it serves the new gallery once started")
                return 0
            print(f"reload: API not reachable ({error}), try {attempt}/{ATTEMPTS}", file=sys.stderr)
            time.sleep(PAUSE_S)
    return 1


if __name__ == "__main__":
    sys.exit(main())
