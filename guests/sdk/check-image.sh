#!/bin/sh
# Refuses a guest image whose code contains an instruction that breaks exact
# replay or does not work on the revirt platform (docs/guest-sdk.md):
#   rdtsc, rdtscp  the TSC: KVM gives the VMM no way to trap or record it
#   rdrand, rdseed hardware randomness: not recorded, replay would diverge
#   cpuid          answered by KVM, may differ between record and replay hosts
#   syscall, sysenter, int N
#                  no kernel to call (and broken in ring 3 on kvm_pvm hosts);
#                  use port I/O (revirt.h) instead
# `int3` (a debugger's breakpoint) is allowed. Only .text is scanned: the
# 32-bit PVH entry stub for QEMU lives in its own section.
set -eu
img=${1:?usage: check-image.sh IMAGE}
bad=$(objdump -d --no-show-raw-insn -j .text "$img" | awk '
    /^[0-9a-f]+ <.*>:$/ { fn = $2; next }
    $2 ~ /^(rdtsc|rdtscp|rdrand|rdseed|cpuid|syscall|sysenter|int)$/ {
        sub(":", "", $1); print "  " $1 " " fn " " $2 " " $3
    }')
if [ -n "$bad" ]; then
    echo "revirt sdk: refusing $img: its code uses instructions that cannot be" >&2
    echo "replayed exactly or need a kernel (see docs/guest-sdk.md, \"Forbidden instructions\"):" >&2
    echo "$bad" | head -20 >&2
    exit 1
fi
