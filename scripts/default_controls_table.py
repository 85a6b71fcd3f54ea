"""The defaults' rule against its controls: validation objective and test figures.

Reads the rows of a quality run of the control rows (``--ablation --methods "random
top-k" "activation (weight)" "dare_linear, no rescale"``) and of the many-expert run
(``lrp (defaults)`` and mergekit's rows), and prints one table: the defaults objective on
the validation split at weight 1 and at the best weight, the test mean kept fraction
[min, max over families], the worst expert, the text NLL change against the base (mean
[largest]) and the two four-expert families' means.

    python scripts/default_controls_table.py docs/img/default-controls.json \
        docs/img/many-experts.json
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from harness.quality_report import objective, run_summary, text_change  # noqa: E402

ROWS = ("lrp (defaults)", "random top-k", "dare_linear, no rescale", "activation (weight)",
        "della", "dare_ties", "task_arithmetic")  # fmt: skip


def main(paths: list[str]) -> None:
    results = [json.loads(Path(p).read_text()) for p in paths]
    print("| row | density | val objective, weight 1 | val objective, best weight | test mean "
          "kept | test worst expert | text ΔNLL mean [largest] | four-expert families |")
    print("|---|---|---|---|---|---|---|---|")
    for method in ROWS:
        for density in (None,) if method == "task_arithmetic" else (0.5, 0.7, 0.9):
            cells = [(res, r) for res in results for r in res["rows"]
                     if r["method"] == method and r["density"] == density
                     and len(r["subset"]) == len(res["tasks"][r["family"]])]  # fmt: skip
            if not cells:
                continue
            at_one, best, means, worst, texts, many = [], [], [], [], [], []
            for res, row in cells:
                val = {float(w): runs for w, runs in row["val_runs"].items()}
                if 1.0 in val:
                    at_one.append(objective(run_summary(val[1.0])))
                best.append(max(objective(run_summary(runs)) for runs in val.values()))
                summary = run_summary(row["test_runs"])
                means.append(summary["mean"])
                worst.append(summary["worst"])
                texts.append(text_change(res, row))
                if len(res["tasks"][row["family"]]) >= 4:
                    many.append(f"{summary['mean']:.3f}")
            one = f"{statistics.mean(at_one):.3f}" if at_one else "-"
            print(f"| {method} | {density} | {one} | {statistics.mean(best):.3f} | "
                  f"{statistics.mean(means):.3f} [{min(means):.3f}, {max(means):.3f}] | "
                  f"{statistics.mean(worst):.3f} | {statistics.mean(texts):+.3f} "
                  f"[{max(texts):+.3f}] | {' / '.join(many)} |")


if __name__ == "__main__":
    main(sys.argv[1:])
