#!/usr/bin/env bash
# Where the gateway's CPU goes, per scenario: c (a route without limits), d (memory store, one
# limit), e (Redis store, 3 limits over 10k keys). The setup is run.sh's (an NGINX upstream
# answering `return 200`, a private redis-server, the gateway with `server.threads: 1`,
# `access_log: off`), then for each scenario:
#
#   perf       CPU us/req from a plain wrk run (-t1 -c32, PERF_SECONDS), then
#              `perf record -e cpu-clock --call-graph dwarf` on the gateway for PERF_SECONDS
#              under the same load; self cost by symbol, inclusive cost of our functions
#              (tollgate::*, fred::*), and the self cost grouped (Pingora/HTTP, tokio, mimalloc,
#              our code, std/libc, kernel). e adds Redis CPU/req and `INFO commandstats` deltas.
#   callgrind  the gateway under `valgrind --tool=callgrind`; a fixed number of requests
#              (CG_REQUESTS over CG_CONNS keep-alive connections, bench/fixed_load.py) between
#              `callgrind_control --zero` and `--dump`, then an idle period of the same length:
#              instructions per request = (Ir(load) - Ir(idle)) / requests, and the top
#              functions by self and inclusive Ir per request (bench/callgrind_top.py), and
#              who calls memcpy/memmove/memset.
#
#   bash bench/profile.sh                       # both, scenarios c d e
#   bash bench/profile.sh --perf d              # perf only, scenario d
#   bash bench/profile.sh --callgrind c e       # callgrind only
#   bash bench/instructions.sh                  # the instructions/request table alone
#
# TOLLGATE_BIN=PATH profiles that binary (default: target/profiling/tollgate, the release build
# with line tables, `cargo build --profile profiling`, built if missing; CARGO_TARGET_DIR is
# honoured). Raw reports and summary.md go to bench/results/profile-<date>/ (bench/.gitignore:
# not committed), the summary also to stdout; INSTR_OUT=FILE writes the instructions table there.
# Loopback only, bounded in time; every process it starts is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

DO_PERF=1; DO_CG=1; SCEN=()
for arg in "$@"; do
  case "$arg" in
    --perf) DO_PERF=1; DO_CG=0 ;;
    --callgrind) DO_PERF=0; DO_CG=1 ;;
    c|d|e) SCEN+=("$arg") ;;
    *) echo "usage: profile.sh [--perf|--callgrind] [c] [d] [e]" >&2; exit 2 ;;
  esac
done
[ ${#SCEN[@]} -gt 0 ] || SCEN=(c d e)
PERF_SECONDS=${PERF_SECONDS:-5}
CG_REQUESTS=${CG_REQUESTS:-5000}
CG_CONNS=${CG_CONNS:-8}
CONNS=32

for tool in wrk nginx redis-server python3; do
  command -v "$tool" >/dev/null 2>&1 || { echo "profile.sh needs $tool (bash bench/run.sh --quick installs it)" >&2; exit 1; }
done
[ "$DO_PERF" = 0 ] || command -v perf >/dev/null 2>&1 || { echo "needs perf (linux-perf)" >&2; exit 1; }
[ "$DO_CG" = 0 ] || command -v valgrind >/dev/null 2>&1 || { echo "needs valgrind" >&2; exit 1; }

TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
if [ -n "${TOLLGATE_BIN:-}" ]; then
  BIN=$TOLLGATE_BIN
else
  BIN="$TARGET_DIR/profiling/tollgate"
  [ -x "$BIN" ] || cargo build --profile profiling --quiet --bin tollgate
fi

DATE=$(date -u +%Y-%m-%d)
OUT="bench/results/profile-$DATE"
mkdir -p "$OUT"
WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }
wait_port() { # PORT [SECONDS]
  local tries=$(( ${2:-10} * 20 ))
  for _ in $(seq 1 "$tries"); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.05
  done
  echo "port $1 never opened" >&2; return 1
}
wait_ready() { # ADMIN_PORT SECONDS: until /ready answers 200 (the store connected)
  python3 - "$1" "$2" <<'PY'
import sys, time, urllib.request
deadline = time.monotonic() + float(sys.argv[2])
while time.monotonic() < deadline:
    try:
        if urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/ready", timeout=5).status == 200:
            sys.exit(0)
    except Exception:
        pass
    time.sleep(0.2)
sys.exit("the gateway never became ready")
PY
}
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
TICK=$(getconf CLK_TCK)

# --- the upstream (NGINX, one worker) and a private Redis ---
UP=$(free_port)
mkdir -p "$WORK/nginx-up"
cat > "$WORK/nginx-up/nginx.conf" <<CONF
worker_processes 1; daemon off; pid $WORK/nginx-up/pid; error_log stderr error;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  server { listen 127.0.0.1:$UP; location / { return 200 "hello from the benchmark upstream\n"; } } }
CONF
nginx -p "$WORK/nginx-up" -c "$WORK/nginx-up/nginx.conf" 2>/dev/null & PIDS+=($!)
REF=$(free_port)
mkdir -p "$WORK/nginx-ref"
cat > "$WORK/nginx-ref/nginx.conf" <<CONF
worker_processes 1; daemon off; pid $WORK/nginx-ref/pid; error_log stderr error;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  upstream up { server 127.0.0.1:$UP; keepalive 128; }
  server { listen 127.0.0.1:$REF; location / { proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection ""; } } }
