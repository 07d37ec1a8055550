"""gRPC test server for tests/grpc.rs: generic handlers over raw bytes (no codegen).

test.Echo/Unary answers b"echo:" + request and sets trailing metadata x-trailer=unary-done;
test.Echo/Stream answers N messages item-0..item-{N-1} (N = the request as a decimal number)
and sets trailing metadata x-trailer=stream-done, x-count=N. Prints "ready PORT" once serving.

Usage: server.py PORT [CERT KEY]   with CERT and KEY (PEM files): TLS (ALPN h2), else h2c.
"""
import sys
from concurrent import futures

import grpc


def unary(request, context):
    context.set_trailing_metadata((("x-trailer", "unary-done"),))
    return b"echo:" + request


def stream(request, context):
    n = int(request.decode() or "3")
    for i in range(n):
        yield f"item-{i}".encode()
    context.set_trailing_metadata((("x-trailer", "stream-done"), ("x-count", str(n))))


def main():
    handler = grpc.method_handlers_generic_handler(
        "test.Echo",
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "Stream": grpc.unary_stream_rpc_method_handler(stream),
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((handler,))
    address = f"127.0.0.1:{sys.argv[1]}"
    if len(sys.argv) > 3:
        with open(sys.argv[2], "rb") as cert, open(sys.argv[3], "rb") as key:
            credentials = grpc.ssl_server_credentials(((key.read(), cert.read()),))
        port = server.add_secure_port(address, credentials)
    else:
        port = server.add_insecure_port(address)
    server.start()
    print(f"ready {port}", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
