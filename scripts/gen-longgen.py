#!/usr/bin/env python3
"""Writes tests/fixtures/longgen_gsm.json: the LongGenBench-style prompt of `retro-eval`'s free
generation (several GSM-style problems in one prompt, answered in sequence).

The problems come from reasoning-gym's seeded `gsm_symbolic` generator. Run once, by hand, in a
virtual environment with `pip install reasoning-gym==0.1.25`; the output is committed, so neither
CI nor retro-eval needs Python:

    python3 -m venv /tmp/rg && /tmp/rg/bin/pip install reasoning-gym==0.1.25
    /tmp/rg/bin/python scripts/gen-longgen.py
"""
import json
import pathlib

import reasoning_gym

SEED = 2889
COUNT = 8
root = pathlib.Path(__file__).resolve().parent.parent
data = reasoning_gym.create_dataset("gsm_symbolic", seed=SEED, size=COUNT)
problems = []
for item in data:
    question = item["question"].replace(" Give the result as your final answer. Do not include units.", "").strip()
    problems.append({"question": question, "answer": str(item["answer"]).strip()})
out = {
    "source": f"reasoning-gym==0.1.25, dataset gsm_symbolic, seed={SEED}, size={COUNT}",
    "instructions": (
        "Solve the following {n} math problems one after another. For each problem write "
        "\"Problem k:\", a short step-by-step solution, and end it with a line \"Answer k: <number>\"."
    ),
    "problems": problems,
}
path = root / "tests" / "fixtures" / "longgen_gsm.json"
path.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
print(f"wrote {path} ({COUNT} problems)")
