#!/usr/bin/env python3
"""A fixed number of HTTP/1.1 keep-alive requests, for counting instructions per request.

wrk runs for a time, not a count; under valgrind the gateway is ~50x slower, so this sends
exactly N requests (GET /bench, an x-key header drawn from KEYS values, none with 0) over C
keep-alive connections, C in flight, and prints one JSON line: requests, non-2xx, errors,
seconds.

usage: fixed_load.py PORT N [C] [KEYS]
"""
import asyncio
import json
import random
import sys
import time


async def one_connection(port, count, keys, stats):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for _ in range(count):
            head = "GET /bench HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            if keys > 0:
                head += f"x-key: k{random.randint(1, keys)}\r\n"
            writer.write((head + "\r\n").encode())
            await writer.drain()
            status_and_headers = await reader.readuntil(b"\r\n\r\n")
            lines = status_and_headers.decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            length = None
            chunked = False
            for line in lines[1:]:
                name, _, value = line.partition(":")
                name = name.strip().lower()
                if name == "content-length":
                    length = int(value.strip())
                elif name == "transfer-encoding" and "chunked" in value.lower():
                    chunked = True
            if chunked:
                while True:
                    size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                    await reader.readexactly(size + 2)
                    if size == 0:
                        break
            elif length:
                await reader.readexactly(length)
            stats["requests"] += 1
            if status < 200 or status >= 300:
                stats["non2xx"] += 1
    except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
        stats["errors"] += 1
    finally:
        writer.close()


async def main():
    port = int(sys.argv[1])
    total = int(sys.argv[2])
    conns = int(sys.argv[3]) if len(sys.argv) > 3 else 8
    keys = int(sys.argv[4]) if len(sys.argv) > 4 else 0
    stats = {"requests": 0, "non2xx": 0, "errors": 0}
    per = [total // conns + (1 if i < total % conns else 0) for i in range(conns)]
    start = time.monotonic()
    await asyncio.gather(*(one_connection(port, n, keys, stats) for n in per if n))
    stats["seconds"] = time.monotonic() - start
    print(json.dumps(stats))


if __name__ == "__main__":
    asyncio.run(main())