CONF
[ "$DO_PERF" = 0 ] || { nginx -p "$WORK/nginx-ref" -c "$WORK/nginx-ref/nginx.conf" 2>/dev/null & PIDS+=($!); }
RP=$(free_port)
redis-server --port "$RP" --bind 127.0.0.1 --save "" --appendonly no --daemonize no \
  --logfile "$WORK/redis.log" & PIDS+=($!)
REDIS_PID=$!
wait_port "$UP"; wait_port "$RP"

# gateway_config FILE SCENARIO PORT ADMIN TIMEOUT_MS: run.sh's configs for c, d and e.
gateway_config() {
  local store='{ kind: memory }' limits='[]'
  case "$2" in
    d) limits='[ { name: per-ip, key: ["ip"], rate: "1000000/s", burst: 1000000 } ]' ;;
    e) store="{ kind: redis, redis: { urls: [\"redis://127.0.0.1:$RP\"], timeout_ms: $5 } }"
       limits='[ { name: per-key, key: ["header:x-key"], rate: "1000000/s", burst: 1000000 }, { name: per-ip, key: ["ip"], rate: "1000000/s", burst: 1000000 }, { name: global, key: ["literal:all"], rate: "1000000/s", burst: 1000000 } ]' ;;
  esac
  cat > "$1" <<CONF
listen: ["127.0.0.1:$3"]
admin: { listen: "127.0.0.1:$4" }
access_log: off
server: { threads: 1 }
store: $store
breaker: { failure_threshold: 3, open_ms: 1000, fallback: local }
upstreams: { up: { targets: ["127.0.0.1:$UP"] } }
routes:
  - name: bench
    upstream: up
    limits: $limits
CONF
}
keys_for() { if [ "$1" = e ]; then echo 10000; else echo 0; fi; }
wrk_run() { # PORT KEYS SECONDS -> wrk.lua's JSON line
  KEYS=$2 wrk -t1 -c"$CONNS" -d"${3}s" -s bench/wrk.lua "http://127.0.0.1:$1/" | grep '^JSON ' | sed 's/^JSON //'
}
redis_evalsha() { redis-cli -p "$RP" INFO commandstats | awk -F'[=,:]' '/^cmdstat_evalsha:/ {s += $3} END {print s+0}'; }
redis_cpu_us() { redis-cli -p "$RP" INFO cpu | awk -F: '/^used_cpu_(sys|user):/ {s += $2} END {printf "%.0f", s * 1000000}'; }

