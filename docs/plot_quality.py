#!/usr/bin/env python3
"""Plots KL(full || policy) against decode position at the ~10% budget from
a retro-eval curves file (default: docs/results/quality_smollm2-135m-instruct-f32_kl_curves.json) into a PNG (default docs/quality_kl.png).

Not part of CI. Needs matplotlib (e.g. `python3 -m venv /tmp/plot && /tmp/plot/bin/pip install
matplotlib`, then `/tmp/plot/bin/python docs/plot_quality.py`).
"""
import json
import pathlib
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

here = pathlib.Path(__file__).resolve().parent
src = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else here / "results" / "quality_smollm2-135m-instruct-f32_kl_curves.json"
dst = pathlib.Path(sys.argv[2]) if len(sys.argv) > 2 else here / "quality_kl.png"
data = json.loads(src.read_text())
WINDOW = 128  # moving-average width in steps


def smooth(values, width):
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= width:
            acc -= values[i - width]
        out.append(acc / min(i + 1, width))
    return out


fig, ax = plt.subplots(figsize=(9, 5))
styles = {"full": ("black", "-"), "quest": ("tab:red", "-"), "quest-oracle-kv": ("tab:red", ":")}
colors = {2: "tab:blue", 4: "tab:green", 8: "tab:purple", 16: "tab:orange"}
for s in data["series"]:
    kl = s["kl"]
    x = [data["prompt_tokens"] + 1 + i for i in range(len(kl))]
    if s["policy"] == "retro":
        label, color, ls = f"retro w={s['window']}", colors.get(s["window"], "gray"), "-"
    elif s["policy"] == "retro-refresh":
        base = "quest" if s["window"] == 1 else f"retro w={s['window']}"
        label, color, ls = f"{base} + refresh", colors.get(s["window"], "tab:red"), "--"
    else:
        label = s["policy"]
        color, ls = styles[s["policy"]]
    mean = sum(kl) / len(kl)
    ax.plot(x, smooth(kl, WINDOW), color=color, linestyle=ls, linewidth=1.4, label=f"{label} (mean {mean:.4f})")
ax.set_xlabel("context position of the predicted token (prompt = first %d tokens)" % data["prompt_tokens"])
ax.set_ylabel(f"KL(full ‖ policy), nats, {WINDOW}-step moving average")
ax.set_title(f"SmolLM2-135M-Instruct, teacher-forced on 'In the Year 2889', budget {data['budget']:.0%} of context")
ax.set_ylim(bottom=0)
ax.grid(alpha=0.3)
ax.legend()
fig.tight_layout()
fig.savefig(dst, dpi=110)
print(f"wrote {dst}")
