#!/usr/bin/env python3
"""Top leaf symbols (ms per GB) of one category of classify.py, per mode.
Usage: leaves.py OUT[,OUT...] CATEGORY_SUBSTRING MODE...  (TOP=n: how many, 15)"""
import os, sys
from classify import classify, per_gb

outs, cat, modes = sys.argv[1], sys.argv[2], sys.argv[3:]

def count(c, comm, pid, frames, pids):
    if pid in pids and cat in classify(frames):
        c[frames[0] if frames else "?"] += 1

res, gbs, _ = per_gb(outs, modes, count)
top = int(os.environ.get("TOP", "15"))
keys = sorted({k for c in res.values() for k in c},
              key=lambda k: -sum(res[m][k] / gbs[m] for m in modes))[:top]
print(f"| {'leaf symbol':<45} | " + " | ".join(f"{m:>9}" for m in modes) + " |")
for k in keys:
    print(f"| {k[:45]:<45} | " + " | ".join(f"{res[m][k]/gbs[m]:9.2f}" for m in modes) + " |")
