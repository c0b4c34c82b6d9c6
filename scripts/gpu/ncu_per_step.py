#!/usr/bin/env python3
"""Kernel launches and GPU time per decode step, by policy and kernel, from the ncu logs that
scripts/gpu/ncu-launches.sh writes (ncu-POLICY-T.csv.xz for T = 1 and 33 generated tokens: their
difference is 32 decode steps). Usage: python3 scripts/gpu/ncu_per_step.py DIR [BASE OTHER]"""
import collections
import csv
import io
import lzma
import pathlib
import sys

STEPS = 32


def load(path):
    lines = [l for l in lzma.open(path, "rt").read().splitlines() if l.startswith('"')]
    count, micros = collections.Counter(), collections.Counter()
    for row in csv.DictReader(io.StringIO("\n".join(lines))):
        name = row["Kernel Name"].split("<")[0].split("(")[0]
        count[name] += 1
        micros[name] += float(row["Metric Value"].replace(",", "")) / 1000
    return count, micros


def per_step(folder, policy):
    c1, t1 = load(folder / f"ncu-{policy}-1.csv.xz")
    c33, t33 = load(folder / f"ncu-{policy}-33.csv.xz")
    return {k: ((c33[k] - c1[k]) / STEPS, (t33[k] - t1[k]) / STEPS) for k in set(c1) | set(c33)}


folder = pathlib.Path(sys.argv[1])
base, other = (sys.argv[2], sys.argv[3]) if len(sys.argv) > 3 else ("quest", "retro2")
for policy in ("full", "quest", "retro2"):
    p = per_step(folder, policy)
    print(f"{policy}: {sum(c for c, _ in p.values()):.0f} launches, {sum(t for _, t in p.values()):.0f} us of GPU time per decode step")
a, b = per_step(folder, base), per_step(folder, other)
print(f"\nkernel | {base} launches, us | {other} launches, us | delta us")
for k in sorted(set(a) | set(b), key=lambda k: -(b.get(k, (0, 0))[1] - a.get(k, (0, 0))[1])):
    (ca, ta), (cb, tb) = a.get(k, (0, 0)), b.get(k, (0, 0))
    if abs(tb - ta) > 3 or ca != cb:
        print(f"{k} | {ca:.1f}, {ta:.1f} | {cb:.1f}, {tb:.1f} | {tb - ta:+.1f}")
