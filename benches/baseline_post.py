#!/usr/bin/env python3
"""Baseline for the benchmark harness: one Python process POSTing each file of a folder to the
KATA scanner API over ONE keep-alive TLS connection with the client certificate.

The multipart body is the one dropscan sends (src/kata/multipart.rs): parts scanId, objectType
= file, then content with filename = the scanId and application/octet-stream; an exact
Content-Length, never chunked. Each file is read from disk for its upload. Only submissions
are sent (no results polling, no deletes): this is the cost floor of moving bytes to the API.

Prints one line: `baseline_post files=N seconds=S cpu_seconds=C`.
Usage: baseline_post.py URL SENSOR_ID CLIENT_CERT CLIENT_KEY CA_CERT DIR
"""

import http.client
import os
import ssl
import sys
import time
import urllib.parse
import uuid


def main():
    if len(sys.argv) != 7:
        sys.exit(__doc__)
    url, sensor, cert, key, ca, folder = sys.argv[1:]
    parsed = urllib.parse.urlsplit(url)
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    ctx.load_cert_chain(cert, key)
    names = sorted(
        os.path.join(root, name) for root, _dirs, files in os.walk(folder) for name in files
    )
    path = f"/kata/scanner/v1/sensors/{sensor}/scans?sensorInstanceId=baseline-post"
    conn = http.client.HTTPSConnection(parsed.hostname, parsed.port, context=ctx, timeout=120)
    wall0, cpu0 = time.monotonic(), time.process_time()
    for name in names:
        scan_id = uuid.uuid4().hex
        boundary = "dropscan-" + uuid.uuid4().hex
        with open(name, "rb") as f:
            content = f.read()
        preamble = (
            f"--{boundary}\r\n"
            'Content-Disposition: form-data; name="scanId"\r\n\r\n'
            f"{scan_id}\r\n"
            f"--{boundary}\r\n"
            'Content-Disposition: form-data; name="objectType"\r\n\r\n'
            "file\r\n"
            f"--{boundary}\r\n"
            f'Content-Disposition: form-data; name="content"; filename="{scan_id}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        body = preamble + content + f"\r\n--{boundary}--\r\n".encode()
        conn.request(
            "POST",
            path,
            body=body,
            headers={
                "Content-Type": f"multipart/form-data; boundary={boundary}",
                "Content-Length": str(len(body)),
            },
        )
        answer = conn.getresponse()
        answer.read()
        if answer.status != 200:
            sys.exit(f"{name}: HTTP {answer.status}")
    wall = time.monotonic() - wall0
    cpu = time.process_time() - cpu0
    conn.close()
    print(f"baseline_post files={len(names)} seconds={wall:.6f} cpu_seconds={cpu:.6f}")


if __name__ == "__main__":
    main()
