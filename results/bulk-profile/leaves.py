#!/usr/bin/env python3
"""Top leaf symbols (ms per GB) of one category of classify.py, per mode.
Usage: leaves.py OUT[,OUT...] CATEGORY_SUBSTRING MODE..."""
import sys, collections, json
sys.argv, args = [sys.argv[0]], sys.argv[1:]
exec(open(__file__.replace("leaves.py", "classify.py")).read().replace("\nmain()\n", "\n"))
outs, cat, modes = args[0], args[1], args[2:]
res, gbs = {}, {}
for mode in modes:
    c = collections.Counter(); gb = 0
    for prefix in outs.split(","):
        srv, cli = (int(p) for p in open(f"{prefix}-{mode}.pids").read().split())
        gb += json.load(open(f"{prefix}-{mode}.json"))["end"]["sum_received"]["bytes"] / 1e9
        for comm, pid, frames in samples(f"{prefix}-{mode}.data", {srv, cli}):
            if pid in (srv, cli) and cat in classify(frames):
                c[frames[0] if frames else "?"] += 1
    res[mode], gbs[mode] = c, gb
keys = sorted({k for c in res.values() for k in c}, key=lambda k: -sum(res[m][k] / gbs[m] for m in modes))[:int(__import__("os").environ.get("TOP", "15"))]
print(f"| {'leaf symbol':<45} | " + " | ".join(f"{m:>9}" for m in modes) + " |")
for k in keys:
    print(f"| {k[:45]:<45} | " + " | ".join(f"{res[m][k]/gbs[m]:9.2f}" for m in modes) + " |")