# syscalls PID PORT KEYS LABEL: user and system CPU per request of that process (all threads)
# over a plain wrk run of 3 s, then syscalls and context switches per request over another
# (perf stat counting the syscall tracepoints).
syscalls() {
  local pids=$1 port=$2 keys=$3 label=$4 out plain u0 u1
  # First without perf (counting every syscall tracepoint inflates system time): user and
  # system CPU per request.
  u0=$(awk '{print $14 "," $15}' "/proc/$pids/stat")
  plain=$(wrk_run "$port" "$keys" 3)
  u1=$(awk '{print $14 "," $15}' "/proc/$pids/stat")
  out=$(KEYS=$keys perf stat -x, -o "$WORK/stat-$label.csv" -e 'syscalls:sys_enter_*' -e context-switches \
    -p "$pids" -- wrk -t1 -c"$CONNS" -d3s -s bench/wrk.lua "http://127.0.0.1:$port/" | grep '^JSON ' | sed 's/^JSON //')
  python3 - "$label" "$out" "$WORK/stat-$label.csv" "$u0" "$u1" "$TICK" "$plain" <<'PY'
import json, sys
label, out, path, u0, u1, tick, plain = sys.argv[1:]
req = max(json.loads(out)["requests"], 1)
preq = max(json.loads(plain)["requests"], 1)
(ut0, st0), (ut1, st1) = (map(int, u0.split(",")), map(int, u1.split(",")))
user = (ut1 - ut0) / int(tick) * 1e6 / preq
system = (st1 - st0) / int(tick) * 1e6 / preq
counts = {}
with open(path) as f:
    for line in f:
        parts = line.strip().split(",")
        if len(parts) > 2 and parts[0].isdigit() and int(parts[0]) > 0:
            counts[parts[2].replace("syscalls:sys_enter_", "")] = int(parts[0])
cs = counts.pop("context-switches", 0)
total = sum(counts.values())
top = sorted(counts.items(), key=lambda kv: -kv[1])
detail = ", ".join(f"{k} {v / req:.2f}" for k, v in top if v / req >= 0.01)
print(f"| {label} | {user:.1f} | {system:.1f} | {total / req:.2f} | {cs / req:.2f} | {detail} |")
PY
}

SUMMARY="$WORK/summary.md"
: > "$SUMMARY"

