#!/usr/bin/env bash
# Where the agent's CPU goes, by thread: FILES small files (4 KiB, written then renamed into the
# inbox) through `dropscan run` against the built-in emulator (scans of 50 ms), then the CPU
# time of the whole process and of each thread still alive at the end (the blocking pool's
# threads end when idle, so their time shows only in the process total).
#
#   benches/thread_cpu.sh [BINARY] [FILES]     # defaults: target/release/dropscan, 5000
#
# Compare two builds in the same minutes (this machine is shared): run them alternately.
set -euo pipefail
bin=$(realpath "${1:-target/release/dropscan}")
files=${2:-5000}
work=$(mktemp -d)
trap 'kill "${agent:-}" "${emu:-}" 2>/dev/null || true; rm -rf "$work"' EXIT
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
mkdir -p "$work/inbox"
"$bin" emulate --listen "127.0.0.1:$port" --certs "$work/certs" --scan-delay 50ms..50ms \
  >"$work/emulator.log" 2>&1 &
emu=$!
for _ in $(seq 100); do [ -f "$work/certs/client.key" ] && break; sleep 0.1; done
cat >"$work/agent.toml" <<EOF
[server]
url = "https://127.0.0.1:$port"
sensor_id = "4edb9465-ce7c-4d85-83b7-3fc591fb6a92"
client_cert = "$work/certs/client.crt"
client_key = "$work/certs/client.key"
ca_cert = "$work/certs/ca.crt"
poll_interval = "100ms"
requests_per_second = 100000
max_in_flight = 2000
[state]
dir = "$work/state"
[[watch]]
path = "$work/inbox"
clean_dir = "$work/clean"
quarantine_dir = "$work/quarantine"
failed_dir = "$work/failed"
settle = "200ms"
[log]
level = "warn"
EOF
"$bin" run --config "$work/agent.toml" 2>"$work/agent.log" &
agent=$!
sleep 2
python3 - "$work/inbox" "$files" <<'EOF'
import os, sys
inbox, n = sys.argv[1], int(sys.argv[2])
for i in range(n):
    tmp = os.path.join(inbox, f".part{i}")
    with open(tmp, "wb") as f:
        f.write(os.urandom(4096))
    os.rename(tmp, os.path.join(inbox, f"f{i:06}.bin"))
EOF
placed=0
for _ in $(seq 600); do
  placed=$(find "$work/clean" -type f -name "f*.bin" 2>/dev/null | wc -l)
  [ "$placed" -ge "$files" ] && break
  sleep 0.5
done
sleep 1
tick=$(getconf CLK_TCK)
total=$(awk '{print $14 + $15}' "/proc/$agent/stat")
echo "binary: $bin"
echo "files placed: $placed of $files"
awk -v t="$total" -v k="$tick" -v n="$files" \
  'BEGIN { printf "process CPU: %.2f s (%.0f µs per file)\n", t / k, 1e6 * t / k / n }'
for task in /proc/"$agent"/task/*; do
  name=$(tr ' ' '_' <"$task/comm")
  # Fields after the command name: utime and stime are the 12th and 13th.
  sed 's/.*) //' "$task/stat" | awk -v name="$name" '{ print name, $12 + $13 }'
done | awk -v k="$tick" -v n="$files" '
  { cpu[$1] += $2 }
  END { for (t in cpu) printf "  %-18s %6.2f s (%4.0f µs per file)\n", t, cpu[t] / k, 1e6 * cpu[t] / k / n }' |
  sort -k2 -n -r
