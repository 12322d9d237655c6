"""Compare probe-count rules on the rank arrays of `scripts/probe_rule_study.py`.

    python scripts/probe_rule_compare.py OUT_DIR [OUT_DIR ...]

For each variant: every rule's p from the left-out-source ranks (what convert sees), and what the
never-seen families need for 99.9 % top-1 with the final fit (what convert never sees), plus
their agreement at each rule's p. The rules live in flashhead.convert.probe_count.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from flashhead.calibration.ranks import agreement_at, probes_for
from flashhead.convert.fit import SOURCES
from flashhead.convert.probe_count import RULES


def main() -> None:
    for d in sys.argv[1:]:
        print(f"== {d}")
        rows = []
        for path in sorted(Path(d).glob("variant-*.pt")):
            v = torch.load(path)
            per_source = {
                SOURCES[int(s)]: v["lofo"][v["source"] == s] for s in v["source"].unique()
            }
            need = {f: probes_for(r, 0.999) for f, r in v["held"].items()}
            rule_p = {
                name: max(rule(r) for r in per_source.values()) for name, rule in RULES.items()
            }
            worst = {
                name: min(agreement_at(r, p) for r in v["held"].values())
                for name, p in rule_p.items()
            }
            rows.append((path.stem, need, rule_p, worst))
        for stem, need, rule_p, worst in rows:
            needs = " ".join(f"{f} {p}" for f, p in need.items())
            rules = "  ".join(f"{k} {p} ({100 * worst[k]:.2f}%)" for k, p in rule_p.items())
            print(f"{stem}: need {needs} | {rules}")
        for name in RULES:
            ps = [r[2][name] for r in rows]
            ratio = [r[2][name] / max(r[1].values()) for r in rows]
            print(
                f"  {name}: p {min(ps)}-{max(ps)} (max/min {max(ps) / min(ps):.2f}), "
                f"p / worst need {min(ratio):.2f}-{max(ratio):.2f}"
            )


if __name__ == "__main__":
    main()
