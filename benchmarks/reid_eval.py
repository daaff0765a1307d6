"""Speed and peak memory of `reid_evaluate` against the classic per-query numpy evaluation and torchreid's own
`evaluate_rank` (a benchmark, not a test).

    python benchmarks/reid_eval.py                      # Market-size and MSMT17-size
    python benchmarks/reid_eval.py --cases market --rerank --repeats 5

Features are random but structured (identity centre + camera offset + noise, 768-d), so the metrics are non-trivial.
Every measurement runs in a fresh subprocess that loads the arrays, then times one evaluation and reads its peak
resident memory (ru_maxrss; tracemalloc does not see torch's allocations); implementations take turns, so all see
the same machine load. The reference is the torchreid `eval_market1501` logic: full distance matrix, `np.argsort`,
then a per-query loop (its AP vectorised with numpy). Both sides get the distance matrix from the same `torch.mm` of
L2-normalised float32 features (negated similarity), so differences in the numbers can only come from the ranking
code. That matrix product is a floor no exact evaluation can go below; the `distances-only` row measures it.
`reference-ties` is the reference with ties broken as `reid_evaluate`'s default rule breaks them (see
`reference_eval`), to show the numbers are otherwise identical.

The real peer: torchreid 0.2.5's `evaluate_rank` (its python evaluator; the Cython one is not built by the PyPI
package), run once per case on the same distance matrix when torchreid is importable: `make bench` installs it (the
bench-only extra `pip install -e ".[bench-peers]"`; torchreid 0.2.5 declares no dependencies). Only its metrics
module is loaded (the package itself imports its whole model zoo). Its numbers are compared with `reid_evaluate(...,
ties="gallery_order")`: `np.argsort` has no defined order for ties, and a stable order is the closest rule. It takes
minutes at Market size, so it is skipped on MSMT17-size unless `--torchreid-msmt17`.

`--tie-demo` also evaluates the Market-size features binarised by their sign (768-bit hash codes: only 769
distinct similarities) under each tie rule, to show how much the rule matters once features tie. Rounding features
to bfloat16 does not do it: normalised and ranked in float32 they hardly tie.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CASES = {
    "market": dict(num_query=3368, num_gallery=15913, num_ids=750, num_cams=6, num_distractors=2793),
    "msmt17": dict(num_query=11659, num_gallery=82161, num_ids=3060, num_cams=15, num_distractors=0),
}
DIM = 768
REFERENCE_BLOCK = {"market": None, "msmt17": 1000}  # queries per reference block; None = whole matrix at once
ARRAYS = ("qf", "gf", "q_pids", "g_pids", "q_cams", "g_cams")
KEYS = ("mAP", "mINP", "rank1", "rank5", "rank10", "num_valid_queries")
TORCHREID_KEYS = ("mAP", "rank1", "rank5", "rank10")  # evaluate_rank returns no mINP and no query count
TIE_RULES = ("pessimistic", "gallery_order", "optimistic")


def load_torchreid_rank():
    """torchreid's `metrics/rank.py` as a module, without running torchreid's package `__init__`; None if absent."""
    import warnings

    spec = importlib.util.find_spec("torchreid")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(list(spec.submodule_search_locations)[0])
    for path in (root / "reid" / "metrics" / "rank.py", root / "metrics" / "rank.py"):  # 0.2.5, then 1.x layout
        if path.is_file():
            module_spec = importlib.util.spec_from_file_location("torchreid_rank", path)
            module = importlib.util.module_from_spec(module_spec)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "Cython evaluation is unavailable"
                module_spec.loader.exec_module(module)
            return module
    return None


def torchreid_eval(rank_module, qf, gf, q_pids, g_pids, q_cams, g_cams) -> dict[str, float]:
    """torchreid's `evaluate_rank` (python evaluator) on the same negated-similarity matrix as the reference."""
    import torch

    q = torch.nn.functional.normalize(torch.from_numpy(qf), dim=1)
    g = torch.nn.functional.normalize(torch.from_numpy(gf), dim=1)
    distmat = torch.mm(q, -g.T).numpy()
    cmc, mean_ap = rank_module.evaluate_rank(distmat, q_pids, g_pids, q_cams, g_cams, max_rank=10, use_cython=False)
    return {"mAP": float(mean_ap), "rank1": float(cmc[0]), "rank5": float(cmc[4]), "rank10": float(cmc[9])}


