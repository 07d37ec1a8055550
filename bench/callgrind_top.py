#!/usr/bin/env python3
"""Self and inclusive Ir per function from a callgrind dump (callgrind's own file format).

callgrind_annotate 3.19 put the whole self cost of a dump taken after `callgrind_control
--zero` on `clone`; this reads the dump directly: a cost line after `calls=` is the inclusive
cost of that call (added to the caller's inclusive cost), any other cost line is self cost of
the current function. Recursive calls (callee == caller) are not added twice.

usage: callgrind_top.py DUMP [N]  -> JSON {"total": Ir, "functions": [[name, self, inclusive], ...]}
(the N largest by self and the N largest by inclusive, merged, every tollgate:: and fred::
one), and "mem_callers": the functions calling memcpy/memmove/memset, by the Ir of those calls.
"""
import json
import re
import sys


MEM = re.compile(r"__mem(cpy|move|set)_")


def parse(path):
    names = {"fn": {}}
    self_cost, incl_calls, mem_callers = {}, {}, {}
    fn = None
    cfn = None
    after_calls = False
    total = 0
    name_re = re.compile(r"^\((\d+)\)(?:\s+(.*))?$")

    def resolve(value):
        m = name_re.match(value)
        if not m:
            return value
        if m.group(2) is not None:
            names["fn"][m.group(1)] = m.group(2)
            return m.group(2)
        return names["fn"].get(m.group(1), value)

    with open(path, errors="replace") as f:
        for line in f:
            if not line or line == "\n":
                continue
            c = line[0]
            if c.isdigit() or c in "+-*":
                parts = line.split()
                ir = int(parts[1]) if len(parts) > 1 else 0
                if after_calls:
                    if cfn != fn:
                        incl_calls[fn] = incl_calls.get(fn, 0) + ir
                    if cfn and MEM.search(cfn):
                        mem_callers[fn] = mem_callers.get(fn, 0) + ir
                    after_calls = False
                else:
                    self_cost[fn] = self_cost.get(fn, 0) + ir
                continue
            if line.startswith("fn="):
                fn = resolve(line[3:].strip())
            elif line.startswith("cfn="):
                cfn = resolve(line[4:].strip())
            elif line.startswith("calls="):
                after_calls = True
            elif line.startswith("summary:") or line.startswith("totals:"):
                total = int(line.split()[1])
    incl = {k: self_cost.get(k, 0) + incl_calls.get(k, 0) for k in set(self_cost) | set(incl_calls)}
    return total or sum(self_cost.values()), self_cost, incl, mem_callers


def main():
    total, self_cost, incl, mem_callers = parse(sys.argv[1])
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 60
    keep = set(sorted(self_cost, key=lambda k: -self_cost[k])[:n])
    keep |= set(sorted(incl, key=lambda k: -incl[k])[:n])
    keep |= {k for k in incl if re.search(r"(^|[<\s:])(tollgate|fred)::", k or "")}
    funcs = [[k, self_cost.get(k, 0), incl.get(k, 0)] for k in keep]
    funcs.sort(key=lambda r: -r[2])
    callers = sorted(mem_callers.items(), key=lambda kv: -kv[1])[:12]
    print(json.dumps({"total": total, "functions": funcs, "mem_callers": callers}))


if __name__ == "__main__":
    main()
