"""An idempotent client's re-sent frame is acked, not queued twice (ENGINE_DEDUP_WINDOW_S).

A proxy between the client and the real service passes the handshake and the
Submit through, then swallows the service's Ack and cuts the connection: the
service has queued the messages, the client never heard so.  The client
reconnects and re-sends the frame.  Without ``idempotent`` the messages are
queued again (the at-least-once duplicate the README describes); with it, the
service finds the keys and acks with the first ids.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Iterator

import msgspec
import pytest

from engine.client import Client
from tests.integration.service_proc import ServiceProc, running_service
from tests.integration.test_service_ingress import http, metric, scrape


class DroppingProxy:
    """Relays TCP to ``target``; on its first connection, drops the second answer and cuts."""

    def __init__(self, target: str) -> None:
        host, _, port = target.rpartition(":")
        self.target = (host, int(port))
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"tcp://127.0.0.1:{self.server.getsockname()[1]}"
        self.connections = 0
        self.dropped = threading.Event()
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self.sockets += [client, upstream]
            first = self.connections == 0
            self.connections += 1
            threading.Thread(target=self._pipe, args=(client, upstream), daemon=True).start()
            down = self._drop_second if first else self._pipe
            threading.Thread(target=down, args=(upstream, client), daemon=True).start()

    @staticmethod
    def _cut(*socks: socket.socket) -> None:
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        self._cut(src, dst)

    def _drop_second(self, src: socket.socket, dst: socket.socket) -> None:
        """Forward the Welcome, swallow the next answer (the Ack), cut both sides."""
        with src.makefile("rb") as stream:
            header = stream.read(4)
            dst.sendall(header + stream.read(struct.unpack(">I", header)[0]))
            header = stream.read(4)
            stream.read(struct.unpack(">I", header)[0])
        self.dropped.set()
        self._cut(src, dst)

    def close(self) -> None:
        self._cut(self.server, *self.sockets)


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProc]:
    with running_service(tmp_path_factory.mktemp("idem"), ENGINE_SINK="null") as svc:
        yield svc
    assert svc.returncode == 0, svc.log_text()


def submitted(svc: ServiceProc) -> int:
    status, body = http(svc, "GET", "/stats", token=None)
    assert status == 200
    return int(msgspec.json.decode(body)["submitted"])


@pytest.mark.parametrize(("idempotent", "queued"), [(False, 10), (True, 5)])
def test_a_frame_re_sent_after_a_reconnect(svc: ServiceProc, idempotent: bool, queued: int) -> None:
    proxy = DroppingProxy(svc.start_line["tcp"])
    before = submitted(svc)
    deduplicated = metric(scrape(svc, token=None), "engine_messages_deduplicated_total")
    try:
        with Client(proxy.url, idempotent=idempotent, reconnect_backoff_s=0.01) as client:
            ids = client.submit_many([("Agent-1", {"n": i}) for i in range(5)])
    finally:
        proxy.close()
    assert proxy.dropped.is_set() and proxy.connections == 2  # it really was re-sent
    assert len(set(ids)) == 5
    assert submitted(svc) - before == queued
    again = metric(scrape(svc, token=None), "engine_messages_deduplicated_total")
    assert again - deduplicated == 10 - queued
