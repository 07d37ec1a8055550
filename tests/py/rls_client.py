"""A client of Tollgate's rate-limit service built on envoy_data_plane (Envoy's own protos,
generated independently of the gateway's Rust types), for tests/rls.rs.

Usage: rls_client.py ADDR CALLS_JSON

CALLS_JSON is a list of calls, each
  {"domain": "edge", "hits_addend": 0, "repeat": 1,
   "descriptors": [{"entries": [["key", "value"], ...], "hits_addend": 2}, ...]}
(`hits_addend` of a descriptor is optional: absent means unset). Every call is repeated
`repeat` times; all the calls of the list are sent at once from a thread pool, over one channel
(HTTP/2, many streams in flight). One JSON line per call is printed, in list order:
  {"response": RateLimitResponse as proto JSON, default values included}
or {"error": {"code": "INVALID_ARGUMENT", "details": "..."}}.
"""

import json
import sys
from concurrent.futures import ThreadPoolExecutor

import grpc
from envoy_data_plane.envoy.extensions.common.ratelimit.v3 import (
    RateLimitDescriptor,
    RateLimitDescriptorEntry,
)
from envoy_data_plane.envoy.service.ratelimit.v3 import (
    RateLimitRequest,
    RateLimitServiceSyncStub,
)


def request(call):
    descriptors = []
    for d in call["descriptors"]:
        descriptor = RateLimitDescriptor(
            entries=[RateLimitDescriptorEntry(key=k, value=v) for k, v in d["entries"]]
        )
        if "hits_addend" in d:
            descriptor.hits_addend = d["hits_addend"]
        descriptors.append(descriptor)
    return RateLimitRequest(
        domain=call["domain"],
        descriptors=descriptors,
        hits_addend=call.get("hits_addend", 0),
    )


def main():
    addr, calls = sys.argv[1], json.loads(sys.argv[2])
    requests = [request(c) for c in calls for _ in range(c.get("repeat", 1))]
    with grpc.insecure_channel(addr) as channel:
        grpc.channel_ready_future(channel).result(timeout=10)
        stub = RateLimitServiceSyncStub(channel)

        def one(req):
            try:
                response = stub.should_rate_limit(req)
            except grpc.RpcError as e:
                return {"error": {"code": e.code().name, "details": e.details()}}
            return {"response": response.to_dict(include_default_values=True)}

        with ThreadPoolExecutor(max_workers=max(1, min(64, len(requests)))) as pool:
            results = list(pool.map(one, requests))
    for r in results:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
