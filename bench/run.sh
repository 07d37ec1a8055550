#!/usr/bin/env bash
# Tollgate benchmark: sets up everything on loopback (a private redis-server, an NGINX upstream
# serving a small body, NGINX as the reference proxy, the gateway in release mode), drives each
# scenario with wrk, prints a Markdown table, and writes bench/results/<date>.md and .svg.
#
#   bash bench/run.sh            # 10 s per scenario
#   bash bench/run.sh --quick    # 1 s per scenario (CI: checks the suite still runs)
#
# ONLY="e f" bash bench/run.sh runs just those scenarios (ids a-h, bl (NGINX limit_req, the
# reference for d), cm, em, the Redis Cluster
# ones ec, fc, emc, the TLS/HTTP/2 ones t, hs, h2, h2c, each with its NGINX counterpart tn,
# hsn, h2n, h2cn, and the rate-limit service's rls, rls1, rlsr with /v1/check's chk, chkr);
# its results are written as <date>-only-e-f.* so a full run's are kept.
# Results go to bench/results/<date>.md, .jsonl, .svg (--quick: <date>-quick.*, not committed).
# Bounded in time, loopback only; every process it starts is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

SECONDS_PER=10
CONNS=32
QUICK=0
if [ "${1:-}" = "--quick" ]; then SECONDS_PER=1; QUICK=1; fi

need=()
command -v wrk >/dev/null 2>&1 || need+=(wrk)
command -v nginx >/dev/null 2>&1 || need+=(nginx-light)
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v h2load >/dev/null 2>&1 || need+=(nghttp2-client)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}" >&2
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
NGINX=$(command -v nginx)

# TOLLGATE_BIN=PATH benchmarks that binary instead of building the release one.
if [ -n "${TOLLGATE_BIN:-}" ]; then
  BIN=$TOLLGATE_BIN
else
  cargo build --release --quiet --bin tollgate
  BIN="$ROOT/target/release/tollgate"
fi

WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }
# A Cluster node also listens on its port + 10000 (the cluster bus), and redis-server refuses
# ports above 55535: pick both below the kernel's ephemeral range, where nothing is handed out.
cluster_port() { python3 -c '
import random, socket
for _ in range(1000):
    p = random.randint(20000, 22700)
    try:
        for q in (p, p + 10000):
            s = socket.socket(); s.bind(("127.0.0.1", q)); s.close()
    except OSError:
        continue
    print(p); break
else:
    raise SystemExit("no free port pair for a Cluster node")'; }
wait_port() {
  for _ in $(seq 1 200); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.05
  done
  echo "port $1 never opened" >&2; return 1
}
# nginx_procs MASTER_PID: the master and its worker(s), once the worker has been forked.
nginx_procs() {
  local workers=""
  for _ in $(seq 1 200); do
    workers=$(pgrep -P "$1" | tr '\n' ' ')
    [ -n "$workers" ] && break
    sleep 0.05
  done
  [ -n "$workers" ] || { echo "NGINX $1 has no worker" >&2; return 1; }
  echo "$1 $workers"
}
wants() { [ -z "${ONLY:-}" ] || [[ " $ONLY " == *" $1 "* ]]; }
# cpu_ticks PID...: user + system CPU ticks of those processes (all their threads), summed.
cpu_ticks() {
  local pid sum=0 t
  for pid in "$@"; do
    t=$(awk '{print $14 + $15}' "/proc/$pid/stat"); sum=$((sum + t))
  done
  echo "$sum"
}
TICK=$(getconf CLK_TCK)

# The decision driver of the rls/chk scenarios (examples/rls_load.rs), built before anything is
# measured. --quick uses its debug build (`cargo test` has built it; a release build of an
# example compiles every dev-dependency with fat LTO, minutes): those numbers are not kept.
# RLS_LOAD_BIN=PATH uses that driver instead.
decision_rows() { wants rls || wants rls1 || wants rlsr || wants chk || wants chkr; }
if decision_rows; then
  if [ -n "${RLS_LOAD_BIN:-}" ]; then
    RLS_LOAD=$RLS_LOAD_BIN
  elif [ "$QUICK" = 1 ]; then
    cargo build --quiet --example rls_load
    RLS_LOAD="$ROOT/target/debug/examples/rls_load"
  else
    cargo build --release --quiet --example rls_load
    RLS_LOAD="$ROOT/target/release/examples/rls_load"
  fi
fi

# --- upstream and reference proxy (NGINX, one worker each) ---
UP=$(free_port); REF=$(free_port); REF_LIMIT=$(free_port)
mkdir -p "$WORK/nginx-up" "$WORK/nginx-ref"
cat > "$WORK/nginx-up/nginx.conf" <<CONF
worker_processes 1; daemon off; pid $WORK/nginx-up/pid; error_log stderr error;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  server { listen 127.0.0.1:$UP; location / { return 200 "hello from the benchmark upstream\n"; } } }
CONF
cat > "$WORK/nginx-ref/nginx.conf" <<CONF
worker_processes 1; daemon off; pid $WORK/nginx-ref/pid; error_log stderr error;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  upstream up { server 127.0.0.1:$UP; keepalive 128; }
  server { listen 127.0.0.1:$REF; location / { proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection ""; } }
  # bl: the reference for d (one memory limit per client address that always allows).
  limit_req_zone \$binary_remote_addr zone=bench:10m rate=1000000r/s;
  server { listen 127.0.0.1:$REF_LIMIT; location / { limit_req zone=bench burst=1000000 nodelay; limit_req_status 429;
    proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection ""; } } }
