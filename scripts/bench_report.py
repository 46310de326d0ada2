#!/usr/bin/env python3
"""Replaces a generated section of BENCHMARKS.md with a new table (atomically).

Usage: bench_report.py TABLE.md TARGET.md [NAME [TITLE]]
The section lies between <!-- NAME:begin --> and <!-- NAME:end --> (NAME:
bench by default); a missing one is appended under `## TITLE`."""
import os, sys

table, target = sys.argv[1], sys.argv[2]
name = sys.argv[3] if len(sys.argv) > 3 else "bench"
title = sys.argv[4] if len(sys.argv) > 4 else None
BEGIN, END = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
if not os.path.exists(table):
    # bench.py --only writes no table (a partial run must not replace the full one).
    print(f"no {table} (a partial run with --only?): {target} left as it is")
    sys.exit(0)
body = open(table).read().strip()
doc = open(target).read() if os.path.exists(target) else f"# Benchmarks\n\n{BEGIN}\n{END}\n"
if BEGIN not in doc:
    doc += (f"\n## {title}\n" if title else "") + f"\n{BEGIN}\n{END}\n"
head, rest = doc.split(BEGIN, 1)
tail = rest.split(END, 1)[1] if END in rest else ""
tmp = target + ".tmp"
with open(tmp, "w") as f:
    f.write(f"{head}{BEGIN}\n{body}\n{END}{tail}")
os.replace(tmp, target)
print(f"updated {target}")
