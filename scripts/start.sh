#!/usr/bin/env bash
# Set everything up and run the box with its embedded defaults (127.0.0.1:2222, registry from ./users.nix + ./keys/
# when present, status page on 127.0.0.1:8222). Extra arguments go to `buildbox serve`.
# The state lives in ./.buildbox, unless the unprivileged build users could not reach it there (a checkout under
# /root, say): then in /var/lib/buildbox.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --no-trixie
state=./.buildbox
reachable() {
  local d; d=$(realpath -m "$1")
  while [ "$d" != / ]; do
    if [ -e "$d" ] && [ $(( 0$(stat -c %a "$d") & 1 )) -eq 0 ]; then return 1; fi
    d=$(dirname "$d")
  done
}
if ! reachable "$state"; then
  state=/var/lib/buildbox
  echo "[start] $(pwd) is not reachable by the build users; keeping the box's state in $state" >&2
fi
exec node --max-semi-space-size=4 dist/src/cli.js serve --state-dir "$state" "$@"