CONF
"$NGINX" -p "$WORK/nginx-up" -c "$WORK/nginx-up/nginx.conf" 2>/dev/null & PIDS+=($!)
"$NGINX" -p "$WORK/nginx-ref" -c "$WORK/nginx-ref/nginx.conf" 2>/dev/null & PIDS+=($!)
wait_port "$UP"; wait_port "$REF"; wait_port "$REF_LIMIT"
# NGINX rows count the master and its worker together (the master is idle under load).
REF_PID=$(cat "$WORK/nginx-ref/pid")
REF_PROCS=$(nginx_procs "$REF_PID")

# --- Redis, and a 5 ms relay in front of it ---
RP=$(free_port); SLOW=$(free_port); DEAD=$(free_port)
redis-server --port "$RP" --bind 127.0.0.1 --save "" --appendonly no --daemonize no \
  --logfile "$WORK/redis.log" & PIDS+=($!)
REDIS_PID=$!
wait_port "$RP"
python3 bench/relay.py "$SLOW" "$RP" 5 & PIDS+=($!)
wait_port "$SLOW"

# --- a 3-master Redis Cluster (only when a Cluster scenario runs) ---
CLUSTER_PORTS=()
if wants ec || wants fc || wants emc; then
  for i in 1 2 3; do
    port=$(cluster_port); dir="$WORK/cluster-$i"; mkdir -p "$dir"
    redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --daemonize no \
      --dir "$dir" --cluster-enabled yes --cluster-config-file nodes.conf \
      --cluster-node-timeout 2000 --logfile "$dir/redis.log" & PIDS+=($!)
    CLUSTER_PORTS+=("$port")
  done
  for port in "${CLUSTER_PORTS[@]}"; do wait_port "$port"; done
  redis-cli --cluster create $(printf '127.0.0.1:%s ' "${CLUSTER_PORTS[@]}") \
    --cluster-replicas 0 --cluster-yes >"$WORK/cluster-create.log" 2>&1 \
    || { cat "$WORK/cluster-create.log" >&2; exit 1; }
  cluster_ok() {
    local port
    for port in "${CLUSTER_PORTS[@]}"; do
      redis-cli -p "$port" CLUSTER INFO | grep -q '^cluster_state:ok' || return 1
    done
  }
  for _ in $(seq 1 200); do cluster_ok && break; sleep 0.1; done
  cluster_ok || { echo "Redis Cluster never reached cluster_state:ok" >&2; exit 1; }
