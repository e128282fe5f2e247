"""One direction of the link between the API process and the engine core (EngineProcess, engine_core.py):
pickled messages over a one-way multiprocessing pipe, with a readiness check cheap enough to make every step.

Why not a duplex multiprocessing Pipe and Connection.send/poll: the core sends one message and checks for commands
once per step, so their fixed costs are paid on every step of the engine. Measured on a 2-core VM, a step apart
(5 ms of compute between calls): a write to an OS pipe costs ~20 us less than to the socket pair a duplex Pipe
uses, plain pickle ~7 us less than multiprocessing's ForkingPickler (for file descriptors, which these messages
never carry), and a registered poll object ~16-25 us against Connection.poll()'s ~70 us (it builds a selector per
call).
"""
import pickle
import select
from multiprocessing.connection import Connection


class Channel:
    """Wraps one end of `context.Pipe(duplex=False)`: the reading end, or the writing end."""

    def __init__(self, conn: Connection):
        self.conn = conn
        self._readable = None   # the poll object, made on the first ready()

    def send(self, message):
        self.conn.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))

    def recv(self):
        """The next message; EOFError once the other end is closed and everything sent has been read."""
        return pickle.loads(self.conn.recv_bytes())

    def ready(self) -> bool:
        """Whether a message has begun to arrive (recv() then waits at most for its rest) or the other end has
        closed (recv() raises EOFError): either way recv() does not sleep on an idle pipe."""
        if self._readable is None:
            self._readable = select.poll()
            self._readable.register(self.conn.fileno(), select.POLLIN)
        return bool(self._readable.poll(0))

    def wait(self):
        """Sleeps until ready()."""
        self.conn.poll(None)

    def fileno(self) -> int:
        return self.conn.fileno()

    def close(self):
        self.conn.close()


def channel_pair(context) -> tuple:
    """(reading Channel, writing Channel) of one new pipe of a multiprocessing context."""
    reader, writer = context.Pipe(duplex=False)
    return Channel(reader), Channel(writer)
