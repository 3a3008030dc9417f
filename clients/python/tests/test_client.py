"""Unit tests of reaper_client against a stand-in daemon on a Unix socket
(the integration tests drive it against the real one)."""

import datetime
import json
import os
import socket
import sys
import tempfile
import threading
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from reaper_client import Client, ReaperError  # noqa: E402


class FakeDaemon:
    """Answers each request line with `answer(request, fds)`; records them."""

    def __init__(self, answer, handler=None):
        self.handler = handler or self._client
        self.dir = tempfile.TemporaryDirectory()
        self.path = os.path.join(self.dir.name, "reaper.sock")
        self.answer = answer
        self.requests = []
        self.connections = 0
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self.handler, args=(conn,), daemon=True).start()

    def _client(self, conn):
        buf = b""
        with conn:
            while True:
                try:
                    data, fds, _, _ = socket.recv_fds(conn, 65536, 16)
                except OSError:
                    return
                if not data:
                    return
                for fd in fds:
                    os.close(fd)
                buf += data
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    request = json.loads(line)
                    self.requests.append((request, len(fds)))
                    reply = self.answer(request, len(fds))
                    if reply is None:
                        return  # hang up without answering
                    reply.setdefault("id", request.get("id"))
                    try:
                        conn.sendall(json.dumps(reply).encode() + b"\n")
                    except OSError:
                        return  # the client gave up waiting

    def close(self):
        self.listener.close()
        self.dir.cleanup()


def ok(result):
    return {"v": 1, "ok": True, "result": result}


class ClientTest(unittest.TestCase):
    def daemon(self, answer):
        d = FakeDaemon(answer)
        self.addCleanup(d.close)
        return d

    def test_grant_sends_sockets_by_descriptor_and_terms(self):
        d = self.daemon(lambda r, n: ok({"session": {"session": r["session"]}, "created": True}))
        a, b = socket.socketpair()
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        expiry = datetime.datetime(2026, 12, 2, 10, 0, 0, 250000, tzinfo=datetime.timezone.utc)
        with Client(d.path) as c:
            result = c.grant("s1", "alice", "vm-1", sockets=[a, b.fileno()],
                             flows=[("127.0.0.1:5900", "127.0.0.1:40000")],
                             expires_at=expiry, klass="vnc", idle_timeout="15m",
                             idle_direction="input")
        self.assertEqual(result["created"], True)
        request, fds = d.requests[0]
        self.assertEqual(fds, 2)
        self.assertEqual(request["op"], "grant")
        self.assertEqual(request["v"], 1)
        self.assertEqual(request["flows"], [{"fd": 0}, {"fd": 1},
                                            {"local": "127.0.0.1:5900", "remote": "127.0.0.1:40000"}])
        self.assertEqual(request["expires_at"], "2026-12-02T10:00:00.250000Z")
        self.assertEqual(request["class"], "vnc")
        self.assertEqual(request["idle_timeout"], "15m")

    def test_one_connection_serves_every_call(self):
        d = self.daemon(lambda r, n: ok({"sessions": []} if r["op"] == "list" else {}))
        with Client(d.path) as c:
            for _ in range(5):
                self.assertEqual(c.list(user="alice"), [])
            c.status()
            c.touch("s1")
            c.extend("s1", ttl=30)
            c.revoke(user="alice")
        self.assertEqual(d.connections, 1)
        ops = [r["op"] for r, _ in d.requests]
        self.assertEqual(ops, ["list"] * 5 + ["status", "touch", "extend", "revoke"])
        self.assertEqual(d.requests[0][0]["user"], "alice")
        self.assertEqual(d.requests[-1][0], {"v": 1, "id": 9, "op": "revoke", "user": "alice"})

    def test_calls_from_many_threads_each_get_their_own_answer(self):
        d = self.daemon(lambda r, n: ok({"session": {"session": r["session"]}}))
        c = Client(d.path)
        self.addCleanup(c.close)
        seen = {}

        def work(i):
            seen[i] = c.touch(f"s{i}")["session"]["session"]

        threads = [threading.Thread(target=work, args=(i,)) for i in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(seen, {i: f"s{i}" for i in range(20)})

    def test_a_refusal_is_one_exception_with_the_code(self):
        d = self.daemon(lambda r, n: {"v": 1, "ok": False,
                                      "error": {"code": "deadline_refused", "message": "in the past"}})
        with Client(d.path) as c:
            with self.assertRaises(ReaperError) as e:
                c.extend("s1", ttl="1s")
        self.assertEqual((e.exception.code, e.exception.message), ("deadline_refused", "in the past"))

    def test_a_daemon_that_is_down_says_so(self):
        with tempfile.TemporaryDirectory() as d:
            c = Client(os.path.join(d, "none.sock"), timeout=0.5)
            with self.assertRaises(ReaperError) as e:
                c.status()
        self.assertEqual(e.exception.code, "unavailable")

    def test_a_daemon_that_does_not_answer_times_out(self):
        gate = threading.Event()
        self.addCleanup(gate.set)

        def never(r, n):
            gate.wait(10)
            return ok({})

        d = self.daemon(never)
        c = Client(d.path, timeout=0.3)
        self.addCleanup(c.close)
        with self.assertRaises(ReaperError) as e:
            c.status()
        self.assertEqual(e.exception.code, "timeout")

    def test_a_restarted_daemon_is_reached_again(self):
        calls = []

        def first_hangs_up(r, n):
            calls.append(r["op"])
            return ok({})

        d = self.daemon(first_hangs_up)
        c = Client(d.path)
        self.addCleanup(c.close)
        c.status()
        # The daemon restarts: the kept connection is dead.
        c._sock.shutdown(socket.SHUT_RDWR)
        c.status()
        self.assertEqual(calls, ["status", "status"])
        self.assertEqual(d.connections, 2)

    def test_watch_yields_events_until_closed(self):
        requests = []

        def streaming(conn):
            # The answer, two events, then the daemon goes away.
            requests.append(json.loads(conn.recv(65536)))
            conn.sendall(json.dumps(ok({"watching": True})).encode() + b"\n")
            for i in range(2):
                conn.sendall(json.dumps({"schema": 1, "event": "kill", "session": f"s{i}"}).encode() + b"\n")
            conn.close()

        d = FakeDaemon(None, handler=streaming)
        self.addCleanup(d.close)
        events = list(Client(d.path).watch(user="alice"))
        self.assertEqual([e["session"] for e in events], ["s0", "s1"])
        self.assertEqual(requests, [{"v": 1, "op": "watch", "user": "alice"}])

    def test_bad_arguments_are_refused_before_sending(self):
        c = Client("/nonexistent")
        with self.assertRaises(ValueError):
            c.revoke(user="a", target="b")
        with self.assertRaises(ValueError):
            c.extend("s", ttl=1, expires_at=2)
        with self.assertRaises(ValueError):
            c.grant("s", "u", "t", ttl=1, expires_at=datetime.datetime(2026, 1, 1))
        with self.assertRaises(ValueError):
            c.grant("s", "u", "t", ttl=1, sockets=list(range(17)))


if __name__ == "__main__":
    unittest.main()