fi

# Redis counters summed over a list of ports (one standalone server, or every Cluster master).
redis_cpu_us() {
  local port
  for port in "$@"; do redis-cli -p "$port" INFO cpu; done \
    | awk -F: '/^used_cpu_(sys|user):/ {s += $2} END {printf "%.0f", s * 1000000}'
}
redis_calls() {
  local port
  for port in "$@"; do redis-cli -p "$port" INFO commandstats; done \
    | awk -F'[=,:]' '/^cmdstat_/ && !/^cmdstat_info:/ {s += $3} END {print s+0}'
}
redis_evalsha() {
  local port
  for port in "$@"; do redis-cli -p "$port" INFO commandstats; done \
    | awk -F'[=,:]' '/^cmdstat_evalsha:/ {s += $3} END {print s+0}'
}

# --- gateway configs ---
gateway_config() { # $1 = file, $2 = store yaml, $3 = limits yaml, $4 = port, $5 = admin port,
                  # [$6 = listen yaml, $7 = server yaml, $8 = more top-level yaml]
  local listen="[\"127.0.0.1:$4\"]" server="{ threads: 1 }"
  [ -n "${6:-}" ] && listen=$6
  [ -n "${7:-}" ] && server=$7
  cat > "$1" <<CONF
listen: $listen
admin: { listen: "127.0.0.1:$5" }
access_log: off
server: $server
store: $2
breaker: { failure_threshold: 3, open_ms: 1000, fallback: local }
upstreams: { up: { targets: ["127.0.0.1:$UP"] } }
routes:
  - name: bench
    upstream: up
    limits: $3
${8:-}
CONF
}
MEM='{ kind: memory }'
REDIS="{ kind: redis, redis: { urls: [\"redis://127.0.0.1:$RP\"], timeout_ms: 50 } }"
REDIS_SLOW="{ kind: redis, redis: { urls: [\"redis://127.0.0.1:$SLOW\"], timeout_ms: 50 } }"
CLUSTER_URLS=""
if [ ${#CLUSTER_PORTS[@]} -gt 0 ]; then
  CLUSTER_URLS=$(printf '"redis://127.0.0.1:%s", ' "${CLUSTER_PORTS[@]}")
fi
REDIS_CLUSTER="{ kind: redis, redis: { mode: cluster, urls: [${CLUSTER_URLS%, }], timeout_ms: 50 } }"
REDIS_DOWN="{ kind: redis, redis: { urls: [\"redis://127.0.0.1:$DEAD\"], timeout_ms: 20 } }"
ONE='[ { name: per-ip, key: ["ip"], rate: "1000000/s", burst: 1000000 } ]'
THREE='[ { name: per-key, key: ["header:x-key"], rate: "1000000/s", burst: 1000000 }, { name: per-ip, key: ["ip"], rate: "1000000/s", burst: 1000000 }, { name: global, key: ["literal:all"], rate: "1000000/s", burst: 1000000 } ]'
HOT='[ { name: per-key, key: ["header:x-key"], rate: "1/h", burst: 1 } ]'

RESULTS="$WORK/results.jsonl"
MACHINE="$(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -sr)"
echo "{\"meta\": {\"date\": \"$(date -u +%Y-%m-%d)\", \"machine\": \"$MACHINE\", \"wrk\": \"-t1 -c$CONNS\", \"seconds\": $SECONDS_PER}}" > "$RESULTS"

# drive URL CONNS KEYS KEY SECONDS: one load run, printing wrk.lua's JSON summary line.
# LOAD (env): h1 (default; wrk, keep-alive), close (wrk, `Connection: close`: one new
# connection, and over https one full TLS handshake, per request), h2 (h2load -t1 -c CONNS
# -m 10: HTTP/2 over TLS by ALPN for https, prior knowledge (h2c) for http; p50/p99/p99.9 from
# its per-request log), rls (examples/rls_load.rs: CONNS concurrent ShouldRateLimit calls to
# the RLS address URL over RLS_CONNECTIONS HTTP/2 connections, RLS_DESCRIPTORS descriptors of
# KEYS values each), check (the same driver: CONNS concurrent POST /v1/check to URL over
# HTTP/1.1 keep-alive, the same decision as a JSON key).
drive() {
  local url=$1 conns=$2 keys=$3 key=$4 secs=$5
  case "${LOAD:-h1}" in
    h1) KEYS=$keys KEY=$key wrk -t1 -c"$conns" -d"${secs}s" -s bench/wrk.lua "$url" ;;
    close) CLOSE=1 KEYS=$keys KEY=$key wrk -t1 -c"$conns" -d"${secs}s" -s bench/wrk.lua "$url" ;;
    h2)
      local log="$WORK/h2load.log" out
      rm -f "$log"
      out=$(h2load -t1 -c"$conns" -m10 -D"$secs" --log-file="$log" "${url}bench")
      python3 - "$out" "$log" "$url" <<'PY'
