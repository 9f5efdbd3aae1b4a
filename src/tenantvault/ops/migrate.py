"""Schema migrations as library calls; ``tenantvault migrate`` only parses and prints.

Alembic's revisions live in ``migrations/`` (shipped inside the wheel as
``tenantvault/_migrations``).
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy.exc import DBAPIError

from tenantvault.db.failures import server_message
from tenantvault.db.migration_support import (
    ALLOW_DATA_LOSS_FLAG,
    GRANTS_TABLE,
    OPTIONS_KEY,
    MigrationOptions,
    schema_qualified,
    unexpected_revoke,
)
from tenantvault.errors import MigrationError, UnknownRevisionError
from tenantvault.settings import Settings

BASELINE_REVISION = "0001_baseline"
LEGACY_TABLES = ("tenants", "users", "email_sender_identities")


def migrations_path() -> Path:
    """Where the Alembic scripts are: the checkout's ``migrations/`` or the wheel's copy."""
    checkout = Path(__file__).resolve().parents[3] / "migrations"
    if (checkout / "env.py").is_file():
        return checkout
    return Path(str(resources.files("tenantvault") / "_migrations"))


def alembic_config(
    options: MigrationOptions, *, connection: sa.Engine | sa.Connection | None = None
) -> Config:
    """An Alembic config for ``options``.

    Given an engine, the environment takes a connection of its own and runs
    each revision in its own committed transaction under an advisory lock; given
    a connection, it leaves transaction control to the caller.
    """
    config = Config(output_buffer=io.StringIO())
    config.set_main_option("script_location", str(migrations_path()))
    config.attributes[OPTIONS_KEY] = options
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def migration_engine(settings: Settings) -> sa.Engine:
    """A single-use engine whose connections resolve unqualified names in the schema."""
    return sa.create_engine(
        settings.sqlalchemy_url,
        poolclass=sa.NullPool,
        hide_parameters=True,
        connect_args={
            "connect_timeout": settings.connect_timeout_seconds,
            "options": f"-c search_path={settings.schema_name}",
        },
    )


@dataclass(frozen=True)
class MigrationReport:
    """Where the schema was before and after a migration command."""

    before: str | None
    after: str | None
    head: str


def head_revision() -> str:
    head = _script().get_current_head()
    assert head is not None
    return head


def check_revision(revision: str, flag: str = "--revision") -> None:
    """Refuse a target no revision answers to, before anything is changed.

    Relative targets (``-1``, ``head-2``) depend on where the database is: Alembic
    resolves them when it runs, and :func:`_run` turns its refusal into the same error.

    Raises:
        UnknownRevisionError: ``revision`` names no revision (the message names
            ``flag``, the option it came from, and lists the revisions).
    """
    if revision in {"head", "heads", "base"} or any(c in revision for c in "+-@:"):
        return
    script = _script()
    try:
        found = script.get_revisions(revision)
    except CommandError:
        found = ()
    if not found:
        known = ", ".join(r.revision for r in reversed(list(script.walk_revisions())))
        raise UnknownRevisionError(
            f"{flag} {revision}: no such revision (head, base, or one of: {known})"
        )


def current_revision(connection: sa.Connection, schema: str) -> str | None:
    """The revision stamped in ``schema`` (None before tenantvault's first migration)."""
    context = MigrationContext.configure(connection, opts={"version_table_schema": schema})
    return context.get_current_revision()


def _legacy_tables_present(connection: sa.Connection, schema: str) -> list[str]:
    names = set(sa.inspect(connection).get_table_names(schema=schema))
    return [table for table in LEGACY_TABLES if table in names]


def upgrade(settings: Settings, revision: str = "head", *, adopt: bool = False) -> MigrationReport:
    """Upgrade the database to ``revision``.

    Args:
        settings: where the database is and what the schema and roles are called.
        revision: the target revision (default: the newest).
        adopt: the database already has the application's tables and no
            tenantvault history: stamp the baseline first instead of creating them.

    Raises:
        MigrationError: a revision failed; it was rolled back, earlier ones stay applied.
    """
    check_revision(revision)
    options = MigrationOptions.from_settings(settings)
    engine = migration_engine(settings)
    try:
        before, present = _inspect(engine, settings.schema_name)
        if adopt and before is None:
            if present != list(LEGACY_TABLES):
                missing = sorted(set(LEGACY_TABLES) - set(present))
                raise MigrationError(f"cannot adopt: schema lacks table(s) {', '.join(missing)}")
            _run(lambda config: command.stamp(config, BASELINE_REVISION), options, engine)
        elif before is None and present:
            raise MigrationError(
                f"schema {settings.schema_name!r} already has the application's tables "
                f"({', '.join(present)}) but no tenantvault history: run with --adopt"
            )
        _run(lambda config: command.upgrade(config, revision), options, engine)
        after, _ = _inspect(engine, settings.schema_name)
    finally:
        engine.dispose()
    return MigrationReport(before=before, after=after, head=head_revision())


def _inspect(engine: sa.Engine, schema: str) -> tuple[str | None, list[str]]:
    with engine.connect() as connection:
        return current_revision(connection, schema), _legacy_tables_present(connection, schema)


def downgrade(
    settings: Settings, revision: str, *, allow_data_loss: bool = False
) -> MigrationReport:
    """Downgrade to ``revision``.

    Before anything changes, every revision on the way is asked what its downgrade
    would delete; unless ``allow_data_loss`` acknowledges it, one error names all of
    it, with counts. With it, each revision deletes what the older schema cannot hold.

    Raises:
        MigrationError: data would be lost (nothing was changed); the target is below
            the baseline (that would drop the application's own tables); a revision
            failed (it was rolled back, the ones before it stay downgraded).
    """
    check_revision(revision)
    options = MigrationOptions.from_settings(settings, allow_data_loss=allow_data_loss)
    engine = migration_engine(settings)
    try:
        before, _ = _inspect(engine, settings.schema_name)
        steps = _downgrade_steps(_script(), before, revision)
        _refuse_below_baseline(steps)
        _refuse_foreign_revokes(engine, options, steps, revision)
        if not allow_data_loss:
            _refuse_data_loss(engine, options, steps, revision)
        _run(lambda config: command.downgrade(config, revision), options, engine, downgrading=True)
        after, _ = _inspect(engine, settings.schema_name)
    finally:
        engine.dispose()
    return MigrationReport(before=before, after=after, head=head_revision())


def _script() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config(MigrationOptions()))


