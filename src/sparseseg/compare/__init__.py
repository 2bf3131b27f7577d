"""Strategy comparisons: every strategy x seed (x swept value) as ordinary run directories, then
the paper's tables and curves from them, and every strategy paired seed by seed with a reference.

Layout of a comparison folder::

    DIR/<strategy>_s<seed>/            a normal run directory (`sparseseg run`)
    DIR/<strategy>_s<seed>.log         its log (subprocess output, or the traceback of a failure)
    DIR/<key>=<value>/<strategy>_s<seed>/   the same, one folder per swept value
    DIR/summary.md, summary.csv, curves.png

Modules, one job each (data flows down the list):

    plan.py      RunSpec, sweeps, plan_comparison: every run configured before anything runs
    rundir.py    read_rounds: the one reader of a run directory's rounds.jsonl
    runner.py    run_comparison: skip finished runs, resume partial ones, in process or subprocesses
    stats.py     mean_std, Table 1's gain, rounds to reach, paired differences with a t interval
    paper.py     the paper's published figures, as data
    results.py   StrategyResult, Comparison: the finished runs and what the tables derive from them
    render.py    summary.md and summary.csv
    plots.py     curves.png
    harness.py   compare(): plan, run, summarize
    summary.py   summarize(): the `sparseseg summarize` table of any run directories

See docs/compare.md for what each output holds.
"""

from sparseseg.compare.harness import CompareResult, compare, write_summary
from sparseseg.compare.plan import (
    RESERVED_KEYS,
    Point,
    RunSpec,
    parse_list,
    parse_sweeps,
    plan_comparison,
    point_dir,
    resolve_reference,
)
from sparseseg.compare.plots import plot_curves
from sparseseg.compare.render import CSV_FIELDS, render_csv, render_markdown
from sparseseg.compare.results import (
    PAIR_PREFIXES,
    TARGETS,
    Comparison,
    Paired,
    Reach,
    StrategyResult,
    collect_results,
    pair_with,
    reach,
    summarize_comparison,
)
from sparseseg.compare.rundir import read_rounds
from sparseseg.compare.runner import RunOutcome, run_comparison, run_status, worker_command
from sparseseg.compare.stats import (
    PairedDifference,
    curve_mean,
    mean_std,
    paired_difference,
    rounds_to_reach,
    t_quantile,
    table1_gain,
)
from sparseseg.compare.summary import summarize

__all__ = [
    "CSV_FIELDS", "PAIR_PREFIXES", "RESERVED_KEYS", "TARGETS", "CompareResult", "Comparison", "Paired",
    "PairedDifference", "Point", "Reach", "RunOutcome", "RunSpec", "StrategyResult", "collect_results", "compare",
    "curve_mean", "mean_std", "pair_with", "paired_difference", "parse_list", "parse_sweeps", "plan_comparison",
    "plot_curves", "point_dir", "reach", "read_rounds", "render_csv", "render_markdown", "resolve_reference",
    "rounds_to_reach", "run_comparison", "run_status", "summarize", "summarize_comparison", "t_quantile",
    "table1_gain", "worker_command", "write_summary",
]