import json, re, sys
out, log, url = sys.argv[1:]
proto = re.search(r"Application protocol: (\S+)", out)
want = "h2" if url.startswith("https:") else "h2c"
if not proto or proto.group(1) != want:
    sys.exit(f"h2load did not speak {want} to {url}:\n{out}")
secs = re.search(r"finished in ([\d.]+)(us|ms|s),", out)
scale = {"us": 1, "ms": 1e3, "s": 1e6}[secs.group(2)]
req = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
                r"(\d+) failed, (\d+) errored, (\d+) timeout", out)
codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
done = int(req.group(3))
lat = []
with open(log) as f:
    for line in f:
        parts = line.split("\t")
        if len(parts) >= 3:
            lat.append(int(parts[2]))
lat.sort()
pct = lambda q: lat[min(len(lat) - 1, int(len(lat) * q))] if lat else 0
print("JSON " + json.dumps({
    "requests": done, "duration_us": int(float(secs.group(1)) * scale),
    "non2xx": sum(int(codes.group(i)) for i in (2, 3, 4)), "errors": int(req.group(5)) + int(req.group(7)),
    "p50_us": pct(0.50), "p99_us": pct(0.99), "p999_us": pct(0.999)}))
PY
      ;;
    rls)
      "$RLS_LOAD" --rls "$url" --concurrency "$conns" --connections "${RLS_CONNECTIONS:-1}" \
        --duration "$secs" --descriptors "$RLS_DESCRIPTORS" --keys "$keys" ;;
    check)
      "$RLS_LOAD" --check "$url" --concurrency "$conns" --duration "$secs" \
        --descriptors "$RLS_DESCRIPTORS" --keys "$keys" ;;
    *) echo "unknown LOAD=$LOAD" >&2; return 1 ;;
  esac
}

# run_load ID NAME URL PROXY_PIDS CONNS [KEYS] [KEY] [REDIS_PORTS]
# REDIS_PORTS: the servers whose CPU and commands are counted (space-separated; default the
# standalone one). LOAD (env) as for drive.
run_load() {
  wants "$1" || return 0
  measure "$@"
}
# Decisions the breaker's fallback made so far (a Redis call past timeout_ms counts as a failure;
# three open the breaker for open_ms), from the gateway's /metrics on ADMIN (env); -1 without.
fallbacks() {
  if [ -z "${ADMIN:-}" ]; then echo -1; return; fi
  python3 - "$ADMIN" <<'PY'
import sys, urllib.request
text = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=5).read().decode()
print(sum(int(float(line.split()[-1])) for line in text.splitlines()
          if line.startswith('tollgate_decision_duration_seconds_count{store="local_fallback"')))
