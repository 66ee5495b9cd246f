"""A TCP proxy of the test's own between the service and RabbitMQ, which can be told to stall:
it stops moving bytes in both directions (as a hung broker or a dead network path does) without
closing anything, and moves them again when told to flow. The shared broker is never touched."""
import selectors
import socket
import threading


class StallingProxy:
    def __init__(self, *, target: tuple[str, int]):
        self._target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.setblocking(False)
        self.port = self._listener.getsockname()[1]
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._flowing = threading.Event()
        self._flowing.set()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stalling-proxy", daemon=True)
        self._thread.start()

    def stall(self) -> None:
        self._flowing.clear()

    def flow(self) -> None:
        self._flowing.set()

    def close(self) -> None:
        self._closed.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        try:
            while not self._closed.is_set():
                if not self._flowing.is_set():
                    # bytes wait in the kernel's buffers; new clients wait in the listen backlog
                    self._flowing.wait(timeout=0.05)
                    continue
                for key, _ in self._selector.select(timeout=0.05):
                    if key.fileobj is self._listener:
                        self._accept()
                    elif key.fileobj.fileno() != -1:  # not closed with its other end this round
                        self._forward(key.fileobj, key.data)
        finally:
            for key in list(self._selector.get_map().values()):
                key.fileobj.close()
            self._selector.close()

    def _accept(self) -> None:
        client, _ = self._listener.accept()
        upstream = socket.create_connection(self._target)
        self._selector.register(client, selectors.EVENT_READ, upstream)
        self._selector.register(upstream, selectors.EVENT_READ, client)

    def _forward(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            data = source.recv(65536)
            if data:
                sink.sendall(data)
                return
        except OSError:
            pass
        for end in (source, sink):
            self._selector.unregister(end)
            end.close()
