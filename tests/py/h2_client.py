"""A raw HTTP/2 (h2c prior knowledge) client for tests/h2_seams.rs, built on the `h2` package
so that frames can be sent exactly as a hostile client would.

usage: h2_client.py PORT padded   -> one connection, GET /k/x with x-api-key spellings; prints
                                     one status per line, in request order
       h2_client.py PORT emptydata -> POST /free/x with DATA "abc" then an empty DATA frame
                                      with END_STREAM; prints the status
"""
import socket
import sys

import h2.config
import h2.connection
import h2.events

port, mode = int(sys.argv[1]), sys.argv[2]
config = h2.config.H2Configuration(client_side=True, header_encoding=None,
                                   validate_outbound_headers=False,
                                   normalize_outbound_headers=False)
conn = h2.connection.H2Connection(config)
conn.initiate_connection()
sock = socket.create_connection(("127.0.0.1", port))
sock.sendall(conn.data_to_send())


def request(stream_id, headers, chunks):
    conn.send_headers(stream_id, headers, end_stream=not chunks)
    for i, chunk in enumerate(chunks):
        conn.send_data(stream_id, chunk, end_stream=i == len(chunks) - 1)
    sock.sendall(conn.data_to_send())


def statuses(wanted):
    """Reads until every stream in `wanted` has ended; returns {stream_id: status}."""
    got, ended = {}, set()
    sock.settimeout(10)
    while not set(wanted) <= ended:
        data = sock.recv(65536)
        if not data:
            break
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived):
                got[event.stream_id] = dict(event.headers)[b":status"].decode()
            if isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)):
                ended.add(event.stream_id)
            if isinstance(event, h2.events.DataReceived):
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        sock.sendall(conn.data_to_send())
    return got


base = [(":scheme", "http"), (":authority", "127.0.0.1")]
if mode == "padded":
    keys = ["k2", "k2", "k2", " k2", "  k2", "k2 ", "\tk2", "\t k2 \t"]
    for n, key in enumerate(keys):
        sid = 1 + 2 * n
        request(sid, [(":method", "GET"), (":path", "/k/x")] + base + [("x-api-key", key)], [])
        # One at a time: the order of the bucket's answers is the test.
        print(statuses([sid]).get(sid, "none"))
    sock.close()
elif mode == "emptydata":
    request(1, [(":method", "POST"), (":path", "/free/x")] + base, [b"abc", b""])
    print(statuses([1]).get(1, "none"))
    sock.close()
    sys.exit(0)