PY
}
measure() { # as run_load, whatever ONLY says
  local id=$1 name=$2 url=$3 conns=$5 keys=${6:-0} key=${7:-} ports pids
  read -r -a ports <<<"${8:-$RP}"
  read -r -a pids <<<"$4" # the proxy's processes (NGINX: master and worker)
  # Warm up connections and caches.
  drive "$url" "$conns" "$keys" "$key" 1 >/dev/null 2>&1 || true
  local cpu0 r_cpu0 r_calls0 r_eval0 fb0
  cpu0=$(cpu_ticks "${pids[@]}"); r_cpu0=$(redis_cpu_us "${ports[@]}"); r_calls0=$(redis_calls "${ports[@]}")
  r_eval0=$(redis_evalsha "${ports[@]}"); fb0=$(fallbacks)
  local out
  out=$(drive "$url" "$conns" "$keys" "$key" "$SECONDS_PER" | grep '^JSON ' | sed 's/^JSON //')
  local cpu1 r_cpu1 r_calls1 r_eval1 fb1
  cpu1=$(cpu_ticks "${pids[@]}"); r_cpu1=$(redis_cpu_us "${ports[@]}"); r_calls1=$(redis_calls "${ports[@]}")
  r_eval1=$(redis_evalsha "${ports[@]}"); fb1=$(fallbacks)
  python3 - "$id" "$name" "$out" "$cpu0" "$cpu1" "$TICK" "$r_cpu0" "$r_cpu1" "$r_calls0" "$r_calls1" "$r_eval0" "$r_eval1" "${#ports[@]}" "$fb0" "$fb1" >> "$RESULTS" <<'PY'
import json, sys
(id_, name, out, cpu0, cpu1, tick, rc0, rc1, calls0, calls1, ev0, ev1, servers, fb0, fb1) = sys.argv[1:]
w = json.loads(out)
req = max(w["requests"], 1)
cpu_us = (int(cpu1) - int(cpu0)) / int(tick) * 1e6
redis_cpu = int(rc1) - int(rc0)
evals = int(ev1) - int(ev0)
row = {
    "id": id_, "name": name, "redis_servers": int(servers),
    "rps": w["requests"] / (w["duration_us"] / 1e6),
    "p50_us": w["p50_us"], "p99_us": w["p99_us"], "p999_us": w["p999_us"],
    "non2xx": w.get("non2xx", 0), "errors": w["errors"],
    "proxy_cpu_us": cpu_us / req,
    "redis_cpu_us": redis_cpu / req, "redis_cpu_total_us": redis_cpu,
    "redis_cmds": (int(calls1) - int(calls0)) / req,
    "evalsha_per_req": evals / req,
    "redis_decisions": w["requests"] if evals else 0,
}
# Decision rows (rls_load): OVER_LIMIT answers stand where wrk's non-2xx do; the driver's own
# CPU is kept to show what the client cost.
if "over_limit" in w:
    row["non2xx"] = w["over_limit"]
    row.update({"ok": w["ok"], "over_limit": w["over_limit"], "max_us": w["max_us"],
                "connections": w["connections"], "descriptors": w["descriptors"]})
    if w.get("driver_cpu_us") is not None:
        row["driver_cpu_us"] = w["driver_cpu_us"] / req
if int(fb0) >= 0:
    row["fallback"] = int(fb1) - int(fb0)
print(json.dumps(row))
PY
  echo "  $id: $name done" >&2
}

# start_gateway CONFIG -> sets GW_PID
start_gateway() {
  "$BIN" --config "$1" 2>"$1.log" & GW_PID=$!
  PIDS+=("$GW_PID")
  wait_port "$2"
}
stop_gateway() { kill "$GW_PID" 2>/dev/null || true; wait "$GW_PID" 2>/dev/null || true; }

