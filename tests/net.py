"""Free loopback ports for test services (Ray head, PostgreSQL)."""
from __future__ import annotations

import socket
from contextlib import ExitStack


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1.

    All sockets stay bound until every port is chosen, so the OS cannot hand the same port out twice
    (binding one socket at a time and closing it let two Ray components get the same port in CI).
    """
    with ExitStack() as stack:
        ports = []
        for _ in range(n):
            s = stack.enter_context(socket.socket())
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    assert len(set(ports)) == n
    return ports


def free_port() -> int:
    return free_ports(1)[0]
