"""Test upstream for the egress-policy tests, run inside a network namespace of the suite's:
HTTP on 18080, HTTPS (the suite's test CA) on 18443, a server-speaks-first banner on 18022,
UDP echo on 18053 and 443, on every address. HTTP answers name the Host and any x-api-key seen."""

import socket
import ssl
import sys
import threading


def head(conn):
    data = b""
    while b"\r\n\r\n" not in data and len(data) < 65536:
        chunk = conn.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def http(conn):
    try:
        lines = head(conn).split(b"\r\n")
        if lines[0].startswith(b"GET /big "):  # 100 MiB, for bench/bench_egress.py
            size = 100 * 1024 * 1024
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                         % size)
            block = b"x" * (1 << 20)
            for _ in range(100):
                conn.sendall(block)
            return
        fields = {}
        for line in lines[1:]:
            k, _, v = line.partition(b":")
            fields[k.strip().lower()] = v.strip()
        body = (b"hello host=" + fields.get(b"host", b"-") + b" key=" +
                fields.get(b"x-api-key", b"-") + b"\n")
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                     % len(body) + body)
    except OSError:
        pass
    finally:
        conn.close()


def serve(port, handler, wrap=None):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    s.listen(64)
    while True:
        conn, _ = s.accept()

        def run(conn=conn):
            try:
                c = wrap.wrap_socket(conn, server_side=True) if wrap else conn
            except (OSError, ssl.SSLError):
                conn.close()
                return
            handler(c)

        threading.Thread(target=run, daemon=True).start()


def banner(conn):
    try:
        conn.sendall(b"SSH-2.0-upstream\r\n")
    finally:
        conn.close()


def udp(port=18053):
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.bind(("0.0.0.0", port))
    while True:
        data, peer = u.recvfrom(2048)
        u.sendto(b"udp-echo " + data, peer)


ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(sys.argv[1], sys.argv[2])
for args in ((18080, http), (18443, http, ctx), (18022, banner)):
    threading.Thread(target=serve, args=args, daemon=True).start()
threading.Thread(target=udp, daemon=True).start()
threading.Thread(target=udp, args=(443,), daemon=True).start()  # QUIC's port
print("ready", flush=True)
threading.Event().wait()
