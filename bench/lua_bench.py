#!/usr/bin/env python3
"""Redis CPU of the decision script, without the gateway: `bench/lua_bench.py [SCRIPT.lua ...]`.

Starts a private redis-server on a free loopback port, loads each script, and sends CALLS
EVALSHA calls shaped as the gateway's scenario e sends them (a batch of BATCH requests, each
with 3 token buckets: one per x-key over 10k keys, one per client IP, one global; rate
1000000/s, burst 1000000, cost 1), CONC calls in flight. Prints Redis CPU (INFO cpu delta) per
request and per call, and the `INFO commandstats` usec per call of each command the script
runs. Compare scripts in one run: the machine's speed varies between runs.

VALGRIND=1 runs each script's Redis under callgrind instead and prints Redis's instructions
per request over the measured calls (deterministic: unmoved by other load on the machine; use
CALLS=1000 or so, valgrind is ~50x slower).
"""
import os, random, socket, subprocess, sys, tempfile, time

CALLS = int(os.environ.get("CALLS", "20000"))
BATCH = int(os.environ.get("BATCH", "10"))
CONC = int(os.environ.get("CONC", "4"))


def enc(*args):
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        if not isinstance(a, bytes):
            a = str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


class Conn:
    def __init__(self, port):
        self.s = socket.create_connection(("127.0.0.1", port))
        self.f = self.s.makefile("rb")

    def send(self, data):
        self.s.sendall(data)

    def read(self):
        line = self.f.readline()
        t, rest = line[:1], line[1:-2]
        if t == b"+":
            return rest.decode()
        if t == b"-":
            raise RuntimeError(rest.decode())
        if t == b":":
            return int(rest)
        if t == b"$":
            n = int(rest)
            if n < 0:
                return None
            data = self.f.read(n + 2)[:-2]
            return data
        if t == b"*":
            n = int(rest)
            return [self.read() for _ in range(n)]
        raise RuntimeError(line)

    def cmd(self, *args):
        self.send(enc(*args))
        return self.read()


def info(c, section):
    raw = c.cmd("INFO", section).decode()
    return dict(l.split(":", 1) for l in raw.splitlines() if ":" in l)


def batch_args(rng, prefix, policy_table):
    """One call's KEYS and ARGV. `policy_table`: the layout since issue 14 (the call's distinct
    policies once, then per bucket its policy's position, cost 1); else the one before it
    (interval, burst, cost, algorithm per bucket), to compare with an older script."""
    keys, args = [], ["decide", BATCH, 0]
    if policy_table:
        args += [1, 1000, 1000000, 0]
    # Each request's deadline in Redis TIME microseconds, as the gateway sends it (an hour
    # ahead here: never passed).
    deadline = int(time.time() * 1e6) + 3600 * 10**6
    for _ in range(BATCH):
        args += [3, deadline] if policy_table else [3, deadline, 0]
        for name, value in (("per-key", "k%d" % rng.randrange(10000)), ("per-ip", "127.0.0.1"), ("global", "all")):
            keys.append("%sbench:%s:{%s}" % (prefix, name, value))
            args += [1] if policy_table else [1000, 1000000, 1, 0]
    return keys, args


def start_redis(valgrind):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    d = tempfile.mkdtemp()
    cmd = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", d]
    out = os.path.join(d, "callgrind.out")
    if valgrind:
        cmd = ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--callgrind-out-file=" + out] + cmd
    redis = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):
        try:
            Conn(port).cmd("PING")
            break
        except OSError:
            time.sleep(0.05)
    return redis, port, out


def instructions(out):
    total = 0
    with open(out) as f:
        for line in f:
            if line.startswith("totals:") or line.startswith("summary:"):
                total = max(total, int(line.split()[1]))
    return total


def run(port, path, redis=None):
    c = Conn(port)
    body = open(path, "rb").read()
    sha = c.cmd("SCRIPT", "LOAD", body).decode()
    c.cmd("FLUSHALL")
    rng = random.Random(1)
    policy_table = b"ARGV[4]   P," in body
    calls = [batch_args(rng, "tollgate:", policy_table) for _ in range(500)]
    c.cmd("CONFIG", "RESETSTAT")
    if redis is not None:
        subprocess.run(["callgrind_control", "-i", "on", str(redis.pid)], stdout=subprocess.DEVNULL, check=True)
    before = info(c, "cpu")
    sent = 0
    pending = 0
    t0 = time.time()
    while sent < CALLS or pending:
        while sent < CALLS and pending < CONC:
            keys, args = calls[sent % len(calls)]
            c.send(enc("EVALSHA", sha, len(keys), *keys, *args))
            sent += 1
            pending += 1
        reply = c.read()
        if not isinstance(reply, list) or len(reply) != 2 + BATCH * int(os.environ.get("REPLY_PER_REQUEST", "4")):
            raise SystemExit("unexpected reply: %r" % (reply,))
        pending -= 1
    wall = time.time() - t0
    if redis is not None:
        subprocess.run(["callgrind_control", "-i", "off", str(redis.pid)], stdout=subprocess.DEVNULL, check=True)
    after = info(c, "cpu")
    stats = info(c, "commandstats")
    cpu = sum(float(after[k]) - float(before[k]) for k in ("used_cpu_user", "used_cpu_sys"))
    requests = CALLS * BATCH
    per_cmd = {}
    for k, v in stats.items():
        if not k.startswith("cmdstat_") or k in ("cmdstat_info", "cmdstat_config"):
            continue
        f = dict(x.split("=") for x in v.split(","))
        per_cmd[k[8:]] = (int(f["calls"]) / requests, float(f["usec_per_call"]))
    return cpu * 1e6 / requests, cpu * 1e6 / CALLS, requests / wall, per_cmd


def main():
    scripts = sys.argv[1:] or [os.path.join(os.path.dirname(__file__), "..", "lua", "token_bucket.lua")]
    if os.environ.get("VALGRIND"):
        print("| script | Redis instructions/request |")
        print("|---|---:|")
        for path in scripts:
            redis, port, out = start_redis(True)
            try:
                run(port, path, redis)
            finally:
                redis.terminate()
                redis.wait()
            print("| %s | %.0f |" % (os.path.basename(path), instructions(out) / (CALLS * BATCH)))
        return
    redis, port, _ = start_redis(False)
    try:
        print("| script | Redis CPU us/request | us/call | requests/s | commands per request (usec/call) |")
        print("|---|---:|---:|---:|---|")
        for path in scripts:
            per_req, per_call, rps, cmds = run(port, path)
            detail = ", ".join("%s %.2f (%.2f)" % (k, n, u) for k, (n, u) in sorted(cmds.items()))
            print("| %s | %.2f | %.1f | %.0f | %s |" % (os.path.basename(path), per_req, per_call, rps, detail))
    finally:
        redis.terminate()
        redis.wait()


if __name__ == "__main__":
    main()
