"""gRPC test client for tests/grpc.rs: runs the calls named on the command line against
TARGET over one channel (h2c, no TLS) and prints one JSON object per call: the status code
name, details, the initial and trailing metadata, and the responses.

Usage: client.py TARGET CALL...   where CALL is unary:TEXT (test.Echo/Unary), stream:N
(test.Echo/Stream) or raw:/pkg.Service/Method (a unary call with the body b"x").
"""
import json
import sys

import grpc


def md(pairs):
    return [[k, v if isinstance(v, str) else v.decode("latin-1")] for k, v in (pairs or ())]


def main():
    target = sys.argv[1]
    with grpc.insecure_channel(target) as channel:
        for call in sys.argv[2:]:
            kind, _, arg = call.partition(":")
            out = {"call": call}
            try:
                if kind == "unary":
                    method = channel.unary_unary("/test.Echo/Unary")
                    response, c = method.with_call(arg.encode(), timeout=10)
                    out["responses"] = [response.decode()]
                elif kind == "raw":
                    method = channel.unary_unary(arg)
                    response, c = method.with_call(b"x", timeout=10)
                    out["responses"] = [response.decode()]
                else:
                    method = channel.unary_stream("/test.Echo/Stream")
                    c = method(arg.encode(), timeout=10)
                    out["responses"] = [m.decode() for m in c]
                out["code"] = c.code().name
                out["details"] = c.details()
                out["initial"] = md(c.initial_metadata())
                out["trailing"] = md(c.trailing_metadata())
            except grpc.RpcError as e:
                out["code"] = e.code().name
                out["details"] = e.details()
                out["initial"] = md(e.initial_metadata())
                out["trailing"] = md(e.trailing_metadata())
            print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
