#!/bin/sh
# Static checks of the demo image (run by `make check`).
set -eu
img=${1:-out/vm.img}
fail() { echo "check: FAIL: $*" >&2; exit 1; }

readelf -h "$img" | grep -q 'Entry point address: *0x100000$' || fail "entry is not 0x100000"
# PT_LOAD segments: paddr >= 1 MiB, no overlap.
readelf -lW "$img" | awk '$1 == "LOAD" { print $4, $6 }' | sort | {
    prev_end=0
    while read -r paddr memsz; do
        start=$((paddr)); end=$((paddr + memsz))
        [ "$start" -ge $((0x100000)) ] || fail "segment at $paddr below 1 MiB"
        [ "$start" -ge "$prev_end" ] || fail "segment at $paddr overlaps the previous one"
        prev_end=$end
    done
}
nm "$img" | grep -q '^0000000000200000 T backdoor$' || fail "backdoor is not at 0x200000"
# serve(): frame pointer, name[] at rbp-0x30 => 0x30 + 8 (saved rbp) = 56 filler bytes.
dis=$(objdump -d --no-show-raw-insn "$img" | sed -n '/<serve>:/,/ret/p')
echo "$dis" | grep -q 'push *%rbp' || fail "serve() has no frame pointer"
echo "$dis" | grep -q 'lea *-0x30(%rbp),%rsi' || fail "serve(): name[] is not at rbp-0x30; update the payload in README.md"
echo "check: ok (entry 0x100000, segments, backdoor 0x200000, vuln filler 56 bytes)"
