"""`sparseseg run`, `summarize`, `list` and `demo`: simulated active-learning experiments."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from sparseseg.cli.app import app, console, friendly, progress_bars

list_app = typer.Typer(help="List what can be named in a config.", no_args_is_help=True)
app.add_typer(list_app, name="list")


@app.command()
@friendly
def run(
    config: Annotated[Path, typer.Argument(help="Experiment YAML.")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override: key=value (dotted keys).")] = None,
) -> None:
    """Run (or resume) a simulated active-learning experiment; writes a run directory."""
    from sparseseg.config import load_config
    from sparseseg.loop.experiment import Experiment

    cfg = load_config(config, set_)
    with progress_bars() as update:
        exp = Experiment(cfg, progress=update)
        if exp.completed:
            console.print(f"resuming {cfg.out} after round {exp.completed}")
        records = exp.run()
    console.print(rounds_table({cfg.strategy.name: records}))
    console.print(f"run directory: {cfg.out}")


def rounds_table(runs: dict[str, list[dict]]) -> Table:
    """mIoU per round, one column per run."""
    table = Table(title="mIoU (%) per round")
    table.add_column("round", justify="right")
    table.add_column("labelled", justify="right")
    longest = max(runs.values(), key=len)
    supervised = any("supervised_pixels" in rec for rec in longest)  # SAM expansion: clicks + region pixels
    if supervised:
        table.add_column("supervised", justify="right")
    for name in runs:
        table.add_column(name, justify="right")
    for i, rec in enumerate(longest):
        cells = [f"{100 * r[i]['miou']:.2f}" if i < len(r) else "" for r in runs.values()]
        extra = [str(rec.get("supervised_pixels", ""))] if supervised else []
        table.add_row(str(rec["round"]), str(rec["labelled"]), *extra, *cells)
    return table


@app.command()
@friendly
def summarize(
    runs: Annotated[list[Path], typer.Argument(help="Run directories (several seeds and strategies).")],
    out: Annotated[Path | None, typer.Option(help="Also write the markdown table here.")] = None,
) -> None:
    """mIoU per round (mean ± std over seeds) per strategy, and seconds per phase, as markdown."""
    from sparseseg.compare.summary import summarize as summarize_runs

    text = summarize_runs(runs)
    console.print(text, markup=False, highlight=False)
    if out is not None:
        out.write_text(text)


@list_app.command("strategies")
def list_strategies(pattern: Annotated[str, typer.Argument(help="Shell-style filter.")] = "*") -> None:
    """Strategy names a config can use."""
    import fnmatch

    from sparseseg.selection.strategies import STRATEGIES

    for name in sorted(STRATEGIES):
        if fnmatch.fnmatch(name, pattern):
            console.print(name)


@list_app.command("backbones")
def list_backbones_cmd(pattern: Annotated[str, typer.Argument(help="Shell-style filter.")] = "*") -> None:
    """Backbone names a config can use (backbone.name): what each is, and what weights it needs."""
    from sparseseg.backbones.registry import list_backbones

    for spec in list_backbones(pattern):
        kind = "diffusion" if spec.diffusion else "deterministic"
        defaults = [f"{what} {','.join(map(str, value))}" for what, value in
                    (("timesteps", spec.default_timesteps), ("blocks", spec.default_blocks)) if value]
        console.print(f"{spec.name:<20}{kind:<15}{spec.summary}", highlight=False, markup=False, soft_wrap=True)
        console.print(f"{'':<20}weights: {spec.weights_note}" + (f"; defaults: {'; '.join(defaults)}" if defaults
                                                                  else ""), highlight=False, markup=False, soft_wrap=True)


@app.command()
@friendly
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the data, checkpoint and runs.")] = Path("demo_out"),
    rounds: Annotated[int, typer.Option(help="Active-learning rounds.")] = 6,
    steps: Annotated[int, typer.Option(help="Pretraining steps of the tiny ADM.")] = 300,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
) -> None:
    """No downloads, CPU, a few minutes: synthetic scenes, a tiny ADM pretrained on them, then
    two-stage eDALD and Random side by side."""
    from sparseseg.loop.demo import run_demo

    with progress_bars() as update:
        runs = run_demo(out, rounds=rounds, steps=steps, seed=seed, progress=update)
    console.print(rounds_table({name: recs for name, (recs, _) in runs.items()}))
    for name, (_, path) in runs.items():
        console.print(f"{name}: {path}")
