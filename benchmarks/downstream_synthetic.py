"""Attribute recognition and text-to-image search on built-in synthetic data, next to chance (not a test).

    python benchmarks/downstream_synthetic.py                 # both demo configs, about 4 minutes on 2 CPU cores
    python benchmarks/downstream_synthetic.py --task text_reid --work-dir /tmp/downstream

Runs exactly what the README shows, ``pedlightning fit`` then ``pedlightning test --ckpt_path last`` with
``configs/attributes/demo_synthetic.yaml`` and ``configs/text_reid/demo_synthetic.yaml`` (data written on the
first run under ``--work-dir``), reads the test metrics from a CSV log and prints them with their chance levels:

- attributes: label mA of any constant prediction is exactly 0.5 (all attributes on: TPR 1, TNR 0; all off:
  TPR 0, TNR 1); accuracy / precision / recall / F1 have no single chance value and are printed as measured.
- text-to-image: R1 of a random ranking is (images of the query's identity) / (gallery size); the module also
  logs ``chance_rank1`` / ``chance_mAP``, the metrics of random features on the same captions and gallery.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {"attributes": "configs/attributes/demo_synthetic.yaml", "text_reid": "configs/text_reid/demo_synthetic.yaml"}


def run(task: str, work_dir: str) -> dict[str, float]:
    run_dir, data_dir = os.path.join(work_dir, task), os.path.join(work_dir, "data", task)
    args = ["--config", os.path.join(REPO, CONFIGS[task]), f"--trainer.default_root_dir={run_dir}",
            f"--data.init_args.root={data_dir}", "--trainer.enable_progress_bar=false",
            "--trainer.callbacks=[]", "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
            f"--trainer.logger.save_dir={run_dir}/csv"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    timings = {}
    for sub, extra in (("fit", []), ("test", ["--ckpt_path", "last"])):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "pedlightning.cli", sub, *args, *extra], cwd=REPO, env=env,
                       check=True, stdout=subprocess.DEVNULL)
        timings[f"{sub}_seconds"] = round(time.perf_counter() - start, 1)
    path = sorted(glob.glob(os.path.join(run_dir, "csv", "**", "metrics.csv"), recursive=True))[-1]
    with open(path) as f:
        rows = list(csv.DictReader(f))
    metrics = {k: float(v) for row in rows for k, v in row.items() if k.startswith("test/") and v}
    return {**{k.split("/", 1)[1]: v for k, v in metrics.items()}, **timings}


def expected_random_rank1(root: str) -> float:
    """Mean over caption queries of (gallery images of the caption's identity) / (gallery size)."""
    from pedlightning.data.sources import build_text_source

    test = build_text_source("cuhk_pedes", root).test
    pids = [r.pid for r in test]
    return round(sum(len(r.captions) * pids.count(r.pid) / len(pids) for r in test)
                 / sum(len(r.captions) for r in test), 6)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=[*CONFIGS, "all"], default="all")
    parser.add_argument("--work-dir", default="runs/downstream_synthetic")
    args = parser.parse_args()
    for task in CONFIGS if args.task == "all" else [args.task]:
        results = run(task, os.path.abspath(args.work_dir))
        if task == "attributes":
            results["chance_mA"] = 0.5
        else:
            results["chance_rank1_expected"] = expected_random_rank1(os.path.join(args.work_dir, "data", task))
        print(task, json.dumps(results, sort_keys=True))


if __name__ == "__main__":
    main()
