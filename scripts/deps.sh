#!/usr/bin/env bash
# Installs what revirt needs to build and test, from Debian packages and
# crates.io only. Idempotent: does nothing when everything is present.
set -euo pipefail

need=()
for tool in gcc:gcc make:make ld:binutils objdump:binutils gdb:gdb tmux:tmux ip:iproute2; do
  cmd=${tool%%:*} pkg=${tool##*:}
  command -v "$cmd" >/dev/null 2>&1 || need+=("$pkg")
done
# The guest SDK (guests/sdk: musl's C library) and the host side of the zlib
# comparison (tests/sdk.rs).
for file in /usr/lib/x86_64-linux-musl/libc.a:musl-dev /usr/include/zlib.h:zlib1g-dev; do
  [[ -e ${file%%:*} ]] || need+=("${file##*:}")
done
if ((${#need[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "revirt: missing packages: ${need[*]} (run as root or install them)" >&2
    exit 1
  fi
  echo "revirt: installing ${need[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need[@]}" >/dev/null
fi
# zlib's and Lua's sources for the guest programs (guests/programs).
bash "$(dirname "$0")/third-party.sh"
command -v cargo >/dev/null || { echo "revirt: cargo (Rust) is required" >&2; exit 1; }
if [[ ! -r /dev/kvm || ! -w /dev/kvm ]]; then
  echo "revirt: warning: /dev/kvm is not usable by $(id -un); KVM tests will fail" >&2
fi
