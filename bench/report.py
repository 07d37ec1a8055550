#!/usr/bin/env python3
"""Turns the benchmark's JSON lines into a Markdown table and an SVG chart.

usage: report.py RESULTS.jsonl OUT.md OUT.svg
"""
import json
import sys
from datetime import datetime, timezone


def load(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def fmt(v, digits=1):
    return "-" if v is None else f"{v:,.{digits}f}"


def table(rows, meta):
    by = {r["id"]: r for r in rows}
    out = []
    out.append(f"# Tollgate benchmark, {meta['date']}\n")
    out.append(f"Machine: {meta['machine']}. Load: wrk {meta['wrk']}, {meta['seconds']} s per scenario, "
               "loopback; wrk, NGINX, Redis and the gateway share the machine's cores.\n")
    out.append("| scenario | req/s | p50 ms | p99 ms | p99.9 ms | non-2xx | proxy CPU us/req | Redis CPU us/req | Redis cmds/req | EVALSHA/req |")
    out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        out.append("| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |".format(
            r["name"], fmt(r["rps"], 0), fmt(r["p50_us"] / 1000, 2), fmt(r["p99_us"] / 1000, 2),
            fmt(r["p999_us"] / 1000, 2), r["non2xx"], fmt(r.get("proxy_cpu_us")),
            fmt(r.get("redis_cpu_us")), fmt(r.get("redis_cmds"), 3),
            fmt(r.get("evalsha_per_req"), 3)))
    out.append("")

    def ratio(a, b):
        if a in by and b in by and by[b]["rps"]:
            return by[a]["rps"] / by[b]["rps"]
        return None

    def cpu(i):
        return by[i].get("proxy_cpu_us") if i in by else None

    def cpu_ratio(a, b):
        x, y = cpu(a), cpu(b)
        return None if x is None or not y else x / y

    checks = []
    # Issue 14: CPU per request toward the Pingora floor, as ratios within one run.
    c_b = cpu_ratio("c", "b")
    if c_b is not None:
        checks.append(("CPU/req c/b, Tollgate without limits vs NGINX proxy_pass (target <= 1.5)", fmt(c_b, 3), c_b <= 1.5))
    d_c = cpu_ratio("d", "c")
    if d_c is not None:
        checks.append(("CPU/req d/c, one memory limit vs none (target <= 1.10)", fmt(d_c, 3), d_c <= 1.10))
    e_c = cpu_ratio("e", "c")
    if e_c is not None:
        checks.append(("gateway CPU/req e/c, Redis 3 limits vs none (target <= 1.25)", fmt(e_c, 3), e_c <= 1.25))
    if "e" in by and by["e"].get("redis_cpu_us") is not None:
        v = by["e"]["redis_cpu_us"]
        checks.append(("Redis CPU us/req in e (target <= 8)", fmt(v), v <= 8))
    if "e" in by and by["e"].get("evalsha_per_req") is not None:
        v = by["e"]["evalsha_per_req"]
        checks.append(("Redis calls per allowed request in e (target <= 1)", fmt(v, 3), v <= 1))
    if "f" in by and by["f"].get("evalsha_per_req") is not None:
        v = by["f"]["evalsha_per_req"]
        checks.append(("Redis calls per denied request in f (target <= 0.05)", fmt(v, 4), v <= 0.05))
    if "cm" in by and "em" in by:
        d = (by["em"]["p99_us"] - by["cm"]["p99_us"]) / 1000
        checks.append(("p99(e) - p99(c) at moderate load (target <= 1 ms)", fmt(d, 2) + " ms", d <= 1))
    # Redis Cluster (3 masters; Redis CPU and calls summed over them), next to standalone.
    ec_e = ratio("ec", "e")
    if ec_e is not None:
        checks.append(("ec/e throughput, Cluster vs standalone (target close to 1)", fmt(ec_e, 2), ec_e >= 0.8))
    if "ec" in by and by["ec"].get("redis_cpu_us") is not None and by["ec"].get("redis_decisions"):
        per = by["ec"]["redis_cpu_total_us"] / by["ec"]["redis_decisions"]
        checks.append(("Redis CPU per decision in ec, 3 masters (target <= 10 us)", fmt(per), per <= 10))
    if "ec" in by and by["ec"].get("evalsha_per_req") is not None:
        v = by["ec"]["evalsha_per_req"]
        checks.append(("Redis calls per allowed request in ec (target <= 1)", fmt(v, 3), v <= 1))
    if "fc" in by and by["fc"].get("evalsha_per_req") is not None:
        v = by["fc"]["evalsha_per_req"]
        checks.append(("Redis calls per denied request in fc (target <= 0.05)", fmt(v, 4), v <= 0.05))
    if "cm" in by and "emc" in by:
        d = (by["emc"]["p99_us"] - by["cm"]["p99_us"]) / 1000
        checks.append(("p99(ec) - p99(c) at moderate load (target <= 1 ms)", fmt(d, 2) + " ms", d <= 1))
    h_d = ratio("h", "d")
    if h_d is not None:
        checks.append(("h/d throughput, Redis down vs memory (target close to 1)", fmt(h_d, 2), h_d >= 0.8))
    # TLS and HTTP/2: each Tollgate row next to NGINX doing the same (same certificate, same
    # client, one worker each).
    pairs = [("t", "tn", "TLS, HTTP/1.1 keep-alive"), ("hs", "hsn", "TLS, new handshake per request"),
             ("h2", "h2n", "HTTP/2 over TLS"), ("h2c", "h2cn", "h2c prior knowledge")]
    pairs = [(a, b, what) for a, b, what in pairs if a in by and b in by]
    if pairs:
        def quot(x, y):
            return None if x is None or not y else x / y
        out.append("| Tollgate / NGINX | req/s | p99 | proxy CPU/req |")
        out.append("|---|---:|---:|---:|")
        for a, b, what in pairs:
            ra, rb = by[a], by[b]
            out.append("| {} ({}/{}) | {} | {} | {} |".format(
                what, a, b, fmt(quot(ra["rps"], rb["rps"]), 2), fmt(quot(ra["p99_us"], rb["p99_us"]), 2),
                fmt(quot(ra.get("proxy_cpu_us"), rb.get("proxy_cpu_us")), 2)))
        out.append("")
    # Rate-limit decisions: the gRPC rate-limit service next to the admin API's /v1/check,
    # the same decision (3 buckets) over each, one driver (examples/rls_load.rs).
    dec = [by[i] for i in ("rls", "rls1", "chk", "rlsr", "chkr") if i in by]
    if dec:
        out.append("| decisions (examples/rls_load.rs) | decisions/s | p50 ms | p99 ms | max ms | OK | OVER_LIMIT | errors | by fallback | gateway CPU us/decision | Redis CPU us/decision | EVALSHA/decision | driver CPU us/decision |")
        out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in dec:
            fb = r.get("fallback")
            out.append("| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |".format(
                r["name"], fmt(r["rps"], 0), fmt(r["p50_us"] / 1000, 2), fmt(r["p99_us"] / 1000, 2),
                fmt(r.get("max_us", 0) / 1000, 2), f"{r.get('ok', 0):,}", f"{r.get('over_limit', 0):,}",
                f"{r['errors']:,}", "-" if fb is None else f"{fb:,}",
                fmt(r.get("proxy_cpu_us")), fmt(r.get("redis_cpu_us")),
                fmt(r.get("evalsha_per_req"), 3), fmt(r.get("driver_cpu_us"))))
        out.append("")
        dpairs = [(a, b, what) for a, b, what in
                  [("rls", "chk", "memory store"), ("rls1", "chk", "memory store, one HTTP/2 connection"),
                   ("rlsr", "chkr", "Redis store")] if a in by and b in by]
        if dpairs:
            def quot2(x, y):
                return None if x is None or not y else x / y
            out.append("| gRPC RLS / HTTP /v1/check | decisions/s | p99 | gateway CPU/decision |")
            out.append("|---|---:|---:|---:|")
            for a, b, what in dpairs:
                ra, rb = by[a], by[b]
                out.append("| {} ({}/{}) | {} | {} | {} |".format(
                    what, a, b, fmt(quot2(ra["rps"], rb["rps"]), 2), fmt(quot2(ra["p99_us"], rb["p99_us"]), 2),
                    fmt(quot2(ra.get("proxy_cpu_us"), rb.get("proxy_cpu_us")), 2)))
            out.append("")
    refs = []
    for a, b, what in [("c", "b", "Tollgate without limits / NGINX proxy_pass"),
                       ("d", "bl", "Tollgate, 1 memory limit / NGINX limit_req"),
                       ("bl", "b", "NGINX limit_req / NGINX proxy_pass"),
                       ("d", "b", "Tollgate, 1 memory limit / NGINX proxy_pass"),
                       ("e", "b", "Tollgate, Redis 3 limits / NGINX proxy_pass")]:
        if a in by and b in by:
            refs.append((f"{what} ({a}/{b})", cpu_ratio(a, b), ratio(a, b)))
    if refs:
        out.append("| CPU per request and throughput, as ratios | CPU/req | req/s |")
        out.append("|---|---:|---:|")
        for what, c_ratio, r_ratio in refs:
            out.append(f"| {what} | {fmt(c_ratio, 2)} | {fmt(r_ratio, 2)} |")
        out.append("")
    tput = [by[i] for i in ("b", "c", "e", "g", "h") if i in by]
    if any(r["id"] in ("e", "g", "h") for r in tput):
        out.append("Throughput (req/s; compare with the previous run): " + ", ".join(
            f"{r['id']} {fmt(r['rps'], 0)}" for r in tput) + ".\n")
    out.append("| target | measured | met |")
    out.append("|---|---:|:---:|")
    for name, value, ok in checks:
        out.append(f"| {name} | {value} | {'yes' if ok else 'no'} |")
    out.append("")
    out.append("Columns: proxy CPU is the user+system CPU of the proxy's processes divided by requests "
               "(NGINX rows a, b, bl, tn, hsn, h2n, h2cn: master and worker summed, the master idle; "
               "the gateway, all its threads, otherwise); bl is NGINX proxy_pass with one `limit_req` "
               "zone per client address that allows every request, the reference for d; Redis CPU and commands are deltas of "
               "`INFO cpu` and `INFO commandstats` (INFO itself excluded) divided by requests, "
               "summed over the 3 masters in the Cluster rows (ec, fc, emc); EVALSHA/req is the "
               "script calls alone. TLS and HTTP/2 rows (t, hs, h2, h2c and their NGINX "
               "counterparts tn, hsn, h2n, h2cn, proxy CPU from the NGINX master and worker): t with wrk over "
               "https; hs with wrk sending `Connection: close`, so req/s is new TLS connections "
               "(full handshakes, ECDSA P-256) per second and proxy CPU/req the cost of one "
               "handshake plus its request; h2 and h2c with `h2load -t1 -c32 -m10`, "
               "percentiles from its per-request log. Decision rows (rls, rls1, rlsr: `ShouldRateLimit` "
               "over gRPC to `rls.listen`; chk, chkr: `POST /v1/check` to the admin listener over "
               "HTTP/1.1 keep-alive): driven by `examples/rls_load.rs` (one thread, 32 calls in "
               "flight; rls, rlsr and chk over 32 connections, rls1 over one HTTP/2 connection), "
               "each call one decision of 3 buckets (3 descriptors, or 3 limits keyed "
               "`header:x-d0..2`) with values drawn from 10k each; req/s is decisions/s, non-2xx "
               "is OVER_LIMIT answers, CPU columns per decision; \"by fallback\" counts the decisions "
               "the breaker's local fallback made (a Redis call past `timeout_ms` 50 is a failure, "
               "three open the breaker for a second); driver CPU is the load driver's own.")
    return "\n".join(out) + "\n"


def svg(rows):
    width, left, bar_h, gap = 940, 340, 16, 10
    max_rps = max((r["rps"] for r in rows), default=1) or 1
    max_p99 = max((r["p99_us"] for r in rows), default=1) or 1
    height = 60 + len(rows) * (2 * bar_h + gap) + 20
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'font-family="sans-serif" font-size="12">',
             '<rect width="100%" height="100%" fill="white"/>',
             '<text x="10" y="20" font-size="15" font-weight="bold">Tollgate benchmark: throughput and p99 by scenario</text>',
             '<rect x="10" y="32" width="12" height="12" fill="#3b7dd8"/><text x="28" y="43">req/s</text>',
             '<rect x="90" y="32" width="12" height="12" fill="#e07b39"/><text x="108" y="43">p99 latency</text>']
    y = 60
    span = width - left - 120
    for r in rows:
        w1 = span * r["rps"] / max_rps
        w2 = span * r["p99_us"] / max_p99
        parts.append(f'<text x="10" y="{y + bar_h + 4}">{r["name"][:48]}</text>')
        parts.append(f'<rect x="{left}" y="{y}" width="{w1:.1f}" height="{bar_h}" fill="#3b7dd8"/>')
        parts.append(f'<text x="{left + w1 + 5:.1f}" y="{y + 12}">{r["rps"]:,.0f}/s</text>')
        parts.append(f'<rect x="{left}" y="{y + bar_h}" width="{w2:.1f}" height="{bar_h}" fill="#e07b39"/>')
        parts.append(f'<text x="{left + w2 + 5:.1f}" y="{y + bar_h + 12}">{r["p99_us"] / 1000:.2f} ms</text>')
        y += 2 * bar_h + gap
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def main():
    rows = load(sys.argv[1])
    meta = rows[0].get("meta", {}) if rows else {}
    rows = [r for r in rows if "id" in r]
    meta.setdefault("date", datetime.now(timezone.utc).strftime("%Y-%m-%d"))
    md = table(rows, meta)
    with open(sys.argv[2], "w") as f:
        f.write(md)
    with open(sys.argv[3], "w") as f:
        f.write(svg(rows))
    sys.stdout.write(md)


if __name__ == "__main__":
    main()
