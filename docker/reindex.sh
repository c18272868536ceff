#!/bin/sh
# The indexer job: bulk-index the mounted image folder into the shared gallery volume (arguments
# go to `gsp index build`), then ask the API to swap the rebuilt gallery in.
set -eu
gsp index build "$@"
python /usr/local/lib/gsp/reload.py