# --- perf ---
profile_perf() {
  local id=$1 port admin cfg gw keys
  port=$(free_port); admin=$(free_port); cfg="$WORK/$id.yaml"; keys=$(keys_for "$id")
  gateway_config "$cfg" "$id" "$port" "$admin" 50
  "$BIN" --config "$cfg" 2>"$cfg.log" & gw=$!; PIDS+=("$gw")
  wait_port "$port"; wait_ready "$admin" 10
  wrk_run "$port" "$keys" 1 >/dev/null || true # warm-up
  # A plain run first: CPU per request without perf's own overhead.
  local t0 t1 r0 r1 out
  t0=$(cpu_ticks "$gw"); r0=$(redis_cpu_us)
  redis-cli -p "$RP" INFO commandstats > "$WORK/cmdstats0"
  out=$(wrk_run "$port" "$keys" "$PERF_SECONDS")
  t1=$(cpu_ticks "$gw"); r1=$(redis_cpu_us)
  redis-cli -p "$RP" INFO commandstats > "$WORK/cmdstats1"
  # Then the profile, under the same load.
  KEYS=$keys wrk -t1 -c"$CONNS" -d"$((PERF_SECONDS + 2))s" -s bench/wrk.lua "http://127.0.0.1:$port/" \
    >"$WORK/perf-wrk-$id.txt" 2>&1 & local wrk_pid=$!
  sleep 1
  perf record -q -e cpu-clock -F 1999 --call-graph dwarf,16384 -p "$gw" -o "$WORK/perf-$id.data" \
    -- sleep "$PERF_SECONDS" 2>"$WORK/perf-record-$id.log" || cat "$WORK/perf-record-$id.log" >&2
  wait "$wrk_pid" || true
  syscalls "$gw" "$port" "$keys" "$id. Tollgate" >> "$WORK/syscalls.md"
  kill "$gw" 2>/dev/null || true; wait "$gw" 2>/dev/null || true
  perf report -i "$WORK/perf-$id.data" --no-children --sort dso,symbol --stdio -g none \
    --percent-limit 0.05 2>/dev/null > "$OUT/perf-$id-self.txt"
  perf report -i "$WORK/perf-$id.data" --children --sort symbol --stdio -g none \
    --percent-limit 0.2 2>/dev/null > "$OUT/perf-$id-children.txt"
  python3 - "$id" "$out" "$t0" "$t1" "$TICK" "$r0" "$r1" "$WORK/cmdstats0" "$WORK/cmdstats1" \
    "$OUT/perf-$id-self.txt" "$OUT/perf-$id-children.txt" >> "$SUMMARY" <<'PY'
import json, re, sys
(id_, out, t0, t1, tick, r0, r1, cs0, cs1, self_path, children_path) = sys.argv[1:]
w = json.loads(out)
req = max(w["requests"], 1)
cpu = (int(t1) - int(t0)) / int(tick) * 1e6 / req
redis = (int(r1) - int(r0)) / req

def groups(sym, dso):
    if dso.startswith("[kernel") or sym.startswith("[k]"):
        return "kernel/syscalls"
    s = sym
    if re.search(r"\bmi_|_mi_|mimalloc|__rust_alloc|__rust_dealloc|__rust_realloc|alloc::alloc", s):
        return "allocation (mimalloc)"
    if "tracing_log" in s or "tracing_subscriber" in s or "tracing_core" in s or s.startswith("log::"):
        return "log -> tracing bridge (LogTracer)"
    if s.startswith("tollgate::") or "<tollgate::" in s or " tollgate::" in s:
        return "our code (tollgate::)"
    if "fred::" in s or "redis_protocol" in s:
        return "our code (fred, Redis client)"
    if "tokio::" in s or "mio::" in s:
        return "tokio/mio"
    if "pingora" in s or "httparse" in s or "http::" in s or "bytes::" in s or "h2::" in s:
        return "Pingora/HTTP parsing and I/O"
    if dso.startswith("libc") or "memcpy" in s or "memmove" in s or "memset" in s or "memcmp" in s:
        return "libc (mem*, syscall wrappers)"
    return "other (std, core, hashing, serde...)"

line_re = re.compile(r"^\s+([\d.]+)%\s+(\S+)\s+\[([.k])\]\s+(.*)$")
rows = []
with open(self_path) as f:
    for line in f:
        m = line_re.match(line)
        if m:
            pct, dso, kind, sym = float(m.group(1)), m.group(2), m.group(3), re.sub(r"(\s+-)*\s*$", "", m.group(4))
            if kind == "k":
                dso = "[kernel]"
            rows.append((pct, dso, sym))
total = {}
for pct, dso, sym in rows:
    g = groups(sym, dso)
    total[g] = total.get(g, 0) + pct
children = []
cre = re.compile(r"^\s+([\d.]+)%\s+([\d.]+)%\s+\[([.k])\]\s+(.*)$")
with open(children_path) as f:
    for line in f:
        m = cre.match(line)
        if m:
            children.append((float(m.group(1)), float(m.group(2)), re.sub(r"(\s+-)*\s*$", "", m.group(4))))

def short(s, n=110):
    s = re.sub(r"::h[0-9a-f]{16}$", "", s)
    return s if len(s) <= n else s[: n - 3] + "..."

print(f"### perf, scenario {id_}\n")
print(f"wrk -t1 -c32 {w['duration_us'] / 1e6:.0f} s without perf: {w['requests'] / (w['duration_us'] / 1e6):,.0f} req/s, "
      f"gateway CPU {cpu:.1f} us/req" + (f", Redis CPU {redis:.1f} us/req" if id_ == "e" else "") + ".\n")
print("| group (self cost) | % of gateway CPU | us/req |")
print("|---|---:|---:|")
for g, p in sorted(total.items(), key=lambda kv: -kv[1]):
    print(f"| {g} | {p:.1f} | {p / 100 * cpu:.2f} |")
print("\n| top self-cost symbols | dso | self % | us/req |")
print("|---|---|---:|---:|")
for pct, dso, sym in rows[:25]:
    print(f"| `{short(sym)}` | {dso} | {pct:.2f} | {pct / 100 * cpu:.2f} |")
# Our own functions: paths starting tollgate:: or fred:: (or our trait impls, our drops), not
# generic Pingora/std code instantiated with our types, nor unnamed inlined async blocks.
ours_re = re.compile(r"^(<|core::ptr::drop_in_place<)?(tollgate|fred)::")
ours = [(c, s, sym) for c, s, sym in children if ours_re.search(sym)]
print("\n| our functions (tollgate::, fred::) by inclusive cost | inclusive % | self % | inclusive us/req |")
print("|---|---:|---:|---:|")
for c, s, sym in ours[:20]:
    print(f"| `{short(sym)}` | {c:.2f} | {s:.2f} | {c / 100 * cpu:.2f} |")
if id_ == "e":
    def stats(path):
        d = {}
        with open(path) as f:
            for line in f:
                m = re.match(r"cmdstat_(\w+(?:\|\w+)?):calls=(\d+),usec=(\d+)", line)
                if m:
                    d[m.group(1)] = (int(m.group(2)), int(m.group(3)))
        return d
    a, b = stats(cs0), stats(cs1)
    print("\n| Redis command (INFO commandstats delta) | calls | calls/req | usec | usec/call | usec/req |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in sorted(b, key=lambda n: -(b[n][1] - a.get(n, (0, 0))[1])):
        if name == "info":
            continue
        calls = b[name][0] - a.get(name, (0, 0))[0]
        usec = b[name][1] - a.get(name, (0, 0))[1]
        if calls:
            print(f"| {name} | {calls:,} | {calls / req:.3f} | {usec:,} | {usec / calls:.2f} | {usec / req:.2f} |")
    print("\nEVALSHA's usec includes the commands its script runs (listed again on their own rows).")
print()
PY
  echo "  perf $id done" >&2
}

# --- callgrind ---
ir_of() { # a callgrind dump -> its total Ir
  awk '/^(summary|totals):/ {print $2; exit}' "$1"
}
profile_callgrind() {
  local id=$1 port admin cfg gw keys
  port=$(free_port); admin=$(free_port); cfg="$WORK/cg-$id.yaml"; keys=$(keys_for "$id")
  # Under valgrind the gateway runs ~50x slower: a Redis reply would miss timeout_ms 50 and the
  # breaker would open, so this profile alone allows 5 s.
  gateway_config "$cfg" "$id" "$port" "$admin" 5000
  local cgout="$WORK/callgrind-$id.out"
  valgrind --tool=callgrind --callgrind-out-file="$cgout" --dump-instr=no --collect-jumps=no \
    "$BIN" --config "$cfg" 2>"$cfg.log" & gw=$!; PIDS+=("$gw")
  wait_port "$port" 120; wait_ready "$admin" 120
  python3 bench/fixed_load.py "$port" 200 "$CG_CONNS" "$keys" >/dev/null # warm-up
  callgrind_control -z "$gw" >/dev/null 2>&1
  local load ev0 ev1
  ev0=$(redis_evalsha)
  load=$(python3 bench/fixed_load.py "$port" "$CG_REQUESTS" "$CG_CONNS" "$keys")
  callgrind_control -d "load" "$gw" >/dev/null 2>&1
  ev1=$(redis_evalsha)
  local secs
  secs=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["seconds"])' "$load")
  callgrind_control -z "$gw" >/dev/null 2>&1
  sleep "$secs"
  callgrind_control -d "idle" "$gw" >/dev/null 2>&1
  kill "$gw" 2>/dev/null || true; wait "$gw" 2>/dev/null || true
  # Dumps are numbered in order: .1 the load, .2 the idle period.
  local dload="$cgout.1" didle="$cgout.2"
  [ -f "$dload" ] && [ -f "$didle" ] || { echo "callgrind dumps missing for $id: $(ls "$WORK")" >&2; return 1; }
  # callgrind_annotate's inclusive view is kept as a raw report (its self view of a dump taken
  # after --zero put everything on `clone`: bench/callgrind_top.py reads the dump instead).
  callgrind_annotate --auto=no --inclusive=yes --threshold=99 "$dload" 2>/dev/null > "$OUT/callgrind-$id-inclusive.txt" || true
  cp "$dload" "$OUT/callgrind-$id.load.out"
  echo "$id $(ir_of "$dload") $(ir_of "$didle") $((ev1 - ev0)) $load" >> "$WORK/instructions.txt"
  echo "  callgrind $id done" >&2
}

