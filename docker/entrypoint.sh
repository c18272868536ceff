#!/bin/sh
# Container entry point: arguments are a `gsp` subcommand line (`serve ...`, `index build ...`,
# `train ...`); a first argument that is a program on PATH and not a gsp subcommand (sh, python,
# cp) runs as given, for debugging and for copying a checkpoint into the models volume.
set -eu

if [ "$#" -eq 0 ]; then
    exec gsp --help
fi

case "$1" in
    -*) exec gsp "$@" ;;
esac

if gsp "$1" --help >/dev/null 2>&1; then
    # A missing or unreadable mount ends here with a message, not in a stack trace.
    gsp-preflight "$@"
    exec gsp "$@"
fi

exec "$@"