def _refuse_below_baseline(steps: list[str]) -> None:
    if BASELINE_REVISION in steps:
        raise MigrationError(
            f"tenantvault does not downgrade below {BASELINE_REVISION}: that would drop "
            f"the application's own tables ({', '.join(LEGACY_TABLES)})"
        )


def _downgrade_steps(script: ScriptDirectory, current: str | None, target: str) -> list[str]:
    """The revisions a downgrade from ``current`` to ``target`` undoes, newest first."""
    chain = [r.revision for r in script.walk_revisions()]  # newest first
    if current is None:
        return []
    found = script.get_revision(current)  # a full id from a prefix
    if found is None or found.revision not in chain:
        return []
    current = found.revision
    done = chain[chain.index(current) :]
    if target == "base":
        return done
    if target.startswith("-") and target[1:].isdigit():
        return done[: int(target[1:])]
    resolved = script.get_revision(target)
    if resolved is None or resolved.revision not in done:
        return []
    return done[: done.index(resolved.revision)]


def _refuse_foreign_revokes(
    engine: sa.Engine, options: MigrationOptions, steps: list[str], target: str
) -> None:
    """Refuse, before anything changes, a downgrade whose steps would run a recorded
    statement tenantvault does not write (each step checks again before it runs one)."""
    table = schema_qualified(options.schema, GRANTS_TABLE)
    with engine.connect() as connection:
        if connection.exec_driver_sql(f"SELECT to_regclass('{table}')").scalar() is None:
            return
        recorded = connection.exec_driver_sql(
            f"SELECT revision, revoke FROM {table} ORDER BY revision, revoke"
        ).all()
    for step, statement in recorded:
        reason = unexpected_revoke(statement, step, options) if step in steps else None
        if reason is not None:
            raise MigrationError(f"downgrade to {target} refused, nothing was changed: {reason}")


def _refuse_data_loss(
    engine: sa.Engine, options: MigrationOptions, steps: list[str], target: str
) -> None:
    """Count, as the migrator role, what each step's downgrade would delete."""
    script = _script()
    found = []
    with engine.connect() as connection, connection.begin():
        try:
            connection.exec_driver_sql(f'SET LOCAL ROLE "{options.migrator_role}"')
        except DBAPIError:
            raise MigrationError(
                f"this login may not SET ROLE {options.migrator_role}, which a downgrade "
                "needs to see every tenant's rows: run it as the migration owner"
            ) from None
        for step in steps:
            module = script.get_revision(step).module
            for blocker in getattr(module, "blockers", lambda _: [])(options):
                count = connection.exec_driver_sql(f"SELECT count(*) {blocker.rows}").scalar_one()
                if count:
                    found.append(f"{count} {blocker.what} [{step}]")
    if found:
        raise MigrationError(
            f"downgrade to {target} refused, nothing was changed: it would delete "
            f"{'; '.join(found)}. Back them up, then rerun with --allow-data-loss"
        )


