"""The baselines of the kill-latency benchmark: how proxies end sessions today.

A console proxy in the style of OpenStack Nova's websocket proxy: each client
connection is relayed to an upstream console server, and the session's end
is enforced inside the proxy, either

  --mode timer  with a threading.Timer per connection that closes both
                sockets at the deadline (Nova's enforce_session_timeout), or
  --mode sweep  with a cleaner that wakes every second and closes every
                connection past its deadline (session cleaners, xapi's poll).

A client's first line is its time to live in milliseconds, counted from when
the proxy reads it. Standard library only.

usage: timer_proxy.py --mode timer|sweep LISTEN_PORT UPSTREAM_HOST:PORT
"""
import socket
import sys
import threading
import time

mode, listen_port, upstream = sys.argv[2], int(sys.argv[3]), sys.argv[4]
up_host, up_port = upstream.rsplit(":", 1)
live = {}  # client socket -> (deadline, upstream socket)
lock = threading.Lock()


def close(client):
    with lock:
        entry = live.pop(client, None)
    if entry is None:
        return
    for s in (client, entry[1]):
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        s.close()


def relay(src, dst):
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass


def serve(client):
    line = b""
    while not line.endswith(b"\n"):
        chunk = client.recv(1)
        if not chunk:
            return
        line += chunk
    ttl = int(line) / 1000.0
    upstream_sock = socket.create_connection((up_host, int(up_port)))
    with lock:
        live[client] = (time.monotonic() + ttl, upstream_sock)
    if mode == "timer":
        threading.Timer(ttl, close, (client,)).start()
    client.sendall(b"ok\n")
    threading.Thread(target=relay, args=(upstream_sock, client), daemon=True).start()
    relay(client, upstream_sock)


def sweeper():
    while True:
        time.sleep(1.0)
        now = time.monotonic()
        with lock:
            due = [c for c, (deadline, _) in live.items() if deadline <= now]
        for c in due:
            close(c)


threading.stack_size(256 * 1024)
if mode == "sweep":
    threading.Thread(target=sweeper, daemon=True).start()
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("127.0.0.1", listen_port))
server.listen(4096)
print("ready", flush=True)
while True:
    conn, _ = server.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
