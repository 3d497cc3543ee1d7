"""A TCP forwarder on loopback that puts a real redis-server a few milliseconds away, or cuts a connection after
forwarding a command (the server ran it; its reply never arrives)."""

from __future__ import annotations

import asyncio
import contextlib
import socket

from tests.conftest import free_port


class Forwarder:
    def __init__(self, target_port: int, delay_s: float = 0.0, accept_after_s: float = 0.0) -> None:
        self.target_port = target_port
        self.delay_s = delay_s  # added to every chunk, each way, in order
        # With accept_after_s, the listening socket's accept queue is full until then: a new connection's SYN is
        # dropped and retried by the kernel a second later, so connecting takes about a second (a loaded host).
        self.accept_after_s = accept_after_s
        self._fillers: list[socket.socket] = []
        self.port = free_port()
        self.cut_next = False  # forward the next client chunk, then close both sides before any reply
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        if not self.accept_after_s:
            self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
            return
        sock = socket.socket()
        sock.bind(("127.0.0.1", self.port))
        sock.listen(0)
        for _ in range(3):  # fill the accept queue
            filler = socket.socket()
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", self.port))
            self._fillers.append(filler)

        async def accept_later() -> None:
            await asyncio.sleep(self.accept_after_s)
            self._server = await asyncio.start_server(self._serve, sock=sock)

        task = asyncio.create_task(accept_later())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for w in list(self._writers):
            w.close()
        for f in self._fillers:
            f.close()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _serve(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        s_reader, s_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers |= {c_writer, s_writer}
        for src, dst, upward in ((c_reader, s_writer, True), (s_reader, c_writer, False)):
            task = asyncio.create_task(self._pump(src, dst, upward, (c_writer, s_writer)))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, upward: bool,
                    both: tuple[asyncio.StreamWriter, asyncio.StreamWriter]) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def send() -> None:
            while True:
                due, data = await queue.get()
                if not data:
                    break
                await asyncio.sleep(max(0.0, due - loop.time()))
                dst.write(data)
                await dst.drain()
                if upward and self.cut_next:  # the server gets the command; its reply has nowhere to go
                    self.cut_next = False
                    for w in both:
                        w.close()
                    break

        sender = asyncio.create_task(send())
        try:
            while data := await src.read(65536):
                queue.put_nowait((loop.time() + self.delay_s, data))
            queue.put_nowait((loop.time() + self.delay_s, b""))
            await sender
        except (ConnectionError, asyncio.CancelledError):
            sender.cancel()
        finally:
            with contextlib.suppress(Exception):
                dst.close()
