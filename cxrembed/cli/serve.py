"""``cxrembed serve``: the store as a local web service (API + one page)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cxrembed.cli.common import app, console
from cxrembed.cli.store import CentreOpt, StoreArg


@app.command("serve")
def serve_command(
    store: StoreArg,
    head: Annotated[Optional[Path], typer.Option(
        "--head", help="Scores for uploads: a head folder (`cxrembed fit`) or an adapt run.")] = None,
    host: Annotated[str, typer.Option(
        "--host", help="Address to listen on; anything but loopback needs --token.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port (0: any free one).")] = 8000,
    token: Annotated[Optional[str], typer.Option(
        "--token", envvar="CXREMBED_TOKEN",
        help="Required on every API request (Authorization: Bearer T); env CXREMBED_TOKEN.")] = None,
    data_root: Annotated[Optional[Path], typer.Option(
        "--data", help="Where the stored images are now, for thumbnails (default: where encoded).")] = None,
    index: Annotated[str, typer.Option(
        "--index", help="auto (saved index, else exact scan), index, or exact.")] = "auto",
    centre: CentreOpt = "auto",
    max_upload_mb: Annotated[float, typer.Option(
        "--max-upload-mb", help="Largest image upload accepted, in MiB.")] = 32.0,
    max_k: Annotated[int, typer.Option("--max-k", help="Most neighbours one query may ask for.")] = 200,
    device: Annotated[str, typer.Option("--device", help="Device of the encoder and head.")] = "cpu",
    access_log: Annotated[bool, typer.Option("--access-log", help="Log every request.")] = False,
) -> None:
    """Serve a store on a local web page and JSON API: search by image, id or text; predict."""
    from cxrembed.serve import ServeLimits, bind, open_service, run_server, url_of

    if max_upload_mb <= 0 or max_k < 1:
        raise typer.BadParameter("--max-upload-mb and --max-k must be positive")
    sock = bind(host, port, token)
    try:
        limits = ServeLimits(max_upload_bytes=int(max_upload_mb * 2**20), max_k=max_k)
        service = open_service(store, head=head, data_root=data_root, index=index,
                               centre=centre, device=device, limits=limits)
    except BaseException:
        sock.close()
        raise
    summary = service.summary()
    url = url_of(sock)
    console.print(f"[green]serving[/] {store} ({summary['images']:,} images, index "
                  f"{summary['index']['kind']}, "
                  f"{'centred' if summary['centring']['centred'] else 'not centred'}"
                  + (f", head {head}" if head else "") + f") at [bold]{url}[/]"
                  + ("  (token required)" if token else "") + "; Ctrl-C stops", soft_wrap=True)
    run_server(service, sock, token=token, access_log=access_log)
    console.print("stopped")
