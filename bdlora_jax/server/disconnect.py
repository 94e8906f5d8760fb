"""Cancel work for a client that has gone: a task reads the request's receive channel until the disconnect."""

import asyncio
from collections.abc import Callable
from contextlib import asynccontextmanager


async def until_disconnect(receive) -> None:
    """Return once the client has gone (ASGI http.disconnect); the body must already have been read."""
    while (await receive())["type"] != "http.disconnect":
        pass


@asynccontextmanager
async def cancelled_on_disconnect(receive, cancel: Callable[[], None]):
    """Within the block, call `cancel` as soon as the client disconnects (a non-streaming answer it will never read).

    The block itself goes on until the work ends (cancel must make it end); the watch stops when the block exits.
    """

    async def watch():
        """Wait for the disconnect, then cancel."""
        await until_disconnect(receive)
        cancel()

    watcher = asyncio.create_task(watch())
    try:
        yield
    finally:
        watcher.cancel()
