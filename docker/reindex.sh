#!/bin/sh
# The indexer job: bulk-index the mounted image folder into the shared gallery volume (arguments
# go to `gsp index build`, which adds only what the gallery lacks), then ask the API, which
# serves the gallery read-only, to swap the updated gallery in.
set -eu
gsp-preflight index build "$@"
gsp index build "$@"
python /usr/local/lib/gsp/reload.py
