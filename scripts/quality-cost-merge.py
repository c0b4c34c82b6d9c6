#!/usr/bin/env python3
"""Puts step times measured in their own runs into retro-eval results.

`gpu E2E.jsonl DEVICE QUALITY.json...`: the GPU step times of scripts/gpu/quality-cost.sh (e2e.jsonl rows) into retro-eval results:
each record of docs/results/quality_<model>.json whose (policy, budget, window) was measured gets
`step_ms_gpu_b1` / `step_ms_gpu_b8` (the random-weight Llama-3.1-8B shape, so the same times go into
every model's file) and the file gets `gpu_cost` saying where they came from.

`cpu COST.json QUALITY.json`: the CPU step times of a `retro-eval --no-forced --cost-steps N` run
(same model, grid and --decode-steps, on a quiet machine) into the quality run's records.

Usage: scripts/quality-cost-merge.py gpu E2E.jsonl DEVICE docs/results/quality_<model>.json [...]
       scripts/quality-cost-merge.py cpu COST.json docs/results/quality_<model>.json
"""
import json
import sys


def point(rec):
    return (rec["policy"], round(rec["budget"], 6), rec["window"], rec.get("refresh_every"))


def save(path, d):
    with open(path, "w") as f:
        json.dump(d, f, indent=2)
        f.write("\n")


def merge_cpu(cost_path, path):
    cost = json.load(open(cost_path))
    times = {point(r): r["step_ms_cpu"] for r in cost["records"] if r.get("step_ms_cpu") is not None}
    d = json.load(open(path))
    if cost.get("model") != d.get("model"):
        sys.exit(f"{cost_path} measured {cost.get('model')}, {path} {d.get('model')}")
    n = 0
    for rec in d["records"]:
        if point(rec) in times:  # points the cost run did not measure keep their time
            rec["step_ms_cpu"] = times[point(rec)]
            n += 1
    run = {k: cost.get(k) for k in ("command", "cost_steps", "cost_context", "machine", "phase_seconds")}
    d["cpu_cost"] = [r for r in d.get("cpu_cost", []) if r.get("command") != run["command"]] + [run]
    save(path, d)
    print(f"{path}: {n} CPU step times of {len(d['records'])} records")


def main():
    if sys.argv[1] == "cpu":
        return merge_cpu(sys.argv[2], sys.argv[3])
    if sys.argv[1] != "gpu":
        sys.exit(__doc__)
    rows = [json.loads(l) for l in open(sys.argv[2]) if l.strip()]
    device = sys.argv[3]
    times = {}
    for r in rows:
        if r.get("errors") or not r.get("ms"):
            continue
        budget = 1.0 if r["policy"] == "full" else r.get("budget_ratio")
        if budget is None:
            continue
        window = r["window"] if r["policy"] == "retro" else 1
        times.setdefault((r["policy"], round(budget, 6), window, r["batch"]), []).append(r["ms"])
    for path in sys.argv[4:]:
        d = json.load(open(path))
        n = 0
        for rec in d["records"]:
            if rec.get("refresh_every"):
                continue  # the refresh runs on the CPU only
            key = (rec["policy"], round(rec["budget"], 6), rec["window"])
            for b in (1, 8):
                runs = times.get(key + (b,))
                # A point measured more than once (a repeat to see the noise): the mean.
                ms = sum(runs) / len(runs) if runs else None
                rec[f"step_ms_gpu_b{b}"] = ms
                n += ms is not None
        d["gpu_cost"] = {"device": device, "model": "random bf16 weights, Llama-3.1-8B shape",
                         "how": "scripts/gpu/quality-cost.sh: b1 at 32K context, b8 at 16K (requests sent together)",
                         "rows": [r for r in rows if not r.get("errors")]}
        save(path, d)
        print(f"{path}: {n} GPU step times")


if __name__ == "__main__":
    main()
