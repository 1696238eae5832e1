#!/usr/bin/env bash
# Idempotent machine setup for buildbox: Debian packages the box and its tests need, a Debian trixie root
# holding the newer Nix client (2.26), and the npm dependencies from the lockfile.
# Usage: scripts/setup.sh [--no-npm] [--no-trixie]
set -euo pipefail
cd "$(dirname "$0")/.."
want_npm=1; want_trixie=1
for a in "$@"; do
  case "$a" in
    --no-npm) want_npm=0 ;;
    --no-trixie) want_trixie=0 ;;
    *) echo "setup.sh: unknown option $a" >&2; exit 2 ;;
  esac
done
TRIXIE_ROOT=${BUILDBOX_TRIXIE_ROOT:-/var/cache/buildbox/trixie}
SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo
log() { printf '[setup] %s\n' "$*" >&2; }

pkgs=(nix-bin bubblewrap openssh-client openssh-server busybox-static git debootstrap xz-utils ca-certificates)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing Debian packages: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# The Debian nix-bin package starts a nix-daemon unit on systems with systemd; tests use single-user mode.
mkdir -p /nix/store /nix/var/nix 2>/dev/null || $SUDO mkdir -p /nix/store /nix/var/nix

if [ "$want_trixie" = 1 ]; then
  if [ -x "$TRIXIE_ROOT/usr/bin/nix" ] && [ -x "$TRIXIE_ROOT/usr/bin/ssh" ] && [ -f "$TRIXIE_ROOT/.buildbox-ready" ]; then
    :
  else
    log "building the Debian trixie root with Nix 2.26 in $TRIXIE_ROOT (several minutes, once)"
    $SUDO mkdir -p "$(dirname "$TRIXIE_ROOT")"
    tmp="$TRIXIE_ROOT.partial"
    # debootstrap's second stage fails on nix-bin's postinst until /proc is mounted inside; finish it by hand.
    if [ ! -x "$tmp/usr/bin/apt-get" ]; then
      $SUDO rm -rf "$tmp"
      $SUDO debootstrap --variant=minbase --include=nix-bin trixie "$tmp" >"/tmp/buildbox-debootstrap.log" 2>&1 || true
    fi
    if [ ! -x "$tmp/usr/bin/apt-get" ]; then
      log "debootstrap failed; see /tmp/buildbox-debootstrap.log"; exit 1
    fi
    cleanup_mounts() { for m in proc dev/pts dev; do mountpoint -q "$tmp/$m" && $SUDO umount -l "$tmp/$m" || true; done; }
    trap cleanup_mounts EXIT
    $SUDO mount -t proc proc "$tmp/proc"
    $SUDO mount --bind /dev "$tmp/dev"
    $SUDO cp /etc/resolv.conf "$tmp/etc/resolv.conf" 2>/dev/null || true
    $SUDO chroot "$tmp" env DEBIAN_FRONTEND=noninteractive dpkg --configure -a >>/tmp/buildbox-debootstrap.log 2>&1 || true
    $SUDO chroot "$tmp" env DEBIAN_FRONTEND=noninteractive apt-get --fix-broken install -y -qq >>/tmp/buildbox-debootstrap.log 2>&1
    $SUDO chroot "$tmp" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nix-bin openssh-client >>/tmp/buildbox-debootstrap.log 2>&1
    cleanup_mounts; trap - EXIT
    BUILDBOX_TRIXIE_ROOT="$tmp" $SUDO bash scripts/in-trixie.sh -- nix --version >/dev/null
    $SUDO touch "$tmp/.buildbox-ready"
    $SUDO rm -rf "$TRIXIE_ROOT"
    $SUDO mv "$tmp" "$TRIXIE_ROOT"
    log "trixie root ready: $($SUDO bash scripts/in-trixie.sh -- nix --version)"
  fi
fi

if [ "$want_npm" = 1 ]; then
  if [ ! -d node_modules ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
    log "npm ci"
    npm ci --no-audit --no-fund --loglevel=error
  fi
  npm run --silent build
fi