def offline_sql(
    options: MigrationOptions,
    revision: str = "head",
    *,
    adopt: bool = False,
    downgrade_from: str | None = None,
) -> str:
    """The SQL a migration would run, rendered for review (no database is read).

    Args:
        options: schema and role names, and whether a downgrade may delete data.
        revision: the target revision.
        adopt: render the adoption of the application's existing database: a guard
            that it holds the application's tables and no tenantvault history, the
            stamp of the baseline, then the upgrade from the baseline.
        downgrade_from: render a downgrade from this revision (the database's
            current one) to ``revision``. Each refusal is a guard in the SQL itself,
            checked when the script runs.

    Raises:
        MigrationError: an unknown revision, or a downgrade below the baseline.
    """
    check_revision(revision)
    if downgrade_from is not None:
        check_revision(downgrade_from, "--from")
        start = head_revision() if downgrade_from == "head" else downgrade_from
        steps = _downgrade_steps(_script(), start, revision)
        _refuse_below_baseline(steps)
        # The guards' hints name the target as an absolute revision: a relative one
        # ("-2") would mean another target from where the script stopped.
        below = _script().get_revision(steps[-1]).down_revision if steps else None
        target = below if isinstance(below, str) else revision
        options = dataclasses.replace(options, rendered_downgrade_to=target)
        header = (
            f"-- A downgrade from {start} to {revision}: run it only on a database at {start}.\n"
            + (
                "-- It deletes what the older schema cannot hold (--allow-data-loss).\n\n"
                if options.allow_data_loss
                else "-- Each step refuses, changing nothing, where it would delete data; the\n"
                "-- steps above it stay undone, and its hint gives the command that renders\n"
                "-- the rest from there (--from) with --allow-data-loss.\n\n"
            )
        )
        return header + _render(
            options, lambda c: command.downgrade(c, f"{start}:{revision}", sql=True)
        )
    if adopt:
        return (
            _adoption_guard(options.schema)
            + _render(options, lambda c: command.stamp(c, BASELINE_REVISION, sql=True))
            + _render(
                options, lambda c: command.upgrade(c, f"{BASELINE_REVISION}:{revision}", sql=True)
            )
        )
    return _render(options, lambda c: command.upgrade(c, revision, sql=True))


def _render(options: MigrationOptions, step: Callable[[Config], object]) -> str:
    config = alembic_config(options)
    try:
        step(config)
    except CommandError as exc:
        raise _refusal(exc) from None
    buffer = config.output_buffer
    assert isinstance(buffer, io.StringIO)
    return buffer.getvalue()


def _adoption_guard(schema: str) -> str:
    """What ``upgrade(adopt=True)`` checks before it stamps, as SQL that stops the script."""
    quoted = ", ".join(f"'{t}'" for t in LEGACY_TABLES)
    names = ", ".join(LEGACY_TABLES)
    return (
        "-- Adoption of the application's existing database: stop unless it holds the\n"
        "-- application's tables and no tenantvault history yet.\n"
        "DO $$ BEGIN\n"
        f"  IF to_regclass('{schema}.alembic_version') IS NOT NULL THEN\n"
        f"    RAISE EXCEPTION 'schema {schema} already has tenantvault history: "
        "run the upgrade, not the adoption';\n"
        "  END IF;\n"
        f"  IF (SELECT count(*) FROM pg_tables WHERE schemaname = '{schema}' "
        f"AND tablename IN ({quoted})) <> {len(LEGACY_TABLES)} THEN\n"
        f"    RAISE EXCEPTION 'schema {schema} lacks the application''s tables ({names})';\n"
        "  END IF;\n"
        "END $$;\n\n"
    )


def _run(
    step: Callable[[Config], object],
    options: MigrationOptions,
    engine: sa.Engine,
    *,
    downgrading: bool = False,
) -> None:
    try:
        step(alembic_config(options, connection=engine))
    except DBAPIError as exc:
        primary = server_message(exc) or type(exc.orig).__name__
        # The revisions prefix their own refusals for the server's log; here they are ours.
        primary = primary.removeprefix("tenantvault: ")
        hint = getattr(getattr(exc.orig, "diag", None), "message_hint", None) or ""
        # The revisions' hint names Alembic's flag; this is tenantvault's command.
        hint = hint.replace(f"-x {ALLOW_DATA_LOSS_FLAG}=true", "--allow-data-loss")
        where = _stopped_at(engine, options.schema, downgrading=downgrading)
        raise MigrationError(f"{primary}{f' ({hint})' if hint else ''}; {where}") from exc
    except CommandError as exc:
        raise _refusal(exc) from None


def _refusal(exc: CommandError) -> MigrationError:
    """Alembic's refusal as ours: a relative target that does not resolve from where
    the database is (``-3`` three steps above base) is a bad ``--revision``."""
    text = " ".join(str(exc).split())
    if text.startswith("Relative revision"):
        return UnknownRevisionError(f"--revision: {text}")
    return MigrationError(text)


def _stopped_at(engine: sa.Engine, schema: str, *, downgrading: bool) -> str:
    """Which revision failed, and where that left the database (each revision is one
    transaction, so the failed one was rolled back and the ones before it stay)."""
    try:
        with engine.connect() as connection:
            current = current_revision(connection, schema)
    except DBAPIError:
        return "the database's revision could not be read"
    chain = [r.revision for r in reversed(list(_script().walk_revisions()))]  # oldest first
    if downgrading:
        failed = current
    else:
        following = chain.index(current) + 1 if current in chain else 0
        failed = chain[following] if following < len(chain) else None
    return f"{failed or 'a revision'} failed and was rolled back; the database is at " + (
        current or "none"
    )
