#!/usr/bin/env bash
# Run a command inside the Debian trixie root (Nix 2.26 client) in a private mount namespace: /proc, /dev and
# /tmp are mounted for the command only and disappear with the namespace, so nothing is left mounted afterwards.
# Usage: scripts/in-trixie.sh [--bind HOSTDIR] -- COMMAND [ARGS...]   (HOSTDIR is bound at the same path inside)
set -euo pipefail
ROOT=${BUILDBOX_TRIXIE_ROOT:-/var/cache/buildbox/trixie}
binds=()
while [ $# -gt 0 ]; do
  case "$1" in
    --bind) binds+=("$2"); shift 2 ;;
    --) shift; break ;;
    *) break ;;
  esac
done
[ -d "$ROOT/usr" ] || { echo "in-trixie: no trixie root at $ROOT (run scripts/setup.sh)" >&2; exit 2; }
export ROOT
bindspec=""
for b in "${binds[@]+"${binds[@]}"}"; do bindspec+="mkdir -p \"\$ROOT$b\" && mount --bind \"$b\" \"\$ROOT$b\" && "; done
exec unshare --mount --propagation private -- bash -c "
  set -e
  mount -t proc proc \"\$ROOT/proc\"
  mount --rbind /dev \"\$ROOT/dev\"
  $bindspec
  exec chroot \"\$ROOT\" \"\$@\"" in-trixie "$@"