def make_case(num_query: int, num_gallery: int, num_ids: int, num_cams: int, num_distractors: int,
              noise: float = 2.2, seed: int = 0) -> dict[str, np.ndarray]:
    """Identity centre + camera offset + noise; distractors (pid 0) are pure noise in the gallery."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((num_ids + 1, DIM), dtype=np.float32)
    cam_offsets = 0.7 * rng.standard_normal((num_cams, DIM), dtype=np.float32)
    q_pids = rng.integers(1, num_ids + 1, num_query)
    g_pids = np.concatenate([rng.integers(1, num_ids + 1, num_gallery - num_distractors),
                             np.zeros(num_distractors, dtype=np.int64)])
    q_cams, g_cams = rng.integers(0, num_cams, num_query), rng.integers(0, num_cams, num_gallery)
    qf = centres[q_pids] + cam_offsets[q_cams] + noise * rng.standard_normal((num_query, DIM), dtype=np.float32)
    gf = centres[g_pids] + cam_offsets[g_cams] + noise * rng.standard_normal((num_gallery, DIM), dtype=np.float32)
    gf[g_pids == 0] = cam_offsets[g_cams[g_pids == 0]] + 1.5 * noise * rng.standard_normal(
        (num_distractors, DIM), dtype=np.float32)
    return dict(qf=qf, gf=gf, q_pids=q_pids, g_pids=g_pids, q_cams=q_cams, g_cams=g_cams)


def reference_eval(qf, gf, q_pids, g_pids, q_cams, g_cams, max_rank=10, block=None, ties_like_ours=False
                   ) -> dict[str, float]:
    """torchreid's eval_market1501: argsort the distance matrix, then one query at a time.

    `np.argsort` orders exactly tied float32 distances arbitrarily (thousands of ties per Market-size matrix);
    `ties_like_ours` sorts a float64 key that puts a positive a quarter-ulp after a tied negative, as
    `reid_evaluate` counts ties, without reordering distinct distances.
    """
    import torch

    q = torch.nn.functional.normalize(torch.from_numpy(qf), dim=1)
    g = torch.nn.functional.normalize(torch.from_numpy(gf), dim=1)
    aps, inps, cmcs = [], [], []
    block = block or len(qf)
    for start in range(0, len(qf), block):
        distmat = torch.mm(q[start:start + block], -g.T).numpy()
        if ties_like_ours:
            same = g_pids[None] == q_pids[start:start + block, None]
            indices = np.argsort(distmat + same * (np.spacing(np.abs(distmat)).astype(np.float64) / 4), axis=1)
        else:
            indices = np.argsort(distmat, axis=1)
        matches = (g_pids[indices] == q_pids[start:start + block, None]).astype(np.int32)
        for i in range(len(distmat)):
            q_pid, q_cam = q_pids[start + i], q_cams[start + i]
            order = indices[i]
            keep = np.invert((g_pids[order] == q_pid) & (g_cams[order] == q_cam))
            raw_cmc = matches[i][keep]
            if not np.any(raw_cmc):
                continue
            cmc = raw_cmc.cumsum()
            hardest = np.flatnonzero(raw_cmc)[-1]
            inps.append(cmc[hardest] / (hardest + 1.0))
            cmc[cmc > 1] = 1
            cmcs.append(cmc[:max_rank].copy())  # torchreid appends the view, keeping every full row alive
            precision = raw_cmc.cumsum() / np.arange(1.0, len(raw_cmc) + 1)
            aps.append((precision * raw_cmc).sum() / raw_cmc.sum())
        del distmat, indices, matches
    cmc = np.asarray(cmcs, dtype=np.float64).mean(0)
    return {"mAP": float(np.mean(aps)), "mINP": float(np.mean(inps)), "rank1": float(cmc[0]),
            "rank5": float(cmc[4]), "rank10": float(cmc[9]), "num_valid_queries": len(aps)}


def _rss_gb() -> float:
    with open("/proc/self/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kb / 2**20


def measure(impl: str, data_dir: str, reference_block: int | None, threads: int | None) -> None:
    """Child process: load the arrays, run one evaluation, print times, memory and results as JSON."""
    import torch

    from pedlightning.metrics import reid_evaluate
    from pedlightning.metrics.ranking import auto_block_size, feature_distance

    if threads:
        torch.set_num_threads(threads)
    a = {name: np.load(Path(data_dir) / f"{name}.npy") for name in ARRAYS}
    rank_module = load_torchreid_rank() if impl == "torchreid" else None
    if impl.startswith("binary-"):  # sign hash codes: heavily tied similarities
        for name in ("qf", "gf"):
            a[name] = np.sign(a[name]).astype(np.float32)
    before = _rss_gb()
    cpu, start = time.process_time(), time.perf_counter()
    if impl == "torchreid":
        result = torchreid_eval(rank_module, *(a[n] for n in ARRAYS))
    elif impl.startswith("reference"):
        result = reference_eval(*(a[n] for n in ARRAYS), block=reference_block,
                                ties_like_ours=impl == "reference-ties")
    elif impl == "distances-only":  # the floor: the blocked float32 distance matrix, no ranking at all
        q, g = torch.from_numpy(a["qf"]), torch.from_numpy(a["gf"])
        distance, block = feature_distance(q, g), auto_block_size(len(g))
        for first in range(0, len(q), block):
            distance(first, min(first + block, len(q)))
        result = None
    else:  # pedlightning, pedlightning-<tie rule>, binary-<tie rule>, rerank
        ties = impl.split("-", 1)[1] if "-" in impl else "pessimistic"
        result = reid_evaluate(*(a[n] for n in ARRAYS), rerank=impl == "rerank", ties=ties)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps({"seconds": seconds, "cpu": cpu, "peak_gb": peak, "before_gb": before, "result": result}))


def run_child(impl: str, data_dir: str, reference_block: int | None, threads: int | None) -> dict:
    cmd = [sys.executable, __file__, "--measure", impl, "--data", data_dir]
    if reference_block:
        cmd += ["--reference-block", str(reference_block)]
    if threads:
        cmd += ["--threads", str(threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def print_table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(" | ".join(cell.ljust(w) for cell, w in zip(row, widths)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--repeats", type=int, default=5, help="runs per implementation on Market-size")
    parser.add_argument("--msmt17-repeats", type=int, default=2, help="runs per implementation on MSMT17-size")
    parser.add_argument("--rerank", action="store_true", help="also time k-reciprocal re-ranking (Market-size)")
    parser.add_argument("--torchreid-msmt17", action="store_true", help="also run torchreid on MSMT17-size (slow)")
    parser.add_argument("--tie-demo", action="store_true", help="also rank sign-binarised features by each tie rule")
    parser.add_argument("--threads", type=int, help="torch threads in every measurement (default: torch's)")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--reference-block", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        return measure(args.measure, args.data, args.reference_block, args.threads)

    has_torchreid = load_torchreid_rank() is not None
    print(f"{os.cpu_count()} CPUs, torch threads: {args.threads or 'default'}, torchreid: "
          f"{'found' if has_torchreid else 'not importable (its row is skipped)'}, load average before: "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    rows = [("case", "implementation", "runs", "median s", "median CPU s", "peak RSS GB", "RSS over inputs GB",
             "speed-up (wall / CPU)", "same numbers as pedlightning")]
    demo: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases:
            data_dir = Path(tmp) / case
            data_dir.mkdir()
            for name, array in make_case(**CASES[case]).items():
                np.save(data_dir / f"{name}.npy", array)
            repeats = args.msmt17_repeats if case == "msmt17" else args.repeats
            plan = {"pedlightning": repeats, "reference": repeats, "reference-ties": 1, "distances-only": repeats,
                    "pedlightning-gallery_order": 1,
                    "torchreid": int(has_torchreid and (case == "market" or args.torchreid_msmt17)),
                    "rerank": int(args.rerank and case == "market")}
            if args.tie_demo and case == "market":
                plan.update({f"binary-{rule}": 1 for rule in TIE_RULES})
            runs: dict[str, list[dict]] = {impl: [] for impl, n in plan.items() if n}
            for i in range(repeats):  # interleaved, so every implementation sees the same machine load
                for impl in runs:
                    if i < plan[impl]:
                        runs[impl].append(run_child(impl, str(data_dir), REFERENCE_BLOCK[case], args.threads))
            ours = runs["pedlightning"][0]["result"]
            ref = {key: statistics.median(r[key] for r in runs["reference"]) for key in ("seconds", "cpu")}
            for impl, measured in runs.items():
                if impl.startswith("binary-"):
                    demo[impl] = measured[0]["result"]
                    continue
                med = {key: statistics.median(r[key] for r in measured) for key in ("seconds", "cpu")}
                rows.append((case, _label(impl, case), str(len(measured)), f"{med['seconds']:.2f}", f"{med['cpu']:.2f}",
                             f"{max(r['peak_gb'] for r in measured):.2f}",
                             f"{max(r['peak_gb'] - r['before_gb'] for r in measured):.2f}",
                             "" if impl == "rerank" else
                             f"{ref['seconds'] / med['seconds']:.2f}x / {ref['cpu'] / med['cpu']:.2f}x",
                             _agreement(impl, measured[0]["result"], ours, runs)))
                print(f"  {case} {impl}: " + ", ".join(f"{r['seconds']:.2f}s" for r in measured), flush=True)
            print(f"  {case} metrics: " + ", ".join(f"{k} {ours[k]:.4f}" for k in KEYS[:-1])
                  + f", valid queries {ours['num_valid_queries']}"
                  + (f"; re-ranked mAP {runs['rerank'][0]['result']['mAP']:.4f} rank1 "
                     f"{runs['rerank'][0]['result']['rank1']:.4f}" if "rerank" in runs else ""))
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}\n")
    print_table(rows)
    if demo:
        print("\nMarket-size features binarised by sign, by tie rule:")
        print_table([("tie rule", *KEYS[:-1])] + [(impl[7:], *(f"{r[k]:.4f}" for k in KEYS[:-1]))
                                                  for impl, r in demo.items()])


def _label(impl: str, case: str) -> str:
    block = REFERENCE_BLOCK[case] if impl.startswith("reference") else None
    names = {"torchreid": "torchreid 0.2.5 evaluate_rank (python)",
             "pedlightning-gallery_order": "pedlightning, ties='gallery_order'"}
    return names.get(impl, impl) + (f" (blocks of {block} queries)" if block else "")


def _agreement(impl: str, result: dict | None, ours: dict, runs: dict[str, list[dict]]) -> str:
    """How far an implementation's numbers are from ours under the tie rule it matches."""
    if result is None or impl in ("pedlightning", "rerank"):
        return ""
    if impl == "torchreid":  # unstable np.argsort: compare with the stable-order rule, on the keys it reports
        mine = runs["pedlightning-gallery_order"][0]["result"]
        diff = max(abs(mine[k] - result[k]) for k in TORCHREID_KEYS)
        return f"{'yes' if diff <= 1e-6 else 'no'} vs ties='gallery_order' (max |diff| {diff:.1e}, float32 CMC)"
    diff = max(abs(ours[k] - result[k]) for k in KEYS)
    return f"{'yes' if diff <= 1e-9 else 'no'} (max |diff| {diff:.1e})"


if __name__ == "__main__":
    main()
