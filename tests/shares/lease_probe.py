#!/usr/bin/env python3
"""Measurement aid for the share fixtures (not run by the tests).

lease_probe.py PATH SECONDS [COMM ...]

Every 10 ms, opens PATH O_RDONLY and tries fcntl(F_SETLEASE, F_RDLCK) (then drops it), and lists
which processes whose /proc/PID/comm is one of COMM hold PATH open (pid:fd:octal flags). Prints a
line with CLOCK_MONOTONIC seconds whenever the result changes. Must run as the file's owner or
root.
"""
import errno
import fcntl
import os
import sys
import time

F_SETLEASE, F_RDLCK, F_UNLCK = 1024, 0, 2


def holders(path, comms):
    out = []
    if not comms:
        return out
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/comm") as f:
                if f.read().strip() not in comms:
                    continue
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}") != path:
                    continue
                with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                    flags = [ln.split()[1] for ln in f if ln.startswith("flags")][0]
                out.append(f"{pid}:{fd}:{flags}")
        except OSError:
            continue
    return out


def probe(path):
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        return "absent"
    try:
        fcntl.fcntl(fd, F_SETLEASE, F_RDLCK)
        fcntl.fcntl(fd, F_SETLEASE, F_UNLCK)
        return "GRANTED"
    except OSError as e:
        return "refused " + errno.errorcode.get(e.errno, str(e.errno))
    finally:
        os.close(fd)


def main():
    path, seconds, comms = sys.argv[1], float(sys.argv[2]), set(sys.argv[3:])
    end = time.monotonic() + seconds
    last = None
    while time.monotonic() < end:
        state = f"{probe(path)} holders={','.join(holders(path, comms))}"
        if state != last:
            print(f"{time.monotonic():.3f} {state}", flush=True)
            last = state
        time.sleep(0.01)


if __name__ == "__main__":
    main()
