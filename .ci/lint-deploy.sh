#!/usr/bin/env bash
# Lint the deployment files without a Docker engine: hadolint on the Dockerfile, and the compose
# file checked against the compose specification (the schema check-jsonschema vendors, offline;
# `docker compose config` as well where the compose plugin exists).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="${BIN:-.venv/bin}"

"$BIN/hadolint" Dockerfile
"$BIN/check-jsonschema" --builtin-schema vendor.compose-spec docker-compose.yml
if docker compose version >/dev/null 2>&1; then
    docker compose -f docker-compose.yml config --quiet
fi
echo "deployment files: ok"
