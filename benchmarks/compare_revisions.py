"""The training benchmark of two revisions in one run: an earlier commit against the checkout.

Each contender of `benchmarks/train_speed.py` runs in its own process from each tree in turn (a
temporary `git worktree` of REV, then this checkout), round after round, on the same data and
initial adapter, so both see the same machine load. Each tree runs its own copy of the
benchmark's worker with its own `src/` first on the path.

    python benchmarks/compare_revisions.py REV                       # lorakit and peft, 3 rounds
    python benchmarks/compare_revisions.py REV --only lorakit --rounds 5 --steps 3
    python benchmarks/compare_revisions.py REV --after HEAD          # a commit, not the checkout

Prints a table (median of the rounds) and `after_vs_before_<contender>_speed=… _memory=…`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_speed  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _worker(tree: Path, name: str, adapter_dir: str, steps: int) -> dict:
    out = subprocess.run(
        [sys.executable, str(tree / "benchmarks" / "train_speed.py"), "--contender", name, "--adapter-dir", adapter_dir,
         "--steps", str(steps)],
        capture_output=True, text=True, cwd=tree,
        env={**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": str(tree / "src")},
    )
    if out.returncode != 0:
        print(out.stderr, file=sys.stderr)
        raise SystemExit(f"{name} from {tree} failed")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rev", help="the earlier revision (a commit, tag or branch)")
    parser.add_argument("--after", help="the later revision (default: this checkout as it is)")
    parser.add_argument("--only", nargs="*", default=["lorakit", "peft"], help="contenders of train_speed.py")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    names = {}
    for rev in filter(None, (args.rev, args.after)):
        found = subprocess.run(["git", "rev-parse", "--short", rev], capture_output=True, text=True, cwd=REPO)
        if found.returncode != 0:
            raise SystemExit(f"compare_revisions: {rev!r} is not a revision of {REPO}")
        names[rev] = found.stdout.strip()
    runs: dict[tuple[str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"before": Path(tmp) / "before", "after": Path(tmp) / "after" if args.after else REPO}
        for label, rev in (("before", args.rev), ("after", args.after)):
            if rev:
                subprocess.run(["git", "worktree", "add", "--detach", "-q", str(trees[label]), rev], check=True, cwd=REPO)
        try:
            train_speed._make_initial_adapter(tmp)
            for round_ in range(args.rounds):
                for name in args.only:
                    for label, tree in trees.items():
                        print(f"round {round_ + 1}/{args.rounds}: {name} {label} …", file=sys.stderr, flush=True)
                        runs.setdefault((name, label), []).append(_worker(tree, name, tmp, args.steps))
        finally:
            for tree in trees.values():
                if tree != REPO:
                    subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=REPO)
    results = {key: train_speed._median_run(rs) for key, rs in runs.items()}
    print(f"| contender | revision | tokens/s | step (s) | CPU s/step | peak RSS (GB) |\n|---|---|---:|---:|---:|---:|")
    for (name, label), r in results.items():
        rev = names[args.rev] if label == "before" else names.get(args.after, "checkout")
        print(f"| {name} | {rev} | {r['tokens_per_s']:.0f} | {r['step_s']:.2f} | {r['cpu_s']:.2f} | {r['peak_rss_gb']:.2f} |")
    parts = []
    for name in args.only:
        b, a = results[(name, "before")], results[(name, "after")]
        parts += [f"after_vs_before_{name}_speed={a['tokens_per_s'] / b['tokens_per_s']:.2f}",
                  f"after_vs_before_{name}_memory={a['peak_rss_gb'] / b['peak_rss_gb']:.2f}"]
    print(" ".join(parts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
