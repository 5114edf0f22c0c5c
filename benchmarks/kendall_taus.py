"""irm.chains.kendall_taus (every row at once) against what it replaced above 200 words: scipy.stats.kendalltau row
by row with nan_policy="omit". `true` on the lexicon's scale (one decimal, so tied), rows continuous; each repetition
times both back to back, in alternating order. Run with --threads 1 (OMP_NUM_THREADS=1) on a shared machine.

    python benchmarks/kendall_taus.py --threads 1 --n 800 --rows 8 --reps 200
"""

from __future__ import annotations

import time

import numpy as np
from _common import base_parser, environment, median, parse_args, ratio_median, table, write_json


def scipy_rows(true, pred_KN) -> np.ndarray:
    from scipy.stats import kendalltau

    return np.array([kendalltau(true, row, nan_policy="omit").statistic for row in pred_KN])


def main(argv: list[str] | None = None) -> None:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=800, help="words")
    p.add_argument("--rows", type=int, default=8, help="rows of predicted_KN per call")
    p.add_argument("--reps", type=int, default=200)
    args = parse_args(p, argv)
    from irm.chains import kendall_taus

    n, reps = (50, 3) if args.quick else (args.n, args.reps)
    rng = np.random.default_rng(0)
    true = np.round(rng.uniform(-4, 4, n), 1)
    pred = true + 3 * rng.normal(size=(args.rows, n))
    assert np.allclose(kendall_taus(true, pred), scipy_rows(true, pred), rtol=0, atol=1e-12)
    times: dict[str, list[float]] = {"scipy": [], "irm": []}
    for i in range(reps):
        for name, f in (("scipy", scipy_rows), ("irm", kendall_taus))[:: 1 if i % 2 else -1]:
            t0 = time.perf_counter()
            f(true, pred)
            times[name].append(time.perf_counter() - t0)
    speedup = ratio_median(times["scipy"], times["irm"])
    print(table(["words", "rows", "reps", "scipy ms/call", "irm ms/call", "speed-up"],
                [[n, args.rows, reps, 1e3 * median(times["scipy"]), 1e3 * median(times["irm"]), speedup]]))
    write_json(args.json, {"environment": environment(), "n": n, "rows": args.rows, "reps": reps,
                           "seconds": times, "speedup": speedup})


if __name__ == "__main__":
    main()
