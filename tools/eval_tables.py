"""Markdown tables from `python -m layerdiff eval --details` reports (the model card's tables).

    python tools/eval_tables.py REPORT.json                  # per-layer table, SMG minus CFG, breakdowns
    python tools/eval_tables.py NEW.json --against OLD.json  # NEW minus OLD, paired scene by scene

The first form prints the report's metrics per variant and layer count, SMG minus CFG with its
paired standard error per layer count, and the per-word breakdowns (CFG / SMG). The second pairs
two reports of the same scenes and seeds (same `--seed`, `--samples`, `--layers`; both written with
`--details`) and prints, for each variant, the second report's metrics minus the first's with the
paired standard error: how much a new model moves each metric on identical prompts and noise.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHOWN = (("background_accuracy", "background"), ("texture_fidelity", "texture"), ("colour_accuracy", "colour"),
         ("shape_accuracy", "shape"), ("size_accuracy", "size"), ("position_accuracy", "placement"),
         ("mask_iou", "mask IoU"), ("overlap_fraction", "overlapping"), ("empty_mask_rate", "empty masks"))


def _load(path: Path) -> dict:
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SystemExit(f"{path}: not a readable eval report ({e})") from None
    if not isinstance(report, dict) or "cfg" not in report:
        raise SystemExit(f"{path}: not an eval report (no 'cfg' entry): give the JSON of `python -m layerdiff eval --out`")
    return report


def _value(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _signed(d, se) -> str:
    return "n/a" if d is None else f"{d:+.4f} ± {se:.4f}" if se is not None else f"{d:+.4f}"


def metrics_table(report: dict) -> str:
    head = "| variant | layers | " + " | ".join(label for _, label in SHOWN) + " |"
    rows = [head, "|" + "---|" * (len(SHOWN) + 2)]
    for variant in ("cfg", "smg"):
        for group, summary in report[variant].items():
            rows.append(f"| {variant.upper()} | {group} | " + " | ".join(_value(summary[m]) for m, _ in SHOWN) + " |")
    return "\n".join(rows)


def diff_table(diff: dict, stderr: dict) -> str:
    head = "| layers | " + " | ".join(label for _, label in SHOWN) + " |"
    rows = [head, "|" + "---|" * (len(SHOWN) + 1)]
    for group in diff:
        rows.append(f"| {group} | " + " | ".join(_signed(diff[group][m], stderr[group][m]) for m, _ in SHOWN) + " |")
    return "\n".join(rows)


def breakdown_tables(report: dict) -> str:
    parts = report.get("breakdown")
    if not parts:
        return ""
    out = []
    for group, words in parts["cfg"].items():
        names = [k for k in next(iter(words.values()), {}) if k not in ("samples", "foregrounds")]
        count = "scenes" if group == "background" else "foregrounds"
        head = f"| {group} | {count} | " + " | ".join(f"{n.replace('_', ' ')} (CFG / SMG)" for n in names) + " |"
        rows = [head, "|" + "---|" * (len(names) + 2)]
        for word, cfg in words.items():
            smg = parts.get("smg", {}).get(group, {}).get(word, {})
            n = cfg.get("samples", cfg.get("foregrounds"))
            rows.append(f"| {word} | {n} | " + " | ".join(f"{_value(cfg[k])} / {_value(smg.get(k))}" for k in names) + " |")
        out.append("\n".join(rows))
    return "\n\n".join(out)


def _per_sample(report: dict, path: Path) -> list[dict]:
    if "per_sample" not in report:
        raise SystemExit(f"{path}: no per-scene records: rerun `python -m layerdiff eval ... --details`")
    return report["per_sample"]


def paired_runs(new: dict, old: dict, new_path: Path, old_path: Path) -> str:
    from layerdiff.evaluation.metrics import compare_variants

    a, b = _per_sample(old, old_path), _per_sample(new, new_path)
    keys = lambda rs: [(r["index"], r["seed"], r["global_prompt"]) for r in rs]  # noqa: E731
    if keys(a) != keys(b):
        raise SystemExit(f"{new_path} and {old_path} hold different scenes or seeds: run both with the same "
                         "--seed, --samples and --layers")
    out = []
    for variant in ("cfg", "smg"):
        diff, stderr = compare_variants([r[variant] for r in a], [r[variant] for r in b])
        out.append(f"{variant.upper()}: {new_path.name} minus {old_path.name}, paired over {len(a)} scenes\n\n"
                   + diff_table(diff, stderr))
    return "\n\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("report", type=Path, help="an eval report (JSON of `python -m layerdiff eval --out`)")
    p.add_argument("--against", type=Path, default=None,
                   help="an earlier report of the same scenes and seeds: print the paired differences instead")
    args = p.parse_args(argv)
    report = _load(args.report)
    if args.against is not None:
        print(paired_runs(report, _load(args.against), args.report, args.against))
        return 0
    print(metrics_table(report))
    print("\nSMG minus CFG, paired over identical prompts and seeds (mean ± standard error):\n")
    print(diff_table(report["smg_minus_cfg"], report["smg_minus_cfg_stderr"]))
    tables = breakdown_tables(report)
    if tables:
        print("\n" + tables)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
