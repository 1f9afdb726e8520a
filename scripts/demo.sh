#!/usr/bin/env bash
# One command for a newcomer: install what is missing, build revirt and the
# demo guest, check the host, then record the demo guest and replay it.
# Needs only gcc, make, binutils and cargo (gdb, tmux, iproute2 and the SDK's
# packages are for the tests: scripts/deps.sh). Works as a non-root user in
# the kvm group; says what is missing when it cannot install it.
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
for tool in gcc:gcc make:make ld:binutils objdump:binutils; do
  command -v "${tool%%:*}" >/dev/null 2>&1 || missing+=("${tool##*:}")
done
if ((${#missing[@]})); then
  if [[ $(id -u) -eq 0 ]]; then
    echo "demo: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "demo: missing Debian packages: ${missing[*]}" >&2
    echo "      install them as root: sudo apt-get install ${missing[*]}" >&2
    exit 1
  fi
fi
if ! command -v cargo >/dev/null; then
  echo "demo: cargo (Rust) is missing: https://rustup.rs, or as root: apt-get install cargo" >&2
  exit 1
fi
if [[ ! -e /dev/kvm ]]; then
  echo "demo: /dev/kvm does not exist: this host has no KVM (enable virtualization, load kvm_intel/kvm_amd)" >&2
  exit 1
fi
if [[ ! -r /dev/kvm || ! -w /dev/kvm ]]; then
  grp=$(stat -c %G /dev/kvm)
  echo "demo: $(id -un) cannot open /dev/kvm ($(stat -c '%A %U:%G' /dev/kvm))." >&2
  if [[ $grp == root ]]; then
    echo "      As root, give it to the kvm group: groupadd -f kvm; chgrp kvm /dev/kvm; chmod 660 /dev/kvm" >&2
    echo "      (Debian's udev rules do this when the qemu-system or systemd packages are installed)," >&2
    echo "      then: usermod -aG kvm $(id -un), and log in again." >&2
  else
    echo "      As root: usermod -aG $grp $(id -un), then log in again." >&2
  fi
  exit 1
fi
mkdir -p recordings
cargo build --release --quiet
R=./target/release/revirt
G=guests/demo/out/vm.img
$R doctor
echo
rec=recordings/race-$(date +%Y%m%d-%H%M%S)
# Two ring-3 tasks racing under a 1 kHz timer; exits=16 puts a port read in
# every 16th racy window so the exit clock's interrupts preempt there: the
# result differs from run to run, and the replay reproduces this one exactly.
cmd="workload=race iters=200000 exits=16"
echo "== $R record $G --cmdline '$cmd' -o $rec"
$R record $G --cmdline "$cmd" -o "$rec" </dev/null
echo
echo "== $R replay $rec"
$R replay "$rec"
echo
echo "Next: $R gdb $rec   (then: gdb $G -ex 'target remote :1234'; reverse-stepi, reverse-continue)"
echo "      $R inspect $rec"
echo "      live migration: $R receive --listen 127.0.0.1:4444   (one terminal)"
echo "                      $R run $G --cmdline 'workload=churn iters=1000 pages=1000 hz=100' --control /tmp/vm.sock   (another)"
echo "                      $R migrate /tmp/vm.sock --to 127.0.0.1:4444   (a third; docs/migration.md)"
