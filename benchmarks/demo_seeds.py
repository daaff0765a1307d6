"""The `make demo` recipe run for several seeds: test metrics, wall time and CPU time per seed (a benchmark).

    python benchmarks/demo_seeds.py                       # seeds 0 1 2, prints the table the README shows
    python benchmarks/demo_seeds.py --seeds 0 --set trainer.max_epochs=4   # a variant of the recipe

Each seed runs exactly what `make demo` runs: `pedlightning fit --config configs/demo/reid_market_synthetic.yaml`
then `pedlightning test ... --ckpt_path last`, in subprocesses, with `--seed_everything=<seed>` and
`--data.init_args.seed=<seed>` (model initialisation, augmentation and the P x K sampler order all change; the
synthetic dataset does not: every seed trains and tests on the same files). Seed 0 is the `make demo` run itself.
Numbers are read from the `reID test:` line the test command prints. Wall time depends on whatever else runs on
the machine; CPU time (user + system of the commands and their data-loader workers) much less so: both are shown.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs/demo/reid_market_synthetic.yaml")
COLUMNS = ("mAP", "rank1", "rank5", "rank10", "mINP")
RESULT_LINE = re.compile(r"reID test: (.*)")


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_command(args: list[str], log_path: str, threads: int = 1) -> tuple[str, float, float]:
    """Run `pedlightning <args>` from the repository root with `threads` torch threads (OMP_NUM_THREADS, as
    `make demo` sets it); (its output, wall seconds, CPU seconds)."""
    cpu, wall = _children_cpu(), time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "pedlightning.cli", *args], cwd=REPO, capture_output=True,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    wall, cpu = time.perf_counter() - wall, _children_cpu() - cpu
    output = result.stdout + result.stderr
    with open(log_path, "w", encoding="utf-8") as f:
        f.write(output)
    if result.returncode != 0:
        raise SystemExit(f"`pedlightning {' '.join(args)}` failed (exit {result.returncode}); see {log_path}:\n"
                         + output[-3000:])
    return output, wall, cpu


def parse_results(output: str) -> dict[str, float]:
    """The metrics of the last `reID test:` line (`mAP=0.5, rank1=...`)."""
    lines = RESULT_LINE.findall(output)
    if not lines:
        raise SystemExit("the test command printed no `reID test:` line")
    return {k: float(v) for k, v in (item.split("=") for item in lines[-1].split(", "))}


def run_seed(seed: int, root: str, overrides: list[str], config: str = CONFIG, threads: int = 1
             ) -> dict[str, float]:
    """fit then test one seed into `<root>/seed<seed>`; the test metrics plus wall/CPU seconds of both commands."""
    run_dir = os.path.join(root, f"seed{seed}")
    os.makedirs(run_dir, exist_ok=True)
    common = ["--config", config, f"--seed_everything={seed}", f"--data.init_args.seed={seed}",
              f"--trainer.default_root_dir={run_dir}",
              *(f"--{o}" for o in overrides)]
    _, fit_wall, fit_cpu = run_command(["fit", *common], os.path.join(run_dir, "fit.log"), threads)
    output, test_wall, test_cpu = run_command(["test", *common, "--ckpt_path=last"],
                                              os.path.join(run_dir, "test.log"), threads)
    return {**parse_results(output), "wall_s": fit_wall + test_wall, "cpu_s": fit_cpu + test_cpu}


def table(rows: dict[int, dict[str, float]]) -> str:
    """Markdown: one row per seed, then mean and standard deviation, then chance."""
    head = ["seed", *COLUMNS, "wall (min)", "CPU (min)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def fmt(values: dict[str, float]) -> list[str]:
        return [f"{values[c]:.3f}" for c in COLUMNS] + [f"{values['wall_s'] / 60:.1f}", f"{values['cpu_s'] / 60:.1f}"]

    for seed, r in rows.items():
        lines.append("| " + " | ".join([str(seed), *fmt(r)]) + " |")
    if len(rows) > 1:
        keys = [*COLUMNS, "wall_s", "cpu_s"]
        mean = {k: statistics.mean(r[k] for r in rows.values()) for k in keys}
        std = {k: statistics.stdev(r[k] for r in rows.values()) for k in keys}
        lines.append("| mean | " + " | ".join(fmt(mean)) + " |")
        lines.append("| std | " + " | ".join(fmt(std)) + " |")
    first = next(iter(rows.values()))
    lines.append(f"| chance (random features) | {first['chance_mAP']:.3f} | {first['chance_rank1']:.3f} |"
                 + " |" * (len(head) - 3))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=CONFIG, help="the recipe (default: the `make demo` config)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--root", default=os.path.join(REPO, "runs/demo_seeds"), help="one run folder per seed")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per command (OMP_NUM_THREADS)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a command-line override for both commands, without the leading --, e.g. "
                             "trainer.max_epochs=4 (repeatable)")
    args = parser.parse_args(argv)
    rows = {}
    for seed in args.seeds:
        rows[seed] = run_seed(seed, args.root, args.overrides, args.config, args.threads)
        print(f"seed {seed}: " + ", ".join(f"{k}={v:.4f}" for k, v in rows[seed].items()), flush=True)
    print(f"\nnproc={os.cpu_count()}, load average at the end {os.getloadavg()[0]:.1f}\n")
    print(table(rows))


if __name__ == "__main__":
    main()
