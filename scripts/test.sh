#!/usr/bin/env bash
# Set everything up (Debian packages, the trixie root with Nix 2.26, npm dependencies, build) and run every check:
# type check, lint, and the whole test suite against the real Nix clients, OpenSSH and bubblewrap.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
npm run --silent typecheck
npm run --silent lint
npx vitest run "$@"
