"""A live Label Studio loop: connect a project, push each round's queries as tasks, pull the answers.

    client.py  Label Studio's HTTP API through `requests`; personal access tokens (JWT, Bearer) and
               legacy tokens (Token); the token is never stored
    brush.py   masks as brush regions (Label Studio's RLE), for the head's pre-annotations
    sync.py    connect, push, pull (pull imports through `Project.import_file`)
    watch.py   `pull --watch`: poll, and when a round is complete train, query and push the next

The link (server URL, Label Studio project id) and every pushed task are recorded in the project's
database (tables `ls_links`, `ls_tasks`). The commands are in `sparseseg/cli/labelstudio.py`;
docs/annotation.md walks a team through them.
"""
