"""Where Optuna keeps the sweeps' studies: in the service's own database, apart from the service's tables.

Optuna creates and versions its tables itself (`studies`, `trials`, `trial_params`, `trial_values`,
`trial_intermediate_values`, `version_info`, ...), and it versions them with Alembic and Alembic's default
table, `alembic_version`, the very table this service's migrations use (optuna/storages/_rdb/storage.py,
`_VersionManager`: a database whose `alembic_version` holds our revision would read to Optuna as an
incompatible Optuna schema, and an empty one would be stamped with Optuna's revision, which our
`alembic upgrade` then cannot find). So Optuna never shares a namespace with us:

- PostgreSQL: schema `optuna` (created by migration 0005), and Optuna's connections name only that schema
  in their `search_path`. The option is part of the storage URL, not only of the engine, so that Optuna's
  own `optuna storage upgrade` (which builds its Alembic from the URL) stays in that schema too.
- SQLite: a sibling file, `<name>.optuna<suffix>` beside the service's database. SQLite has no schemas; an
  ATTACHed database is a second file all the same, and would need attaching on every connection and
  schema-qualified Optuna tables. Back the two files up together.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import make_url

if TYPE_CHECKING:
    import optuna

OPTUNA_SCHEMA = "optuna"  # the same name as in migrations/versions/0005_sweeps.py
log = logging.getLogger("kdistill.studies")


class StudyStorageError(RuntimeError):
    """The service's database cannot hold Optuna's studies (an in-memory SQLite, an unsupported backend)."""


def storage_url(database_url: str) -> str:
    """The URL of Optuna's storage for the service's database at `database_url`."""
    url = make_url(database_url)
    backend = url.get_backend_name()
    if backend == "postgresql":
        options = str(url.query.get("options") or "")
        return url.update_query_dict({"options": f"{options} -csearch_path={OPTUNA_SCHEMA}".strip()}) \
            .render_as_string(hide_password=False)
    if backend == "sqlite":
        database = url.database or ""
        if database in ("", ":memory:") or database.startswith("file:"):
            raise StudyStorageError("sweeps keep their Optuna studies in a file next to the service's database; "
                                    f"an in-memory SQLite database ({database_url!r}) has no such place")
        path = Path(database)
        return url.set(database=str(path.with_name(f"{path.stem}.optuna{path.suffix or '.db'}"))) \
            .render_as_string(hide_password=False)
    raise StudyStorageError(f"sweeps need PostgreSQL or SQLite; the database is {backend}")


@lru_cache(maxsize=16)
def storage_for(database_url: str) -> optuna.storages.RDBStorage:
    """Optuna's storage for the service's database (one per process: it holds a connection pool)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per told trial is Optuna's default
    url = storage_url(database_url)
    kwargs: dict[str, Any] = {"pool_pre_ping": True, "connect_args": {"connect_timeout": 5}} \
        if url.startswith("postgresql") else {"connect_args": {"timeout": 30}}
    return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)


def sampler(seed: int, trial_number: int) -> optuna.samplers.BaseSampler:
    """TPE, seeded per trial: every pass (in any API process) builds a new sampler, and a sampler seeded
    the same way each time would draw its first random trials again and again."""
    import optuna

    return optuna.samplers.TPESampler(seed=(seed * 1_000_003 + trial_number) % 2**32, constant_liar=True)


def pruner(enabled: bool, startup_trials: int, warmup_epochs: int) -> optuna.pruners.BasePruner:
    """Median pruning over epochs (steps are 1-based epochs: none of the first `warmup_epochs` prunes)."""
    import optuna

    if not enabled:
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=startup_trials, n_warmup_steps=warmup_epochs + 1)


def open_study(database_url: str, name: str, seed: int, study_pruner: optuna.pruners.BasePruner) -> optuna.Study:
    """The study `name` (maximising), created on first use."""
    import optuna

    storage = storage_for(database_url)
    try:
        study = optuna.load_study(study_name=name, storage=storage, pruner=study_pruner)
    except KeyError:
        study = optuna.create_study(study_name=name, storage=storage, direction="maximize", pruner=study_pruner,
                                    load_if_exists=True)
    study.sampler = sampler(seed, 0)
    return study