echo "== scenarios (${SECONDS_PER}s each)" >&2
UP_PID=$(cat "$WORK/nginx-up/pid"); UP_PROCS=$(nginx_procs "$UP_PID")
run_load a "a. upstream direct (NGINX return 200)" "http://127.0.0.1:$UP/" "$UP_PROCS" "$CONNS"
run_load b "b. NGINX proxy_pass (reference proxy)" "http://127.0.0.1:$REF/" "$REF_PROCS" "$CONNS"
run_load bl "bl. NGINX proxy_pass + limit_req, allowed (reference for d)" "http://127.0.0.1:$REF_LIMIT/" "$REF_PROCS" "$CONNS"

scenario() { # id name store limits conns keys key [redis ports]
  wants "$1" || return 0
  local id=$1 name=$2 store=$3 limits=$4 conns=$5 keys=${6:-0} key=${7:-} ports=${8:-$RP}
  local port admin cfg
  port=$(free_port); admin=$(free_port); cfg="$WORK/$id.yaml"
  gateway_config "$cfg" "$store" "$limits" "$port" "$admin"
  start_gateway "$cfg" "$port"
  if [ "$id" = "h" ]; then
    # Let the breaker open first.
    KEYS=0 wrk -t1 -c4 -d1s -s bench/wrk.lua "http://127.0.0.1:$port/" >/dev/null 2>&1 || true
  fi
  run_load "$id" "$name" "http://127.0.0.1:$port/" "$GW_PID" "$conns" "$keys" "$key" "$ports"
  stop_gateway
}
scenario c "c. Tollgate, route without limits" "$MEM" "[]" "$CONNS"
scenario d "d. memory store, 1 limit, allowed" "$MEM" "$ONE" "$CONNS"
scenario e "e. Redis, 3 limits, 10k keys, allowed" "$REDIS" "$THREE" "$CONNS" 10000
scenario f "f. Redis, one key far over its limit" "$REDIS" "$HOT" "$CONNS" 0 hot
scenario g "g. Redis + 5 ms latency (relay)" "$REDIS_SLOW" "$THREE" "$CONNS" 10000
scenario h "h. Redis down (breaker open, local)" "$REDIS_DOWN" "$THREE" "$CONNS" 10000
scenario cm "c at moderate load (wrk -c4)" "$MEM" "[]" 4
scenario em "e at moderate load (wrk -c4)" "$REDIS" "$THREE" 4 10000
CP="${CLUSTER_PORTS[*]+"${CLUSTER_PORTS[*]}"}"
scenario ec "ec. Redis Cluster, 3 limits, 10k keys, allowed" "$REDIS_CLUSTER" "$THREE" "$CONNS" 10000 "" "$CP"
scenario fc "fc. Redis Cluster, one key far over its limit" "$REDIS_CLUSTER" "$HOT" "$CONNS" 0 hot "$CP"
scenario emc "ec at moderate load (wrk -c4)" "$REDIS_CLUSTER" "$THREE" 4 10000 "" "$CP"

# --- TLS and HTTP/2 (t, hs, h2, h2c; NGINX counterparts tn, hsn, h2n, h2cn) ---
# Both proxies: one ECDSA P-256 certificate made here, one worker, the route of d (one memory
# limit that always allows) for the gateway, proxy_pass with a keepalive pool for NGINX, and
# HTTP/1.1 to the upstream.
pair() { wants "$1" || wants "$2"; } # a Tollgate row and its NGINX row run together
if pair t tn || pair hs hsn || pair h2 h2n || pair h2c h2cn; then
  TLS_CERT="$WORK/tls/cert.pem"; TLS_KEY="$WORK/tls/key.pem"
  mkdir -p "$WORK/tls" "$WORK/nginx-tls"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -subj /CN=localhost -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
    -keyout "$TLS_KEY" -out "$TLS_CERT" 2>/dev/null
  NT_H1=$(free_port); NT_H2=$(free_port); NT_H2C=$(free_port)
  cat > "$WORK/nginx-tls/nginx.conf" <<CONF
