"""`kdistill keys ...`: the API keys and webhook signing secrets of a kdistill database, read and written
directly (no server)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from app.cli.common import Output, OutputOption, _emit_json, console, keys_cli


@keys_cli.command("create")
def keys_create(
    tenant: str = typer.Option(..., help="the tenant the key acts for (created if new)"),
    name: str = typer.Option("", help="a label to recognise the key by"),
    data_dir: Path | None = typer.Option(None, "--data-dir", show_default=False,
                                         help="data dir of `kdistill serve` "
                                              "(default: KDISTILL_DATA_DIR, else kdistill-data)"),
    database_url: str | None = typer.Option(None, "--database-url", show_default=False,
                                            help="(default: KDISTILL_DATABASE_URL, else SQLite in the data dir)"),
) -> None:
    """Create an API key and print it (only it, on stdout: KEY=$(kdistill keys create --tenant t))."""
    from app.db import session_scope
    from app.keys import create_key

    url = _keys_database(data_dir, database_url)
    with session_scope(url) as session:
        key = create_key(session, tenant, name)
    console.print(f"created an API key for tenant [bold]{tenant}[/]; it is shown only now")
    typer.echo(key)


def _keys_database(data_dir: Path | None, database_url: str | None) -> str:
    """The database of `kdistill serve` (or of the settings), migrated to the current schema."""
    from app.migrate import upgrade
    from app.settings import Settings

    overrides: dict[str, Any] = {}
    if data_dir is not None:
        overrides["data_dir"] = data_dir.expanduser().resolve()
    if database_url is not None:
        overrides["database_url"] = database_url
    settings = Settings(**overrides)
    url = settings.resolved_database_url
    if url.startswith("sqlite"):
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(url)
    return url


KeysDataDir = Annotated[Path | None, typer.Option("--data-dir", show_default=False,
                                                  help="data dir of `kdistill serve` (default: KDISTILL_DATA_DIR)")]
KeysDatabase = Annotated[str | None, typer.Option("--database-url", show_default=False,
                                                  help="(default: KDISTILL_DATABASE_URL, else SQLite in the data dir)")]


@keys_cli.command("list")
def keys_list(data_dir: KeysDataDir = None, database_url: KeysDatabase = None,
              output: OutputOption = Output.table) -> None:
    """List API keys (their id and first characters, never the key)."""
    from sqlalchemy import select

    from app.db import session_scope
    from app.models import ApiKey, Tenant

    def when(t: Any) -> str | None:
        return f"{t:%Y-%m-%dT%H:%M:%S}Z" if t else None

    with session_scope(_keys_database(data_dir, database_url)) as s:
        rows = [{"id": key.id, "tenant": tenant.name, "name": key.name or None, "starts_with": key.prefix,
                 "created": when(key.created_at), "last_used": when(key.last_used_at),
                 "revoked": when(key.revoked_at)}
                for key, tenant in s.execute(select(ApiKey, Tenant).join(Tenant).order_by(ApiKey.created_at))]
    if output is Output.json:
        _emit_json(rows)
        return
    # one line per key, tab-separated, so that scripts can read it too
    typer.echo("\t".join(("id", "tenant", "name", "starts_with", "created", "last_used", "revoked")))
    for r in rows:
        typer.echo("\t".join("-" if not v else f"{v[:16]}Z" if k in ("created", "last_used", "revoked") else v
                             for k, v in r.items()))


@keys_cli.command("webhook-secret")
def keys_webhook_secret(
    tenant: str | None = typer.Option(None, "--tenant", show_default=False,
                                      help="the tenant (default: local, the tenant of a server without API keys)"),
    rotate: bool = typer.Option(False, "--rotate", help="replace the secret by a new one: receivers must switch to "
                                "it, as deliveries are signed with the new one from now on"),
    data_dir: KeysDataDir = None,
    database_url: KeysDatabase = None,
) -> None:
    """Print the tenant's webhook signing secret (only it, on stdout), made on first use: receivers of
    callback_url verify the Kdistill-Signature header with it."""
    from app.db import session_scope
    from app.keys import LOCAL_TENANT, webhook_secret

    name = tenant or LOCAL_TENANT
    with session_scope(_keys_database(data_dir, database_url)) as session:
        secret = webhook_secret(session, name, rotate=rotate)
    console.print(f"{'a new' if rotate else 'the'} webhook signing secret of tenant [bold]{escape(name)}[/]")
    typer.echo(secret)


@keys_cli.command("revoke")
def keys_revoke(key_id: str = typer.Argument(..., help="the key's id from `kdistill keys list`"),
                data_dir: KeysDataDir = None, database_url: KeysDatabase = None) -> None:
    """Revoke an API key: the API refuses it within seconds (its lookups are cached for 10 s)."""
    from app.db import session_scope
    from app.models import ApiKey, utcnow

    with session_scope(_keys_database(data_dir, database_url)) as s:
        key = s.get(ApiKey, key_id)
        if key is None:
            console.print(f"[red]error[/] no API key with id {key_id!r}; see `kdistill keys list`")
            raise typer.Exit(1)
        key.revoked_at = key.revoked_at or utcnow()
    console.print(f"revoked {key_id}")