if [ "$DO_PERF" = 1 ]; then
  wait_port "$REF"
  sleep 0.2 # the worker
  REF_PROCS=$(pgrep -P "$(cat "$WORK/nginx-ref/pid")" | head -1)
  KEYS=0 wrk -t1 -c"$CONNS" -d1s -s bench/wrk.lua "http://127.0.0.1:$REF/" >/dev/null # warm-up
  syscalls "$REF_PROCS" "$REF" 0 "b. NGINX proxy_pass (worker)" >> "$WORK/syscalls.md"
fi
for id in "${SCEN[@]}"; do
  [ "$DO_PERF" = 0 ] || profile_perf "$id"
done
if [ "$DO_PERF" = 1 ]; then
  { echo "### syscalls and context switches per request (perf stat, wrk -t1 -c32, 3 s; user/system CPU from /proc/PID/stat over a 3 s run without perf)"
    echo
    echo "| proxy | user CPU us/req | system CPU us/req | syscalls/req | context switches/req | by syscall, per request |"
    echo "|---|---:|---:|---:|---:|---|"
    cat "$WORK/syscalls.md"
    echo; } >> "$SUMMARY"
fi
for id in "${SCEN[@]}"; do
  [ "$DO_CG" = 0 ] || profile_callgrind "$id"
