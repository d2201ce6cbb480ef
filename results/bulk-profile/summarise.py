#!/usr/bin/env python3
"""Medians and paired ratios (datapath / other, same round) of rounds.sh output."""
import sys, statistics, collections
runs = collections.defaultdict(dict)
for line in open(sys.argv[1]):
    f = line.split()
    if len(f) >= 4:
        runs[int(f[0])][f[1]] = float(f[3])
modes = sorted({m for r in runs.values() for m in r})
for m in modes:
    v = [r[m] for r in runs.values() if m in r]
    print(f"{m:>10}: median {statistics.median(v):6.2f} Gbit/s  mean {statistics.mean(v):6.2f}  n={len(v)}  min {min(v):.2f} max {max(v):.2f}")
base = sys.argv[2] if len(sys.argv) > 2 else "datapath"
for m in modes:
    if m == base: continue
    ratios = [r[base] / r[m] for r in runs.values() if base in r and m in r]
    print(f"{base}/{m} per round: median {statistics.median(ratios):.3f}  geo-mean {statistics.geometric_mean(ratios):.3f}  ({' '.join(f'{x:.2f}' for x in ratios)})")
