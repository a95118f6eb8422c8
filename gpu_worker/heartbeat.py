"""The worker's liveness heartbeat: a thread that tells the scheduler, every HEARTBEAT_INTERVAL_S, that
the worker process still runs, however long its current step takes.

The step watchdog (``--step-timeout``) must allow a long first step (kernels compile) and so catches
a frozen worker only after minutes. A heartbeat separates the two cases: a process that is merely busy
keeps beating (torch releases the GIL in its kernels, and the interpreter switches threads every few
milliseconds otherwise), while a stopped (SIGSTOP), frozen or swapped-out process stops every thread at
once and sends nothing. The scheduler fails the engine when a worker's beats stop for
``--heartbeat-timeout`` seconds (scheduler_svc.worker_group).

The thread has a ZeroMQ DEALER socket of its own (sockets are not thread-safe), connected to the
scheduler's ROUTER with the identity ``rank<N>`` + HEARTBEAT_SUFFIX; each beat is one empty message. A
scheduler that does not read for a while loses nothing but beats: the socket keeps at most a few.
"""

from __future__ import annotations

import threading

import zmq

HEARTBEAT_INTERVAL_S = 0.5
HEARTBEAT_SUFFIX = b".heartbeat"
MIN_HEARTBEAT_TIMEOUT_S = 2.0  # four beats: a timeout shorter than that would catch a thread switch


def start_heartbeat(address: str, identity: bytes, interval_s: float = HEARTBEAT_INTERVAL_S,
                    ctx: zmq.Context | None = None) -> threading.Event:
    """Starts beating to the scheduler at ``address`` as ``identity`` (the worker's own socket identity);
    set the returned event to stop."""
    stop = threading.Event()
    ctx = ctx or zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 4)
    sock.setsockopt(zmq.IDENTITY, identity + HEARTBEAT_SUFFIX)
    sock.connect(address)

    def beat() -> None:
        try:
            while True:
                try:
                    sock.send(b"", zmq.NOBLOCK)
                except zmq.Again:  # the scheduler is not reading now; it will see the next beats
                    pass
                if stop.wait(interval_s):
                    return
        except zmq.ZMQError:  # the context is going away with the process
            return
        finally:
            sock.close(0)

    threading.Thread(target=beat, name="heartbeat", daemon=True).start()
    return stop
