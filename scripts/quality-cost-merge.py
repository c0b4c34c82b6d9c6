#!/usr/bin/env python3
"""Puts the GPU step times of scripts/gpu/quality-cost.sh (e2e.jsonl rows) into retro-eval results:
each record of docs/results/quality_<model>.json whose (policy, budget, window) was measured gets
`step_ms_gpu_b1` / `step_ms_gpu_b8` (the random-weight Llama-3.1-8B shape, so the same times go into
every model's file) and the file gets `gpu_cost` saying where they came from.

Usage: scripts/quality-cost-merge.py E2E.jsonl DEVICE docs/results/quality_<model>.json [...]
"""
import json
import sys


def main():
    rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
    device = sys.argv[2]
    times = {}
    for r in rows:
        if r.get("errors") or not r.get("ms"):
            continue
        budget = 1.0 if r["policy"] == "full" else r.get("budget_ratio")
        if budget is None:
            continue
        window = r["window"] if r["policy"] == "retro" else 1
        times[(r["policy"], round(budget, 6), window, r["batch"])] = r["ms"]
    for path in sys.argv[3:]:
        d = json.load(open(path))
        n = 0
        for rec in d["records"]:
            if rec.get("refresh_every"):
                continue  # the refresh runs on the CPU only
            key = (rec["policy"], round(rec["budget"], 6), rec["window"])
            for b in (1, 8):
                ms = times.get(key + (b,))
                rec[f"step_ms_gpu_b{b}"] = ms
                n += ms is not None
        d["gpu_cost"] = {"device": device, "model": "random bf16 weights, Llama-3.1-8B shape", "context": 32768,
                         "batches": [1, 8], "how": "scripts/gpu/quality-cost.sh, requests sent together"}
        json.dump(d, open(path, "w"), indent=2)
        open(path, "a").write("\n")
        print(f"{path}: {n} GPU step times")


if __name__ == "__main__":
    main()
