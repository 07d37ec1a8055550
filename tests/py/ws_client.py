"""WebSocket client for the gateway tests (tests/websocket.rs): `ws_client.py URL MODE [ARGS]`.

Modes: `echo` (text, binary, a 4 MiB message, 2000 messages in order, then a client close),
`server-close` (the upstream closes with 4001 "bye"), `statuses N` (N handshakes: 101 or the
refusal's status), `idle SECS` / `idle-ping SECS INTERVAL` (a pause with or without client
pings, then one more echo: prints `alive ...` or `closed CODE`). Prints one result line; exits 1
with `FAIL reason` when a check fails."""
import asyncio
import os
import sys

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus


def fail(why):
    print(f"FAIL {why}", flush=True)
    sys.exit(1)


async def echo(url):
    async with connect(url, max_size=None, ping_interval=None) as ws:
        await ws.send("hello")
        got = await ws.recv()
        if got != "hello":
            fail(f"text echo {got!r}")
        blob = bytes(range(256)) * 4
        await ws.send(blob)
        got = await ws.recv()
        if got != blob:
            fail("binary echo differs")
        large = os.urandom(4 * 1024 * 1024)
        await ws.send(large)
        got = await ws.recv()
        if got != large:
            fail(f"large echo differs ({len(got)} bytes back)")
        n = 2000
        for i in range(n):
            await ws.send(f"m{i}")
        for i in range(n):
            got = await ws.recv()
            if got != f"m{i}":
                fail(f"message {i} came back as {got!r}")
        await ws.close(1000, "done")
        if ws.close_code != 1000:
            fail(f"client close ended with {ws.close_code}")
    print("ok", flush=True)


async def server_close(url):
    async with connect(url, ping_interval=None) as ws:
        await ws.send("close-me")
        try:
            got = await ws.recv()
            fail(f"expected a close, got {got!r}")
        except ConnectionClosed as e:
            if e.rcvd is None or e.rcvd.code != 4001 or e.rcvd.reason != "bye":
                fail(f"closed with {e.rcvd!r}")
    print("ok", flush=True)


async def statuses(url, n):
    out = []
    held = []
    for _ in range(n):
        try:
            ws = await connect(url, ping_interval=None)
            held.append(ws)
            out.append("101")
        except InvalidStatus as e:
            out.append(str(e.response.status_code))
    for ws in held:
        await ws.close()
    print(" ".join(out), flush=True)


async def idle(url, secs, ping=None):
    async with connect(url, ping_interval=ping) as ws:
        await ws.send("before")
        if await ws.recv() != "before":
            fail("no echo before the pause")
        await asyncio.sleep(secs)
        try:
            await ws.send("after")
            got = await asyncio.wait_for(ws.recv(), 5)
            print(f"alive {got}", flush=True)
        except ConnectionClosed as e:
            print(f"closed {e.rcvd.code if e.rcvd else 'none'}", flush=True)


async def main():
    url, mode = sys.argv[1], sys.argv[2]
    if mode == "echo":
        await echo(url)
    elif mode == "server-close":
        await server_close(url)
    elif mode == "statuses":
        await statuses(url, int(sys.argv[3]))
    elif mode == "idle":
        await idle(url, float(sys.argv[3]))
    elif mode == "idle-ping":
        await idle(url, float(sys.argv[3]), ping=float(sys.argv[4]))
    else:
        fail(f"unknown mode {mode}")


asyncio.run(main())
