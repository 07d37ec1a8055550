"""WebSocket echo upstream for the gateway tests (tests/websocket.rs), `ws_echo_server.py PORT`:
echoes every message; a text message "close-me" makes it close with code 4001 "bye". No pings
of its own. Prints "ready PORT" when listening."""
import asyncio
import sys

from websockets.asyncio.server import serve


async def handler(ws):
    async for message in ws:
        if message == "close-me":
            await ws.close(4001, "bye")
            return
        await ws.send(message)


async def main():
    port = int(sys.argv[1])
    async with serve(handler, "127.0.0.1", port, max_size=None, ping_interval=None):
        print(f"ready {port}", flush=True)
        await asyncio.Future()


asyncio.run(main())
