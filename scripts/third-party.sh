#!/usr/bin/env bash
# Fetches the third-party C code that runs inside the guest (docs/guest-sdk.md):
# the upstream sources of zlib and Lua 5.4 as Debian 12 ships them, with
# `apt-get source --download-only` (Debian's own archive and signatures).
# Unpacks them to guests/third_party/{zlib,lua} (not committed). Idempotent.
# As root it adds a deb-src entry for the Debian archive when none is set up.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dest=$root/guests/third_party
mkdir -p "$dest"

have() { [[ -f $dest/zlib/zlib.h && -f $dest/lua/src/lua.h ]]; }
have && exit 0

command -v apt-get >/dev/null || { echo "third-party: apt-get is required (Debian)" >&2; exit 1; }

src_list=/etc/apt/sources.list.d/revirt-deb-src.sources
ensure_deb_src() {
  if apt-get source --download-only --print-uris zlib >/dev/null 2>&1; then
    return 0
  fi
  if [[ $(id -u) -ne 0 ]]; then
    echo "third-party: no deb-src entry in apt's sources; as root, run scripts/deps.sh (adds $src_list)" >&2
    exit 1
  fi
  . /etc/os-release
  echo "third-party: adding $src_list (deb-src for $VERSION_CODENAME)" >&2
  cat > "$src_list" <<SRC
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: $VERSION_CODENAME
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  apt-get update -qq
}
ensure_deb_src

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fetch() { # PACKAGE DIRNAME
  local pkg=$1 name=$2
  [[ -d $dest/$name ]] && return 0
  (cd "$tmp" && apt-get source --download-only -qq "$pkg" >/dev/null 2>&1) ||
    { echo "third-party: apt-get source $pkg failed" >&2; exit 1; }
  mkdir -p "$tmp/x-$name"
  tar -xf "$tmp"/"${pkg}"_*.orig.tar.* -C "$tmp/x-$name"
  mv "$tmp/x-$name"/* "$dest/$name"
  echo "third-party: $pkg -> guests/third_party/$name" >&2
}
fetch zlib zlib
fetch lua5.4 lua
have || { echo "third-party: unpacked sources are incomplete" >&2; exit 1; }
