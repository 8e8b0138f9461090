"""The fleet's DNS resolver, on the control node's bridge address: every rehearsal host's only nameserver.

Docker's embedded DNS (127.0.0.11 in containers on compose networks) forwards every name it does not
know to the host's nameservers, and falls back to public resolvers (8.8.8.8) when the host has none.
This one answers the fleet's own names (`control`, `host1`, ...) and NXDOMAIN for everything else, so
no query leaves the fleet; each query is logged, one line each, for tests to count.

    python -m rehearsal.resolver ADDRESS NAMES_JSON LOG   (NAMES_JSON: {"host1": "10.213.x.11", ...})
"""

from __future__ import annotations

import json
import socket
import socketserver
import struct
import subprocess
import sys
import threading
from pathlib import Path

from rehearsal.listening import wait_until_listening

PORT = 53
TYPE_A, CLASS_IN = 1, 1
NXDOMAIN, FORMERR = 3, 1


def question(query: bytes) -> tuple[str, int, int]:
    """The first question's name, type and the offset after it; ValueError if it is malformed."""
    labels, offset = [], 12
    while True:
        length = query[offset]
        offset += 1
        if length == 0:
            break
        if length & 0xC0:
            raise ValueError("a compressed name in a question")
        labels.append(query[offset:offset + length].decode("ascii", "replace"))
        offset += length
    qtype, _ = struct.unpack("!HH", query[offset:offset + 4])
    return ".".join(labels).lower(), qtype, offset + 4


def answer(query: bytes, names: dict[str, str]) -> tuple[bytes, str]:
    """The response to QUERY and a line for the log."""
    ident, flags = struct.unpack("!HH", query[:4])
    rd = flags & 0x0100
    try:
        name, qtype, end = question(query)
    except (ValueError, IndexError, struct.error):
        return struct.pack("!HHHHHH", ident, 0x8000 | rd | FORMERR, 0, 0, 0, 0), "malformed query"
    address = names.get(name.rstrip("."))
    records = b""
    if address and qtype == TYPE_A:
        records = struct.pack("!HHHIH", 0xC00C, TYPE_A, CLASS_IN, 60, 4) + socket.inet_aton(address)
    rcode = 0 if address else NXDOMAIN
    header = struct.pack("!HHHHHH", ident, 0x8000 | 0x0400 * bool(address) | rd | 0x0080 | rcode, 1,
                         1 if records else 0, 0, 0)
    return header + query[12:end] + records, f"{name} type {qtype}: {address or 'NXDOMAIN'}"


class Resolver:
    def __init__(self, names_file: Path, log: Path):
        self.names_file, self.log, self.lock = names_file, log, threading.Lock()

    def respond(self, query: bytes) -> bytes:
        try:
            names = json.loads(self.names_file.read_text())
        except (OSError, ValueError):
            names = {}
        response, line = answer(query, {name.lower(): ip for name, ip in names.items()})
        with self.lock, self.log.open("a") as log:
            log.write(f"query {line}\n")
        return response


def serve(address: str, resolver: Resolver) -> None:
    class Udp(socketserver.BaseRequestHandler):
        def handle(self):
            data, sock = self.request
            sock.sendto(resolver.respond(data), self.client_address)

    class Tcp(socketserver.StreamRequestHandler):
        def handle(self):
            prefix = self.rfile.read(2)
            if len(prefix) == 2:
                response = resolver.respond(self.rfile.read(struct.unpack("!H", prefix)[0]))
                self.wfile.write(struct.pack("!H", len(response)) + response)

    socketserver.ThreadingUDPServer.allow_reuse_address = True
    socketserver.ThreadingTCPServer.allow_reuse_address = True
    udp = socketserver.ThreadingUDPServer((address, PORT), Udp)
    tcp = socketserver.ThreadingTCPServer((address, PORT), Tcp)  # listening last: readiness is a TCP connect
    threading.Thread(target=udp.serve_forever, daemon=True).start()
    tcp.serve_forever()


def start(address: str, names_file: Path, log: Path) -> subprocess.Popen:
    """Serve on ADDRESS:53 (UDP and TCP); return once it answers."""
    process = subprocess.Popen([sys.executable, "-m", "rehearsal.resolver", address, str(names_file), str(log)],
                               stdin=subprocess.DEVNULL, stdout=log.open("ab"), stderr=subprocess.STDOUT,
                               cwd=Path(__file__).resolve().parent.parent, start_new_session=True)
    wait_until_listening(process, address, PORT, 30, "the fleet resolver", log)
    return process


if __name__ == "__main__":
    serve(sys.argv[1], Resolver(Path(sys.argv[2]), Path(sys.argv[3])))
