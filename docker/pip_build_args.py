"""Print `podman build` options that hand the host's pip settings to the image build.

Builds on machines without access to a public index (only a mirror or local wheel folders)
install what the host's pip installs: each index, find-links and constraint setting of
`pip config list` becomes a ``--build-arg PIP_...``, and each local folder or file that a
setting names is mounted read-only at the same path (a ``file://`` index with its parent
folder, where such an index keeps the files its pages link to). The host's CA bundle
(``SSL_CERT_FILE``, else Debian's) is mounted for pip and uv: a TLS-inspecting proxy signs with
a CA that only the host trusts. One option per line.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from install import pip_settings

# Where the host's CA bundle appears in the build: beside, not over, the image's own bundle,
# which a package install in the build may rewrite.
BUILD_CA_BUNDLE = "/run/host-ca-certificates.crt"
_BUILD_ARGS = {
    "index-url": "PIP_INDEX_URL",
    "extra-index-url": "PIP_EXTRA_INDEX_URL",
    "find-links": "PIP_FIND_LINKS",
    "constraint": "PIP_CONSTRAINT",
}


def local_path(entry: str, is_index: bool) -> Path | None:
    """The host path an entry needs mounted, or None for a remote URL."""
    parsed = urlparse(entry)
    if parsed.scheme not in ("", "file"):
        return None
    path = Path(parsed.path if parsed.scheme else entry)
    return path.parent if is_index else path


def ca_options(bundle: Path) -> list[str]:
    if not bundle.is_file():
        return []
    return [
        f"--volume={bundle}:{BUILD_CA_BUNDLE}:ro",
        f"--build-arg=PIP_CERT={BUILD_CA_BUNDLE}",
        f"--build-arg=SSL_CERT_FILE={BUILD_CA_BUNDLE}",
    ]


def build_options(settings: dict[str, str]) -> list[str]:
    options, mounts = [], []
    for key, name in _BUILD_ARGS.items():
        value = settings.get(key, "")
        if not value:
            continue
        options.append(f"--build-arg={name}={value}")
        for entry in value.split():
            path = local_path(entry, is_index=key.endswith("index-url"))
            if path is not None and path.exists() and path not in mounts:
                mounts.append(path)
    return options + [f"--volume={path}:{path}:ro" for path in mounts]


def main() -> int:
    listing = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, check=True
    ).stdout
    bundle = Path(os.environ.get("SSL_CERT_FILE", "/etc/ssl/certs/ca-certificates.crt"))
    print("\n".join(build_options(pip_settings(listing)) + ca_options(bundle)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