worker_processes 1; daemon off; pid $WORK/nginx-tls/pid; error_log stderr error;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  upstream up { server 127.0.0.1:$UP; keepalive 128; }
  ssl_certificate $TLS_CERT; ssl_certificate_key $TLS_KEY; ssl_protocols TLSv1.2 TLSv1.3;
  server { listen 127.0.0.1:$NT_H1 ssl; listen 127.0.0.1:$NT_H2 ssl http2; listen 127.0.0.1:$NT_H2C http2;
    location / { proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection ""; } } }
CONF
  "$NGINX" -p "$WORK/nginx-tls" -c "$WORK/nginx-tls/nginx.conf" 2>/dev/null & PIDS+=($!)
  wait_port "$NT_H1"; wait_port "$NT_H2"; wait_port "$NT_H2C"
  NT_PID=$(cat "$WORK/nginx-tls/pid"); NT_WORKER=$(nginx_procs "$NT_PID")
fi
# proto_scenario ID NAME LISTENER LOAD: the gateway with a TLS listener (LISTENER=tls) or a
# plain one with server.h2c (LISTENER=h2c), driven with LOAD (see drive).
proto_scenario() {
  local id=$1 name=$2 listener=$3 load=$4 port admin cfg listen server scheme
  port=$(free_port); admin=$(free_port); cfg="$WORK/$id.yaml"
  if [ "$listener" = tls ]; then
    listen="[ { address: \"127.0.0.1:$port\", tls: { certs: [ { cert: \"$TLS_CERT\", key: \"$TLS_KEY\" } ] } } ]"
    server="{ threads: 1 }"; scheme=https
  else
    listen="[\"127.0.0.1:$port\"]"; server="{ threads: 1, h2c: true }"; scheme=http
  fi
  gateway_config "$cfg" "$MEM" "$ONE" "$port" "$admin" "$listen" "$server"
  start_gateway "$cfg" "$port"
  LOAD=$load measure "$id" "$name" "$scheme://127.0.0.1:$port/" "$GW_PID" "$CONNS"
  stop_gateway
}
if pair t tn; then
  proto_scenario t "t. Tollgate TLS, HTTP/1.1 keep-alive" tls h1
  LOAD=h1 measure tn "tn. NGINX listen ssl, HTTP/1.1 keep-alive" "https://127.0.0.1:$NT_H1/" "$NT_WORKER" "$CONNS"
fi
if pair hs hsn; then
  proto_scenario hs "hs. Tollgate TLS, new handshake per request" tls close
  LOAD=close measure hsn "hsn. NGINX ssl, new handshake per request" "https://127.0.0.1:$NT_H1/" "$NT_WORKER" "$CONNS"
fi
if pair h2 h2n; then
  proto_scenario h2 "h2. Tollgate TLS, HTTP/2 (h2load -m10)" tls h2
  LOAD=h2 measure h2n "h2n. NGINX ssl http2, HTTP/2 (h2load -m10)" "https://127.0.0.1:$NT_H2/" "$NT_WORKER" "$CONNS"
fi
if pair h2c h2cn; then
  proto_scenario h2c "h2c. Tollgate h2c prior knowledge (h2load -m10)" h2c h2
  LOAD=h2 measure h2cn "h2cn. NGINX http2 plain, h2c (h2load -m10)" "http://127.0.0.1:$NT_H2C/" "$NT_WORKER" "$CONNS"
fi

