#!/usr/bin/env python3
"""An NFS client for the share fixtures (tests/shares_fixture.rs), on the libnfs shared library.

nfs_writer.py URL NAME PAUSE DATAFILE

URL is an export URL as libnfs takes it (nfs://HOST/EXPORT?nfsport=N&mountport=M&version=3|4).
Mounts it, creates the missing parent folders of NAME, CREATES NAME (empty, O_WRONLY|O_CREAT|
O_TRUNC), sleeps PAUSE seconds, writes the bytes of the local DATAFILE, and closes. Prints one
line per step with time.monotonic(). libnfs 4.0 cannot encode an NFSv4 WRITE of 4000 bytes or more
("Failed to encode COMPOUND4args"), so NFSv4 writes go in 2 KiB pieces (NFSv3 in 1 MiB).
"""
import ctypes
import errno
import os
import sys
import time

# libnfs >= 6 swapped the count and buffer arguments of nfs_write; these sonames predate that.
SONAMES = ["libnfs.so.13", "libnfs.so.14"]


def say(what):
    print(f"{time.monotonic():.3f} {what}", flush=True)


class Url(ctypes.Structure):
    _fields_ = [("server", ctypes.c_char_p), ("path", ctypes.c_char_p), ("file", ctypes.c_char_p)]


def load():
    for name in SONAMES:
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError:
            continue
    else:
        sys.exit(f"none of {SONAMES} found (Debian package libnfs13)")
    vp = ctypes.c_void_p
    lib.nfs_init_context.restype = vp
    lib.nfs_destroy_context.argtypes = [vp]
    lib.nfs_parse_url_dir.restype = ctypes.POINTER(Url)
    lib.nfs_parse_url_dir.argtypes = [vp, ctypes.c_char_p]
    lib.nfs_destroy_url.argtypes = [ctypes.POINTER(Url)]
    lib.nfs_get_error.restype = ctypes.c_char_p
    lib.nfs_get_error.argtypes = [vp]
    lib.nfs_mount.argtypes = [vp, ctypes.c_char_p, ctypes.c_char_p]
    lib.nfs_umount.argtypes = [vp]
    lib.nfs_mkdir.argtypes = [vp, ctypes.c_char_p]
    lib.nfs_create.argtypes = [vp, ctypes.c_char_p, ctypes.c_int, ctypes.c_int, ctypes.POINTER(vp)]
    lib.nfs_write.argtypes = [vp, vp, ctypes.c_uint64, ctypes.c_char_p]
    lib.nfs_close.argtypes = [vp, vp]
    return lib


def main():
    url, name, pause, datafile = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
    with open(datafile, "rb") as f:
        data = f.read()
    piece = 2048 if "version=4" in url else 1 << 20
    lib = load()
    nfs = lib.nfs_init_context()

    def fail(what):
        sys.exit(f"{what}: {lib.nfs_get_error(nfs).decode(errors='replace')}")

    parsed = lib.nfs_parse_url_dir(nfs, url.encode())
    if not parsed:
        fail("parse url")
    if lib.nfs_mount(nfs, parsed.contents.server, parsed.contents.path) != 0:
        fail("mount")
    parts = name.strip("/").split("/")
    for i in range(1, len(parts)):
        rc = lib.nfs_mkdir(nfs, ("/" + "/".join(parts[:i])).encode())
        if rc != 0 and rc != -errno.EEXIST:
            fail("mkdir")
    fh = ctypes.c_void_p()
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    if lib.nfs_create(nfs, ("/" + "/".join(parts)).encode(), flags, 0o644, ctypes.byref(fh)) != 0:
        fail("create")
    say("created")
    time.sleep(pause)
    done = 0
    while done < len(data):
        n = lib.nfs_write(nfs, fh, min(piece, len(data) - done), data[done : done + piece])
        if n <= 0:
            fail("write")
        done += n
    say(f"written {done} bytes")
    if lib.nfs_close(nfs, fh) != 0:
        fail("close")
    say("closed")
    lib.nfs_umount(nfs)
    lib.nfs_destroy_url(parsed)
    lib.nfs_destroy_context(nfs)


if __name__ == "__main__":
    main()
