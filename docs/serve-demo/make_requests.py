"""The serve demo's requests: the held-out arithmetic problems on which the base model writes an
equation and then copies the example's answer (harness/data.py's account, from the base model's
replies in the demo's search), each asked of the base and the three adapters (seeds 0, 2 and 4 of
the demo's 52 scalars), interleaved.

    python docs/serve-demo/make_requests.py > docs/serve-demo/requests.jsonl
"""
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
import task  # noqa: E402
from harness.account import equation_account  # noqa: E402

HERE = os.path.dirname(__file__)
rows = task.load_task("arith", "test", 1)[0]
results = [json.loads(line) for line in open(os.path.join(HERE, "..", "demo-search", "52",
                                                           "results.jsonl"))]
base = next(r for r in results if r["name"] == "base" and r["split"] == "test")["verdicts"]
for row, v in zip(rows, base):
    if equation_account([row], [v["reply"]])["copied"] == 1.0:
        for adapter in ("base", "rl52-seed0", "rl52-seed2", "rl52-seed4"):
            print(json.dumps(dict(adapter=adapter, question=row["question"], gold=row["gold"])))
