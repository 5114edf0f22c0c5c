"""The full calibration harness (issue 22, README "How far to trust a verdict"): every family of `irm.calibration`, null
and planted, at the harness's default sizes, `--worlds` worlds each (`--cheap-worlds` for the findings whose worlds take
milliseconds), written as JSON (`--json`; the committed one is irm/calibration/certified.json, which every run's
findings table quotes) and as the markdown table of benchmarks/RESULTS.md (`--markdown`).

    flock /tmp/irm-heavy.lock python benchmarks/calibration.py --worlds 100 --cheap-worlds 500 \\
        --json irm/calibration/certified.json --markdown benchmarks/results/calibration.md

Exit status 1 when a null family breaks the limits (false positives above 5%, or the upper end of the 95% interval
above 7%).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

CHEAP = ("reward", "layers")  # findings whose worlds cost milliseconds


def table(results: list[dict]) -> str:
    lines = ["| finding | family | effect | worlds | false positives / power | 95% CI | measured effect |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        kind = "FP" if r["null"] else "power"
        eff = "null" if r["null"] else f"{r['effect']:g}"
        m = r.get("measured_effect")
        lines.append(f"| {r['finding']} | {r['family']} | {eff} | {r['n']} | {kind} {100 * r['rate']:.1f}% | "
                     f"[{100 * r['ci95'][0]:.1f}, {100 * r['ci95'][1]:.1f}] | "
                     f"{'' if m is None else f'{m:+.3f}'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worlds", type=int, default=100)
    p.add_argument("--cheap-worlds", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", nargs="*", default=None, help="findings to run (default: all)")
    p.add_argument("--null-worlds", type=int, default=None, help="worlds per null family (default: --worlds)")
    p.add_argument("--nulls-only", action="store_true", help="run only the null families")
    p.add_argument("--planted-only", action="store_true", help="run only the planted families (power)")
    p.add_argument("--merge", type=Path, default=None,
                   help="a JSON of an earlier run whose families this run's replace (the rest are kept)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--markdown", type=Path, default=None)
    a = p.parse_args(argv)
    from irm.calibration import failures, families, run
    from irm.stages.calibrate import summarise

    fams = [f for f in families() if (a.only is None or f.finding in a.only) and (f.null or not a.nulls_only)
            and (not f.null or not a.planted_only)]
    start = time.time()

    def worlds(f):
        return a.cheap_worlds if f.finding in CHEAP else (a.null_worlds or a.worlds) if f.null else a.worlds

    results = run(fams, worlds, {}, a.seed,
                  progress=lambda f: print(f"{time.time() - start:7.1f}s {f.finding}: {f.name} ({f.effect:g})",
                                           file=sys.stderr, flush=True))
    if a.merge:
        earlier = json.loads(a.merge.read_text())
        ran = {(r["finding"], r["family"], r["effect"]) for r in results}
        results = [r for r in earlier["families"] if (r["finding"], r["family"], r["effect"]) not in ran] + results
        order = {(f.finding, f.name, f.effect): i for i, f in enumerate(families())}
        results.sort(key=lambda r: order.get((r["finding"], r["family"], r["effect"]), len(order)))
    out = {"command": "python benchmarks/calibration.py " + " ".join(argv or sys.argv[1:]), "families": results,
           "findings": summarise(results), "seconds": time.time() - start}
    text = table(results)
    print(text)
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))
    if a.markdown:
        a.markdown.write_text(text)
    bad = failures(results)
    for r in bad:
        print(f"FAILS: {r['finding']} / {r['family']}: {100 * r['rate']:.1f}% {r['ci95']}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
