"""`sparseseg labelstudio connect|push|pull`: label with a live Label Studio server, no files by hand.

A thin layer over `sparseseg.annotate.labelstudio`. The token comes from `--token` or the
environment variable LABEL_STUDIO_API_KEY and is never written down; the URL is stored by
`connect` and can be overridden with `--url`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sparseseg.cli.app import app, console, err_console, friendly, progress_bars

labelstudio_app = typer.Typer(help="Label with a live Label Studio server: connect, push each round, pull answers.",
                              no_args_is_help=True)
app.add_typer(labelstudio_app, name="labelstudio")

ProjectArg = Annotated[Path, typer.Argument(help="The project folder (made by `sparseseg init`).")]
TokenOpt = Annotated[str | None, typer.Option(
    help="Personal access token (or legacy token); default: the environment variable LABEL_STUDIO_API_KEY.")]
UrlOpt = Annotated[str | None, typer.Option(help="Label Studio's address; default: the one `connect` stored.")]


def _say(text: str) -> None:
    console.print(text, soft_wrap=True, markup=False, highlight=False)


def _open(project: Path, url: str | None, token: str | None):
    from sparseseg.annotate.labelstudio.client import LabelStudio, resolve_token
    from sparseseg.annotate.project import Project
    from sparseseg.errors import SparsesegError

    proj = Project(project)
    if url is None:
        link = proj.store.ls_link()
        if link is None:
            raise SparsesegError(f"{project}: not connected to Label Studio; run `sparseseg labelstudio connect "
                                 f"{project} --url URL` first")
        url = link.url
    return proj, LabelStudio(url, resolve_token(token))


@labelstudio_app.command("connect")
@friendly
def connect_cmd(
    project: ProjectArg,
    url: Annotated[str, typer.Option(help="Label Studio's address, e.g. http://localhost:8080.")],
    token: TokenOpt = None,
    title: Annotated[str | None, typer.Option(help="Title of a new Label Studio project.")] = None,
    storage_path: Annotated[str | None, typer.Option(
        help="The images folder as the Label Studio server sees it (default: PROJECT/data/train/images).")] = None,
) -> None:
    """Create (or reuse) the Label Studio project with our labelling config and record the link."""
    from sparseseg.annotate.labelstudio.client import LabelStudio, resolve_token
    from sparseseg.annotate.labelstudio.sync import connect
    from sparseseg.annotate.project import Project

    proj = Project(project)
    client = LabelStudio(url, resolve_token(token))
    result = connect(proj, client, title=title, storage_path=storage_path)
    how = "created" if result.created else "reusing"
    _say(f"{how} Label Studio project {result.link.project} at {result.link.url} (as {result.user}, "
         f"{client.kind} token)")
    if result.storage_path:
        _say(f"images served by local-files storage {result.link.storage} from {result.storage_path}")
    _say(f"next: sparseseg labelstudio push {project}")


@labelstudio_app.command("push")
@friendly
def push_cmd(
    project: ProjectArg,
    url: UrlOpt = None,
    token: TokenOpt = None,
    round: Annotated[int | None, typer.Option(help="Round to push (default: the latest).")] = None,
    masks: Annotated[bool, typer.Option(help="Send the current head's masks as pre-annotations.")] = True,
) -> None:
    """Push a round's queries as tasks (each image's points, and the head's mask); never twice."""
    from sparseseg.annotate.labelstudio.sync import push

    proj, client = _open(project, url, token)
    with progress_bars() as update:
        result = push(proj, client, round, masks=masks, progress=update)
    _print_push(result)


def _print_push(result) -> None:
    masks = ", with the head's masks" if result.predicted else ""
    _say(f"round {result.round}: {len(result.created)} task(s) created{masks}, {len(result.recovered)} found on the "
         f"server and recorded, {result.already} pushed before")
    if result.missing:
        err_console.print(f"warning: task(s) {', '.join(map(str, result.missing))} were pushed but are no longer on "
                          "the server", markup=False, highlight=False, soft_wrap=True)


@labelstudio_app.command("pull")
@friendly
def pull_cmd(
    project: ProjectArg,
    url: UrlOpt = None,
    token: TokenOpt = None,
    watch: Annotated[bool, typer.Option(
        "--watch", help="Keep polling; when a round is complete, train, query the next round and push it.")] = False,
    interval: Annotated[float, typer.Option(help="Seconds between polls with --watch.")] = 10.0,
    max_rounds: Annotated[int | None, typer.Option(help="With --watch: stop after pushing this many new rounds.")] = None,
    timeout: Annotated[float | None, typer.Option(help="With --watch: stop after this many seconds.")] = None,
    replace: Annotated[bool, typer.Option(help="Let changed answers replace the stored ones.")] = False,
    masks: Annotated[bool, typer.Option(help="With --watch: send the head's masks with new tasks.")] = True,
) -> None:
    """Import the submitted answers (all or nothing); with --watch, run the loop round after round."""
    from sparseseg.annotate.labelstudio.sync import pull
    from sparseseg.annotate.labelstudio.watch import watch as run_watch

    proj, client = _open(project, url, token)
    if not watch:
        result = pull(proj, client, replace=replace)
        _print_pull(result)
        return
    with console.status("starting") as line:
        def show(s) -> None:
            detail = f" ({s.detail})" if s.detail else ""
            line.update(f"round {s.round}: {s.answered} answered / {s.pending} pending; {s.phase}{detail}")

        result = run_watch(proj, client, max_rounds=max_rounds, timeout=timeout, interval=interval,
                           replace=replace, masks=masks, on_status=show, on_event=_say)
    _say(f"stopped ({result.reason}): {len(result.rounds)} new round(s) pushed"
         + (f" ({', '.join(map(str, result.rounds))})" if result.rounds else ""))


def _print_pull(result) -> None:
    from sparseseg.annotate.importers import SKIP_LABEL

    if result.imported is None:
        _say("no submitted annotation on the pushed tasks yet")
        return
    i = result.imported
    if i.already is not None:
        _say(f"nothing new ({result.tasks} annotated task(s), already imported as import {i.already[0]})")
        return
    _say(f"{result.file}: {i.new} new answers ({i.skips} of them '{SKIP_LABEL}'), {i.replaced} replaced, "
         f"{i.unchanged} unchanged, {i.unanswered} points still unanswered")
