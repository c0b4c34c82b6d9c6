#!/usr/bin/env python3
"""Prints the Markdown tables of docs/quality.md from a retro-eval results file
(standard library only): `python3 docs/quality_table.py [docs/results/quality_<model>.json]` (default: the SmolLM2 grid)."""
import json
import pathlib
import sys

src = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else pathlib.Path(__file__).resolve().parent / "results" / "quality_smollm2-135m-instruct-f32.json"
d = json.loads(src.read_text())
recs = d["records"]


def f(x, n=4):
    return "–" if x is None else f"{x:.{n}f}"


def pm(m, s, n=4):
    return "–" if m is None else (f"{m:.{n}f} ± {s:.{n}f}" if s is not None else f"{m:.{n}f}")


quest = {r["budget"]: r for r in recs if r["policy"] == "quest"}
def name(r):
    every = r.get("refresh_every")
    return f"{r['policy']} (N = {every})" if every else r["policy"]


print("| policy | budget | w | KL(full‖policy) mean ± sd over segments | gap closed vs quest | perplexity ± sd | top-1 = full | agree tokens | agree answers | exposure | reads vs quest |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
order = {"full": 0, "quest": 1, "quest-oracle-kv": 2, "retro": 3, "retro-refresh": 4}
for r in sorted(recs, key=lambda r: (r["budget"] if r["policy"] != "full" else -1, order.get(r["policy"], 9), r["window"])):
    q = quest.get(r["budget"])
    gap = "–"
    if r["policy"] != "quest" and q and q["kl_mean"] and r["kl_mean"] is not None and r["policy"] != "full":
        gap = f"{100 * (1 - r['kl_mean'] / q['kl_mean']):+.1f}%"
    budget = "100%" if r["policy"] == "full" else f"{r['budget']:.0%}"
    print(
        f"| {name(r)} | {budget} | {r['window']} | {pm(r['kl_mean'], r['kl_std'])} | {gap} | {pm(r['ppl'], r['ppl_std'], 2)} "
        f"| {f(r['top1_agree'], 3)} | {r['agree_tokens'] if r['agree_tokens'] is not None else '–'} | {f(r['agree_answers'], 2)} | {f(r['exposure'], 3)} "
        f"| {f(r.get('reads_vs_quest'), 2)} |"
    )
print()
print("Per-segment mean KL (segments of the forced steps, in order):")
print()
print("| policy | budget | w | " + " | ".join(f"seg {i + 1}" for i in range(d["segments"])) + " |")
print("|---|---:|---:|" + "---:|" * d["segments"])
for r in sorted(recs, key=lambda r: (r["budget"], order.get(r["policy"], 9), r["window"])):
    if r["policy"] == "full":
        continue
    print(f"| {name(r)} | {r['budget']:.0%} | {r['window']} | " + " | ".join(f"{x:.4f}" for x in r["kl_segments"]) + " |")
print()
print("Phase wall times (s):", ", ".join(f"{p['phase']} {p['seconds']:.0f}" for p in d["phase_seconds"]), f"; total {d['total_seconds']:.0f} s")
