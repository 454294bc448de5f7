"""Run a script over several seeds and print each model's metrics as mean +- standard deviation.

    python experiments/seeds.py hbat.py --compare                  # seeds 0 1 2
    python experiments/seeds.py ld_align.py --compare --seeds 0 1 2 3 4

Every argument after the script's name goes to the script. Each seed writes to
runs/seeds/<script>[_<args>]/seed<k>; the script's results.json lists its final models as top-level
keys holding a metrics dict (one with "rougeL"). The table is printed in Markdown, ready for a README.
"""
import argparse
import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("script", help="hbat.py, ld_align.py or two_stage_baseline.py")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    known, script_args = parser.parse_known_args()
    tag = re.sub(r"[^\w]+", "_", " ".join([Path(known.script).stem, *script_args])).strip("_")
    runs = []
    for seed in known.seeds:
        out = REPO / "runs" / "seeds" / tag / f"seed{seed}"
        command = [sys.executable, str(REPO / known.script), *script_args, "--seed", str(seed), "--output_dir", str(out), "--overwrite"]
        print("$", " ".join(command[1:]), flush=True)
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, cwd=REPO)
        runs.append(json.loads((out / "results.json").read_text()))

    models = [k for k, v in runs[0].items() if isinstance(v, dict) and "rougeL" in v]
    metrics = [m for m in ("rougeL", "reward", "win_rate", "length") if any(m in runs[0][k] for k in models)]
    print(f"\n{known.script} {' '.join(script_args)}: mean +- sd over seeds {' '.join(map(str, known.seeds))} "
          f"(win_rate against {runs[0].get('win_rate_against', 'the SFT model')})\n")
    print("| model | " + " | ".join(metrics) + " |")
    print("|---" * (len(metrics) + 1) + "|")
    for model in models:
        cells = []
        for m in metrics:
            values = [r[model][m] for r in runs if r[model].get(m) is not None]
            cells.append("n/a" if not values else f"{statistics.mean(values):.3f} +- {statistics.stdev(values) if len(values) > 1 else 0:.3f}")
        print(f"| {model} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
