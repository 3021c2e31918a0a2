#!/usr/bin/env python3
"""Idle clients for scripts/bench.sh (the idle scenario).

Opens CONNECTIONS keep-alive connections to HOST:PORT, sends one `GET /` on
each and reads its whole answer (headers and a Content-Length body), then holds
them all open and quiet until killed. Prints one line once every connection has
been answered: `IDLE opened=N failed=F`, failed counting connections that could
not be opened or got no complete answer (those are closed).

With `tls` after the count, each connection is HTTPS: a TLS handshake first
(the certificate is not checked: the benchmark's is self-signed), then the
same request over it.

Usage: idle.py HOST PORT CONNECTIONS [tls]
"""

import socket
import ssl
import sys
import time


def answer(sock):
    """Reads one HTTP/1.1 answer with a Content-Length body; True if complete."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return False
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            return False
        body += chunk
    return True


def main():
    host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    tls = None
    if sys.argv[4:] == ["tls"]:
        tls = ssl.create_default_context()
        tls.check_hostname = False
        tls.verify_mode = ssl.CERT_NONE
    request = f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
    held, failed = [], 0
    for _ in range(count):
        try:
            sock = socket.create_connection((host, port), timeout=10)
            if tls:
                sock = tls.wrap_socket(sock, server_hostname=host)
            sock.sendall(request)
            if answer(sock):
                held.append(sock)
                continue
            sock.close()
        except OSError:
            pass
        failed += 1
    print(f"IDLE opened={len(held)} failed={failed}", flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
