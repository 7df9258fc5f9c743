"""The connections of a threaded HTTP server, bounded: how many may be open, how long a request may
take to arrive, and how long a shutdown waits for the requests in flight. Used by serve_emotion.py;
nothing here knows about the model.

    DeadlineReader       a connection's reads against one deadline, not a timeout per read
    BoundedHTTPServer    one thread per connection up to max_connections, a 503 beyond them;
                         close_connections(grace_s) for a shutdown that cannot be held up by a client
"""
from __future__ import annotations

import json
import math
import socket
import threading
import time
from http.server import ThreadingHTTPServer


class DeadlineReader(socket.SocketIO):
    """A connection's reads, each given only the time left until `deadline`. A timeout per read would
    start again with every byte, so a client sending one header byte every few seconds could hold its
    thread forever; a deadline bounds the whole request line and headers (and then the body)."""

    def __init__(self, connection: socket.socket):
        super().__init__(connection, "rb")
        self.connection, self.deadline, self.timed_out = connection, math.inf, False

    def readinto(self, buffer) -> int | None:
        remaining = self.deadline - time.monotonic()
        try:
            if remaining <= 0:
                raise TimeoutError("deadline passed")
            self.connection.settimeout(remaining)
            return super().readinto(buffer)
        except TimeoutError:
            self.timed_out = True
            raise


def cut(connection: socket.socket) -> None:
    """End a connection from outside its thread: its blocked read returns, its next write fails."""
    try:
        connection.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class BoundedHTTPServer(ThreadingHTTPServer):
    # Request threads are daemons that socketserver does not join: close_connections() waits for them
    # itself, up to a grace period, so that a client that never finishes cannot keep the process alive.
    daemon_threads = True
    block_on_close = False
    request_queue_size = 128  # listen backlog; socketserver's 5 overflows under 16 concurrent clients and the
                              # dropped connections wait a 1 s SYN retransmission

    def __init__(self, address, handler, *, max_connections: int):
        self.max_connections = max_connections
        self.connections: dict[socket.socket, bool] = {}   # each open connection -> its request is in flight
        self.connections_changed = threading.Condition()
        self.refused = 0                                   # connections answered 503 (over max_connections)
        super().__init__(address, handler)

    def process_request(self, request: socket.socket, client_address) -> None:
        """In the accepting thread: a thread for the new connection, or a 503 over max_connections."""
        with self.connections_changed:
            full = len(self.connections) >= self.max_connections
            if full:
                self.refused += 1
            else:
                self.connections[request] = False
        if full:
            self.refuse(request)
        else:
            super().process_request(request, client_address)

    def refuse(self, request: socket.socket) -> None:
        """503 at once, without a thread and without reading the request."""
        body = json.dumps({"error": f"too many connections: {self.max_connections} are open (--max_connections); "
                                    "try again shortly"}).encode()
        head = ("HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n").encode()
        try:
            request.settimeout(1.0)        # a fresh socket's send buffer takes this at once
            request.sendall(head + body)
            request.setblocking(False)
            while request.recv(1 << 16):   # drop what the client already sent, so that closing does not
                pass                       # reset the connection before it reads the answer
        except OSError:                    # BlockingIOError: nothing more to drop
            pass
        super().shutdown_request(request)

    def request_started(self, connection: socket.socket) -> None:
        """Called by the handler once the request line and headers are in: the request is in flight."""
        with self.connections_changed:
            if connection in self.connections:
                self.connections[connection] = True

    def shutdown_request(self, request: socket.socket) -> None:
        """When a connection's thread is done with it."""
        with self.connections_changed:
            self.connections.pop(request, None)
            self.connections_changed.notify_all()
        super().shutdown_request(request)

    def connection_counts(self) -> dict:
        with self.connections_changed:
            return {"open": len(self.connections), "in_flight": sum(self.connections.values()),
                    "max": self.max_connections, "refused": self.refused}

    def close_connections(self, deadline: float) -> int:
        """After server_close(): close at once the connections whose request has not begun (nothing is
        lost: a client still sending its headers); wait for the requests in flight until `deadline`
        (time.monotonic()), then close whatever is still open, unanswered. -> how many were closed so."""
        with self.connections_changed:
            for connection, in_flight in self.connections.items():
                if not in_flight:
                    cut(connection)
            while self.connections and (remaining := deadline - time.monotonic()) > 0:
                self.connections_changed.wait(remaining)
            left = list(self.connections)
        for connection in left:
            cut(connection)
        return len(left)
