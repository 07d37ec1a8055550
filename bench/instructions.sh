#!/usr/bin/env bash
# Instructions per request for scenarios c (no limits), d (memory, 1 limit) and e (Redis, 3
# limits over 10k keys), counted by callgrind: deterministic where CPU time is noisy, so a
# regression shows up as a number. The callgrind part of bench/profile.sh; prints the table and
# writes bench/results/<date>-instructions.md.
#
#   bash bench/instructions.sh            # c d e
#   bash bench/instructions.sh d          # just d
#   CG_REQUESTS=2000 bash bench/instructions.sh
#
# TOLLGATE_BIN=PATH counts that binary (default: the `profiling` build, see profile.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_MD="bench/results/$(date -u +%Y-%m-%d)-instructions.md"
INSTR_OUT="$OUT_MD" bash bench/profile.sh --callgrind "$@" >/dev/null
cat "$OUT_MD"
echo "wrote $OUT_MD" >&2