done

if [ "$DO_CG" = 1 ]; then
  python3 - "$WORK/instructions.txt" "$OUT" "$CG_REQUESTS" "$CG_CONNS" "$(git rev-parse --short HEAD) ($BIN)" \
    "${INSTR_OUT:-}" >> "$SUMMARY" <<'PY'
import json, re, sys
path, out_dir, n, conns, commit, instr_out = sys.argv[1:]
names = {"c": "c. route without limits", "d": "d. memory store, 1 limit", "e": "e. Redis, 3 limits, 10k keys"}
rows = []
with open(path) as f:
    for line in f:
        id_, load, idle, evals, js = line.split(" ", 4)
        w = json.loads(js)
        req = max(w["requests"], 1)
        w["evalsha"] = int(evals) / req
        rows.append((id_, int(load), int(idle), w, (int(load) - int(idle)) / req))
table = ["| scenario | instructions/request | Ir of the load | Ir idle, same length | requests | non-2xx | errors | EVALSHA/req |",
         "|---|---:|---:|---:|---:|---:|---:|---:|"]
for id_, load, idle, w, per in rows:
    table.append(f"| {names.get(id_, id_)} | {per:,.0f} | {load:,} | {idle:,} | {w['requests']:,} | {w['non2xx']} | {w['errors']} | {w['evalsha']:.3f} |")
head = (f"Instructions per request (callgrind; {n} requests over {conns} keep-alive connections "
        f"by bench/fixed_load.py, minus an idle period of the same length), commit {commit}.\n")
print("### callgrind: instructions per request\n")
print(head)
print("\n".join(table))
print()
if instr_out:
    with open(instr_out, "w") as f:
        f.write("# Tollgate instructions per request\n\n" + head + "\n" + "\n".join(table) + "\n")

# Top functions per request, from the dump itself (bench/callgrind_top.py).
import subprocess
def short(s, n=110):
    s = re.sub(r"::h[0-9a-f]{16}", "", s or "?")
    return s if len(s) <= n else s[: n - 3] + "..."
ours_re = re.compile(r"^(<|core::ptr::drop_in_place<)?(tollgate|fred)::")
for id_, load, idle, w, per in rows:
    req = max(w["requests"], 1)
    d = json.loads(subprocess.check_output(
        ["python3", "bench/callgrind_top.py", f"{out_dir}/callgrind-{id_}.load.out", "40"]))
    funcs, total = d["functions"], d["total"] or 1
    print(f"#### callgrind {id_}: top functions (Ir per request; {per:,.0f} instructions/request in all)\n")
    for title, key in (("self", 1), ("inclusive", 2)):
        print(f"| top by {title} | self Ir/req | inclusive Ir/req | {title} % |")
        print("|---|---:|---:|---:|")
        for name, s_, i_ in sorted(funcs, key=lambda r: -r[key])[:25]:
            print(f"| `{short(name)}` | {s_ / req:,.0f} | {i_ / req:,.0f} | {100 * (s_, i_)[key - 1] / total:.1f} |")
        print()
    ours = [r for r in funcs if ours_re.search(r[0] or "")]
    print("| our functions (tollgate::, fred::) | self Ir/req | inclusive Ir/req | inclusive % |")
    print("|---|---:|---:|---:|")
    for name, s_, i_ in sorted(ours, key=lambda r: -r[2])[:20]:
        print(f"| `{short(name)}` | {s_ / req:,.0f} | {i_ / req:,.0f} | {100 * i_ / total:.1f} |")
    print("\n| callers of memcpy/memmove/memset | Ir/req in those calls |")
    print("|---|---:|")
    for name, ir in d["mem_callers"][:8]:
        print(f"| `{short(name)}` | {ir / req:,.0f} |")
    print()
PY
fi
cp "$SUMMARY" "$OUT/summary.md"
cat "$SUMMARY"
echo "wrote $OUT/summary.md (and the raw perf/callgrind reports next to it)" >&2