# --- the rate-limit service (rls, rlsr) next to the admin API's /v1/check (chk, chkr) ---
# One gateway config for all four: a domain `bench` with RLS_DESCRIPTORS value-less descriptors
# d0.. (own limits), and the route's limits keyed by header:x-d0.. for /v1/check, every limit
# far above the load (every decision allowed). The load is examples/rls_load.rs, a single-thread
# closed loop like wrk -t1, CONNS calls in flight, each a decision of RLS_DESCRIPTORS buckets
# drawn from 10k values each (built at the start).
RLS_DESCRIPTORS=3
RLS_KEYS=10000
if decision_rows; then
  RLS_LIMITS="["; RLS_TREE=""
  for i in $(seq 0 $((RLS_DESCRIPTORS - 1))); do
    RLS_LIMITS="$RLS_LIMITS{ name: d$i, key: [\"header:x-d$i\"], rate: \"1000000/s\", burst: 1000000 }, "
    RLS_TREE="$RLS_TREE        - { key: d$i, rate_limit: { rate: \"1000000/s\", burst: 1000000 } }
"
  done
  RLS_LIMITS="${RLS_LIMITS%, }]"
fi
wait_ready() { # ADMIN_PORT: until /ready answers 200 (the store connected)
  python3 - "$1" <<'PY'
import sys, time, urllib.request
for _ in range(200):
    try:
        if urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/ready", timeout=1).status == 200:
            sys.exit(0)
    except Exception:
        pass
    time.sleep(0.05)
sys.exit("the gateway never became ready")
PY
}
# rls_scenario ID NAME STORE LOAD [RLS_CONNECTIONS]: LOAD rls (gRPC to rls.listen) or check
# (POST /v1/check on the admin listener).
rls_scenario() {
  wants "$1" || return 0
  local id=$1 name=$2 store=$3 load=$4 conns=${5:-1} port admin rls cfg target
  port=$(free_port); admin=$(free_port); rls=$(free_port); cfg="$WORK/$id.yaml"
  gateway_config "$cfg" "$store" "$RLS_LIMITS" "$port" "$admin" "" "" "rls:
  listen: \"127.0.0.1:$rls\"
  domains:
    - domain: bench
      descriptors:
$RLS_TREE"
  start_gateway "$cfg" "$port"
  wait_port "$rls"; wait_ready "$admin"
  if [ "$load" = rls ]; then target="127.0.0.1:$rls"; else target="http://127.0.0.1:$admin/v1/check"; fi
  ADMIN=$admin RLS_CONNECTIONS=$conns LOAD=$load measure "$id" "$name" "$target" "$GW_PID" "$CONNS" "$RLS_KEYS"
  stop_gateway
}
rls_scenario rls "rls. RLS gRPC, memory, 3 descriptors" "$MEM" rls "$CONNS"
rls_scenario rls1 "rls1. as rls, one HTTP/2 connection (ghz default)" "$MEM" rls 1
rls_scenario chk "chk. /v1/check HTTP/1.1, memory, 3 limits" "$MEM" check
rls_scenario rlsr "rlsr. RLS gRPC, Redis, 3 descriptors" "$REDIS" rls "$CONNS"
rls_scenario chkr "chkr. /v1/check HTTP/1.1, Redis, 3 limits" "$REDIS" check

DATE=$(date -u +%Y-%m-%d)
SUFFIX=""
if [ -n "${ONLY:-}" ]; then
  read -r -a only <<<"$ONLY"
  SUFFIX="-only-$(IFS=-; echo "${only[*]}")"
fi
# TAG=before: a label for this run's files (two binaries compared with TOLLGATE_BIN, say).
SUFFIX="$SUFFIX${TAG:+-$TAG}"
[ "$QUICK" = 1 ] && SUFFIX="$SUFFIX-quick" # ignored by git
OUT_MD="bench/results/$DATE$SUFFIX.md"
OUT_SVG="bench/results/$DATE$SUFFIX.svg"
python3 bench/report.py "$RESULTS" "$OUT_MD" "$OUT_SVG"
cp "$RESULTS" "bench/results/$DATE$SUFFIX.jsonl"
echo "wrote $OUT_MD and $OUT_SVG" >&2
