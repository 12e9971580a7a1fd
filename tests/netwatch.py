"""Listening sockets of a process tree, watched while something runs (tests/test_network_exposure.py and the
two-worker runs of tests/test_distributed.py)."""

from __future__ import annotations

import os
import threading

import psutil

LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}  # the last: IPv4 loopback on a dual-stack socket


def listening(pids: set[int] | None = None) -> set[tuple[str, int, str]]:
    """(address, port, process name) of every listening socket on the machine, or of ``pids`` only."""
    out = set()
    for c in psutil.net_connections(kind="inet"):
        if c.status != psutil.CONN_LISTEN or (pids is not None and c.pid not in pids):
            continue
        try:
            name = " ".join(psutil.Process(c.pid).cmdline()[:3]) if c.pid else "?"
        except psutil.Error:
            name = "?"
        out.add((c.laddr.ip, c.laddr.port, name))
    return out


def exposed(seen: set[tuple[str, int, str]]) -> list[tuple[str, int, str]]:
    return sorted(s for s in seen if s[0] not in LOOPBACK)


class TreeWatch:
    """Every socket that this process or any of its descendants (Ray's GCS, raylet, workers, ...) listens on
    while the ``with`` block runs, polled every 0.1 s."""

    def __init__(self) -> None:
        self.seen: set[tuple[str, int, str]] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        me = psutil.Process(os.getpid())
        while not self._stop.is_set():
            try:
                pids = {me.pid} | {p.pid for p in me.children(recursive=True)}
                self.seen |= listening(pids)
            except psutil.Error:
                pass
            self._stop.wait(0.1)

    def __enter__(self) -> TreeWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
