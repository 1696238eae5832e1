#!/usr/bin/env bash
# Set everything up and run the box with its embedded defaults (127.0.0.1:2222, state in ./.buildbox,
# registry from ./users.nix + ./keys/ when present). Extra arguments go to `buildbox serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --no-trixie
exec node dist/src/cli.js serve "$@"
