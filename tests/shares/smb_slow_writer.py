#!/usr/bin/env python3
"""A scanner-style SMB client for the share fixtures (tests/shares_fixture.rs).

smb_slow_writer.py HOST PORT SHARE NAME CHUNK COUNT PAUSE

Connects as guest (SMB 2/3, no signing: a guest session has no key), creates NAME on SHARE
(overwriting), then COUNT times: writes CHUNK bytes (chunk i is the byte b"A"[0] + i % 26,
repeated), sends an SMB2 FLUSH, and sleeps PAUSE seconds (not after the last chunk). The handle
stays open the whole time and is closed at the end. Prints one line per step with
time.monotonic(), so a caller can correlate. Needs the `smbprotocol` package.
"""
import sys
import time
import uuid

from smbprotocol.connection import Connection
from smbprotocol.open import (
    CreateDisposition,
    CreateOptions,
    FileAttributes,
    FilePipePrinterAccessMask,
    ImpersonationLevel,
    Open,
    ShareAccess,
)
from smbprotocol.session import Session
from smbprotocol.tree import TreeConnect


def say(what):
    print(f"{time.monotonic():.3f} {what}", flush=True)


def main():
    host, port, share, name = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    chunk, count, pause = int(sys.argv[5]), int(sys.argv[6]), float(sys.argv[7])
    conn = Connection(uuid.uuid4(), host, port, require_signing=False)
    conn.connect(timeout=10)
    try:
        session = Session(conn, "guest", "", require_encryption=False)
        session.connect()
        tree = TreeConnect(session, rf"\\{host}\{share}")
        # A guest session has no signing key to verify the negotiation with.
        tree.connect(require_secure_negotiate=False)
        handle = Open(tree, name.replace("/", "\\"))
        handle.create(
            ImpersonationLevel.Impersonation,
            FilePipePrinterAccessMask.GENERIC_READ | FilePipePrinterAccessMask.GENERIC_WRITE,
            FileAttributes.FILE_ATTRIBUTE_NORMAL,
            ShareAccess.FILE_SHARE_READ,
            CreateDisposition.FILE_OVERWRITE_IF,
            CreateOptions.FILE_NON_DIRECTORY_FILE,
        )
        say("open")
        offset = 0
        for i in range(count):
            data = bytes([ord("A") + i % 26]) * chunk
            done = 0
            while done < len(data):
                piece = data[done : done + conn.max_write_size]
                done += handle.write(piece, offset + done)
            offset += len(data)
            handle.flush()
            say(f"chunk {i} written and flushed ({offset} bytes)")
            if i + 1 < count:
                time.sleep(pause)
        handle.close()
        say("closed")
        tree.disconnect()
        session.disconnect()
    finally:
        conn.disconnect()


if __name__ == "__main__":
    main()
