"""The long-context study's timings of two checkouts of this repository, measured in one run and compared.

Each checkout runs its own `benchmarks/long_context.py` (every method in its own fresh process, as that script does),
with the checkout first on `PYTHONPATH`, the two alternating `--rounds` times so that both see the same machine
load. The table gives, per method and prompt length, the median TTFT and TPOT over every timed call of a checkout
(warm-up calls are left out; their medians are shown apart), and the new checkout's ratio to the old one.

    git worktree add ../old <commit>                                # the checkout to compare against
    python benchmarks/compare_checkouts.py run --old ../old --new . --out results/compare --rounds 2
    python benchmarks/compare_checkouts.py table results/compare    # the table again, from the saved rows

Each checkout is imported from its own tree: it comes first on `PYTHONPATH`, ahead of any installed `hf_specapprox`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path


def run(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for round_index in range(1, args.rounds + 1):
        for label, tree in (("old", args.old), ("new", args.new)):
            tree = Path(tree).resolve()
            target = out / f"{label}-{round_index}.json"
            if target.exists():  # resumable: a finished round is kept
                continue
            command = [sys.executable, str(tree / "benchmarks" / "long_context.py"), "--preset", args.preset,
                       "--runs", str(args.runs), "--json", str(target)]
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(tree), os.environ.get("PYTHONPATH")])))
            print(f"# round {round_index}, {label}: {tree.name}", flush=True)
            with open(out / f"{label}-{round_index}.txt", "w") as log:
                subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
    table(out)


def _rows(folder: Path, label: str):
    """(method, prompt tokens) -> every timed call's TTFT and TPOT, warm-up seconds, commits, dates."""
    grouped, meta = {}, []
    for path in sorted(folder.glob(f"{label}-*.json")):
        data = json.loads(path.read_text())
        meta.append((data["meta"]["commit"], data["meta"]["date"]))
        for row in data["rows"]:
            if row.get("skipped"):
                continue
            entry = grouped.setdefault((row["method"], row["prompt_tokens"]), dict(ttft=[], tpot=[], warmup=[]))
            entry["ttft"] += [call["ttft_s"] for call in row["runs"]]
            entry["tpot"] += [call["tpot_s"] for call in row["runs"]]
            entry["warmup"].append(row["warmup_s"])
    return grouped, meta


def table(folder) -> None:
    folder = Path(folder)
    old, old_meta = _rows(folder, "old")
    new, new_meta = _rows(folder, "new")
    print(f"# old: {sorted(set(c for c, _ in old_meta))}, {len(old_meta)} rounds; "
          f"new: {sorted(set(c for c, _ in new_meta))}, {len(new_meta)} rounds")
    print("| method | prompt | calls (old/new) | TTFT s old | TTFT s new | new/old | TPOT ms old | TPOT ms new | new/old "
          "| warm-up s old | warm-up s new |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for key in sorted(set(old) & set(new), key=lambda k: (k[1], k[0])):
        a, b = old[key], new[key]
        ttft = statistics.median(a["ttft"]), statistics.median(b["ttft"])
        tpot = statistics.median(a["tpot"]) * 1e3, statistics.median(b["tpot"]) * 1e3
        print(f"| {key[0]} | {key[1]} | {len(a['ttft'])}/{len(b['ttft'])} | {ttft[0]:.3f} | {ttft[1]:.3f} | "
              f"**{ttft[1] / ttft[0]:.2f}** | {tpot[0]:.2f} | {tpot[1]:.2f} | **{tpot[1] / tpot[0]:.2f}** | "
              f"{statistics.median(a['warmup']):.1f} | {statistics.median(b['warmup']):.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    runner = sub.add_parser("run", help="run both checkouts alternately, then print the table")
    runner.add_argument("--old", required=True, help="the checkout to compare against")
    runner.add_argument("--new", required=True, help="the checkout under test")
    runner.add_argument("--out", required=True, help="folder for each round's rows and printed tables")
    runner.add_argument("--rounds", type=int, default=2)
    runner.add_argument("--runs", type=int, default=3, help="timed calls per method and length in each round")
    runner.add_argument("--preset", default="smoke")
    printer = sub.add_parser("table", help="print the table from a finished run's folder")
    printer.add_argument("folder")
    args = parser.parse_args()
    run(args) if args.command == "run" else table(args.folder)


if __name__ == "__main__":
    main()
