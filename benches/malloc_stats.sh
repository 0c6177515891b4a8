#!/usr/bin/env bash
# What glibc's allocator holds inside a running process: arenas, memory taken from the system,
# how much of it is free (kept, not in use) and how much is in use. It attaches gdb for a moment
# and calls malloc_info; the process goes on afterwards.
#
#   benches/malloc_stats.sh PID        # e.g. $(pgrep -f 'dropscan run')
#
# Used for the soak's RSS (BENCHMARKS.md, "The soak's RSS growth was mostly glibc's arenas").
set -euo pipefail
pid=${1:?usage: benches/malloc_stats.sh PID}
command -v gdb >/dev/null || { echo "gdb is needed (Debian package gdb)" >&2; exit 1; }
out=$(mktemp)
trap 'rm -f "$out"' EXIT
chmod 666 "$out"
gdb -p "$pid" -batch \
  -ex "call (int)malloc_info(0, (void*)fopen(\"$out\", \"w\"))" \
  -ex "call (int)fflush(0)" >/dev/null 2>&1
python3 - "$out" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
if not text:
    sys.exit("no answer from the process (gdb could not attach, or it has no glibc malloc)")
arenas = text.count('<heap nr=')
total = text[text.rfind('</heap>'):]
def size(pattern):
    m = re.search(pattern, total)
    return int(m.group(1)) if m else 0
free = size(r'<total type="fast" count="\d+" size="(\d+)"') + size(r'<total type="rest" count="\d+" size="(\d+)"')
taken = size(r'<system type="current" size="(\d+)"')
mmapped = size(r'<total type="mmap" count="\d+" size="(\d+)"')
mib = lambda b: b / 2**20
print(f"arenas {arenas}; taken from the system {mib(taken):.1f} MiB: free {mib(free):.1f} MiB, "
      f"in use {mib(taken - free):.1f} MiB; mmapped blocks {mib(mmapped):.1f} MiB")
PY
