#!/usr/bin/env python3
"""Quality against cost: KL(full || policy) of every (policy, budget, window) point of one or more
`retro-eval` results files against what a decode step costs (K/V bytes read, CPU step time, GPU
step time at batch 1 and 8), with the Pareto front marked; writes a picture and prints a Markdown
table per model.

Usage: docs/plot_quality_cost.py OUT.png docs/results/quality_<model>.json [...]
Not part of CI. Needs matplotlib (`python3 -m venv /tmp/plot && /tmp/plot/bin/pip install
matplotlib`).

"Gap closed at equal cost" compares a point with Quest at the same cost: Quest's KL is interpolated
linearly between the two Quest points whose cost brackets the point's (Quest's points sorted by
cost, each replaced by the best KL at that cost or less, so noise cannot make Quest look worse than
a cheaper Quest point). A point costlier than every Quest point and beaten by one of them is
"dominated"; otherwise, outside Quest's measured range, the cell is left empty.
"""
import json
import math
import pathlib
import sys

AXES = [
    ("kv_bytes_per_step", "K/V MB read per step", 1e-6),
    ("step_ms_cpu", "CPU step ms (batch 1)", 1.0),
    ("step_ms_gpu_b1", "GPU step ms (batch 1)", 1.0),
    ("step_ms_gpu_b8", "GPU step ms (batch 8)", 1.0),
]


def label(r):
    if r["policy"] == "full":
        return "full"
    name = "quest" if r["policy"] == "quest" else f"retro w={r['window']}"
    if r.get("refresh_every"):
        name += f" refresh {r['refresh_every']}"
    return name


def pareto(points):
    """Indices of points no other point beats on both cost and KL (lower is better on both)."""
    front = []
    for i, (c, k) in enumerate(points):
        dominated = any((c2 <= c and k2 <= k) and (c2 < c or k2 < k) for j, (c2, k2) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return front


def quest_kl_at(quest, cost):
    """Quest's KL at `cost` (see the module comment), or None outside its measured costs."""
    pts = sorted(quest)
    best, env = math.inf, []
    for c, k in pts:
        best = min(best, k)
        env.append((c, best))
    if not env or cost < env[0][0] or cost > env[-1][0]:
        return None
    for (c0, k0), (c1, k1) in zip(env, env[1:]):
        if c0 <= cost <= c1:
            return k0 if c1 == c0 else k0 + (k1 - k0) * (cost - c0) / (c1 - c0)
    return env[-1][1]


def table(records, model):
    quest_by_budget = {r["budget"]: r["kl_mean"] for r in records if r["policy"] == "quest"}
    print(f"\n#### {model}\n")
    heads = ["policy", "budget", "KL", "gap closed, same budget"] + [f"gap closed, equal {a[1]}" for a in AXES[:2]]
    heads += ["K/V MB/step", "CPU ms", "GPU ms b1", "GPU ms b8", "Pareto (bytes / CPU / GPU b1 / GPU b8)"]
    print("| " + " | ".join(heads) + " |")
    print("|" + "---|" * len(heads))
    fronts = {}
    for key, _, _ in AXES:
        pts = [(r[key], r["kl_mean"]) for r in records if r.get(key) is not None and r.get("kl_mean") is not None]
        idx = [i for i, r in enumerate(records) if r.get(key) is not None and r.get("kl_mean") is not None]
        fronts[key] = {idx[i] for i in pareto(pts)}
    for r in sorted(records, key=lambda r: (r["budget"], r["policy"] != "quest", label(r))):
        i = records.index(r)
        q = quest_by_budget.get(r["budget"])
        same = "–" if r["policy"] in ("full", "quest") or not q else f"{100 * (1 - r['kl_mean'] / q):+.1f}%"
        eq = []
        for key, _, _ in AXES[:2]:
            quest = [(x[key], x["kl_mean"]) for x in records if x["policy"] == "quest" and x.get(key) is not None]
            k = quest_kl_at(quest, r[key]) if r.get(key) is not None and r["policy"] not in ("full", "quest") else None
            # Costlier than every Quest point and beaten by one of them: nothing to interpolate.
            beaten = r.get(key) is not None and r["policy"] not in ("full", "quest") and quest and \
                r[key] > max(c for c, _ in quest) and any(kq < r["kl_mean"] for _, kq in quest)
            eq.append("dominated" if k is None and beaten else "–" if not k else f"{100 * (1 - r['kl_mean'] / k):+.1f}%")
        fmt = lambda v, s=1.0, d=1: "–" if v is None else f"{v * s:.{d}f}"
        front = " / ".join("yes" if i in fronts[key] else ("–" if r.get(key) is None else "no") for key, _, _ in AXES)
        print(f"| {label(r)} | {100 * r['budget']:.4g}% | {r['kl_mean']:.4f} | {same} | {eq[0]} | {eq[1]} | "
              f"{fmt(r.get('kv_bytes_per_step'), 1e-6, 2)} | {fmt(r.get('step_ms_cpu'))} | "
              f"{fmt(r.get('step_ms_gpu_b1'), 1, 2)} | {fmt(r.get('step_ms_gpu_b8'), 1, 2)} | {front} |")


def main():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = pathlib.Path(sys.argv[1])
    files = [pathlib.Path(p) for p in sys.argv[2:]]
    models = [(json.loads(f.read_text())) for f in files]
    axes_used = [a for a in AXES if any(r.get(a[0]) is not None for m in models for r in m["records"])]
    fig, grid = plt.subplots(len(models), len(axes_used), figsize=(4.2 * len(axes_used), 3.6 * len(models)), squeeze=False)
    palette = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink"]
    names = sorted({label(r) for m in models for r in m["records"] if r["policy"] != "full"}, key=lambda n: (n != "quest", n))
    colors = {n: palette[i % len(palette)] for i, n in enumerate(names)}
    for row, m in enumerate(models):
        records = [r for r in m["records"] if r.get("kl_mean") is not None]
        name = m.get("model_name", "model")
        table(records, name)
        for col, (key, title, scale) in enumerate(axes_used):
            ax = grid[row][col]
            pts = [r for r in records if r.get(key) is not None and r["policy"] != "full"]
            groups = {}
            for r in pts:
                groups.setdefault(label(r), []).append(r)
            for g, rs in sorted(groups.items()):
                rs.sort(key=lambda r: r["budget"])
                ax.plot([r[key] * scale for r in rs], [r["kl_mean"] for r in rs], "o-", ms=4,
                        color=colors.get(g), label=g)
            front = pareto([(r[key], r["kl_mean"]) for r in pts])
            fr = sorted((pts[i] for i in front), key=lambda r: r[key])
            ax.plot([r[key] * scale for r in fr], [r["kl_mean"] for r in fr], "k--", lw=0.8, label="Pareto front")
            full = next((r for r in records if r["policy"] == "full" and r.get(key) is not None), None)
            if full:
                ax.axvline(full[key] * scale, color="gray", lw=0.8, ls=":", label="full")
            ax.set_yscale("log")
            ax.set_xlabel(title)
            ax.set_ylabel("KL(full ‖ policy), nats/token")
            ax.set_title(name, fontsize=9)
            ax.grid(alpha=0.3)
            if row == 0 and col == 0:
                ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
