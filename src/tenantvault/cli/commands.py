"""The operator command, ``tenantvault``: it parses, calls one library function,
hands the report to :mod:`tenantvault.cli.output`, and maps tenantvault's errors
to one ``FAILED:`` line and an exit code."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import NoReturn

from tenantvault.audit.chain import Head
from tenantvault.cli import failures, output
from tenantvault.cli.basics import (
    EXIT_AUDIT_BROKEN,
    EXIT_FAILED,
    EXIT_INCOMPLETE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_UNHEALTHY,
    EXIT_USAGE,
    installed_version,
    typed_command,
)
from tenantvault.db.migration_support import MigrationOptions
from tenantvault.dev import stack as devstack
from tenantvault.errors import (
    AuditChainBroken,
    AuditError,
    DevStackError,
    InvalidInputError,
    TenantVaultError,
)
from tenantvault.ops import jobs, migrate, tokens
from tenantvault.ops.grants import app_login_grants
from tenantvault.ops.health import status
from tenantvault.rotation.options import (
    MAX_BATCH_SIZE,
    MAX_WORKERS,
    DekRotationOptions,
    KekRotationOptions,
)
from tenantvault.settings import load_settings


def _cmd_migrate(args: argparse.Namespace) -> int:
    if args.sql:
        try:
            options = MigrationOptions.from_settings(
                load_settings(), allow_data_loss=args.allow_data_loss
            )
        except TenantVaultError:  # offline SQL needs no database
            options = MigrationOptions(allow_data_loss=args.allow_data_loss)
        sql = migrate.offline_sql(
            options,
            args.revision,
            adopt=args.adopt,
            downgrade_from=args.from_revision if args.downgrade else None,
        )
        output.print_raw(sql)
        return EXIT_OK
    settings = load_settings()
    if args.downgrade:
        report = migrate.downgrade(settings, args.revision, allow_data_loss=args.allow_data_loss)
    else:
        report = migrate.upgrade(settings, args.revision, adopt=args.adopt)
    output.print_migration(report)
    return EXIT_OK


def _cmd_status(args: argparse.Namespace) -> int:
    report = status(load_settings())
    output.print_status(report)
    return EXIT_OK if report.healthy else EXIT_UNHEALTHY


def _cmd_grants(args: argparse.Namespace) -> int:
    grants = app_login_grants(load_settings(), args.app_login)
    if args.part != "dba":
        grants.checked_owner_sql()  # SQL its owner could not run is refused, not printed
    output.print_app_login_grants(grants, args.part)
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace) -> int:
    from tenantvault.dev.demo import run_demo

    report = run_demo(load_settings())
    output.print_lines(report.lines)
    return EXIT_OK if report.ok else EXIT_FAILED


def _cmd_dev(args: argparse.Namespace) -> int:
    """The dev stack's commands. Their hints name this command as it must be typed
    here (``.venv/bin/tenantvault`` when the venv is not on PATH), ``--state-dir`` too."""
    command = typed_command()
    state_dir, looked = devstack.locate_state_dir(args.state_dir)
    again = "" if args.state_dir is None else f" --state-dir {shlex.quote(str(state_dir))}"
    try:
        if args.action == "up":
            environment = devstack.up(state_dir)
            output.print_dev_up(environment, state_dir / "env", f"{command} dev env{again}")
        elif args.action == "env":
            output.print_raw(devstack.stack_env(state_dir, looked=looked).as_shell())
        elif args.action == "add-tenant":
            _dev_add_tenant(args, state_dir, looked)
        elif args.action == "reset":
            output.print_dev_reset(devstack.reset(state_dir), looked=looked)
        else:
            output.print_dev_down(devstack.down(state_dir), looked=looked)
    except DevStackError as exc:
        raise DevStackError(str(exc).replace("`tenantvault ", f"`{command} ")) from None
    return EXIT_OK


def _dev_add_tenant(args: argparse.Namespace, state_dir: Path, looked: str) -> None:
    """The tenant's row in the running dev stack's database, whatever
    TENANTVAULT_DATABASE_URL names (dev stack only); the schema is the configured one."""
    from tenantvault.dev.tenants import add_tenant, check_id, check_name

    check_id(args.tenant_id)  # usage errors before the stack is looked for
    if args.name is not None:
        check_name(args.name)
    url = devstack.stack_env(state_dir, looked=looked).variables.get("TENANTVAULT_DATABASE_URL")
    if url is None:
        raise DevStackError(
            f"the dev stack in {state_dir} runs no PostgreSQL: run `tenantvault dev up`"
        )
    schema = load_settings(database_url=url).schema_name
    output.print_tenant_row(add_tenant(url, schema, args.tenant_id, args.name))


@contextmanager
def _stop_on_interrupt() -> Iterator[threading.Event]:
    """Ctrl-C sets the event: the job stops after its current batch. A second Ctrl-C
    interrupts at once (every batch is its own transaction, so that is safe too)."""
    stop = threading.Event()

    def handler(signum: int, frame: object) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        output.print_stopping()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


def _run_exit(ok: bool, stopped: str | None) -> int:
    if stopped and stopped.startswith("interrupted"):
        return EXIT_INTERRUPTED
    if stopped:
        output.print_failed(stopped)
        return EXIT_FAILED
    return EXIT_OK if ok else EXIT_INCOMPLETE


def _cmd_rotate_status(args: argparse.Namespace) -> int:
    report = jobs.rotation_status(load_settings(), args.tenant or None)
    output.print_key_status(report, args.json)
    return EXIT_OK


def _cmd_rotate_kek(args: argparse.Namespace) -> int:
    settings = load_settings()
    options = KekRotationOptions(
        rotate=not args.no_rotate,
        raise_min_decryption_version=args.min_decryption_version,
        dry_run=args.dry_run,
        batch_size=args.batch_size,
        workers=args.workers,
    )
    progress = output.RotationOutput.choose(args.json)
    with _stop_on_interrupt() as stop, progress:
        report = jobs.rotate_kek_job(
            settings, options, stop=stop, on_progress=progress.kek, kek_ref=args.key
        )
    output.print_kek_summary(report, args.json)
    return _run_exit(report.ok, report.stopped)


def _cmd_rotate_dek(args: argparse.Namespace) -> int:
    settings = load_settings()
    options = DekRotationOptions(
        workers=args.workers,
        batch_size=args.batch_size,
        dry_run=args.dry_run,
        new_key=not args.reseal_only,
    )
    progress = output.RotationOutput.choose(args.json)
    with _stop_on_interrupt() as stop, progress:
        report = jobs.rotate_dek_job(
            settings,
            None if args.all else args.tenant,
            options,
            stop=stop,
            on_progress=progress.dek,
        )
    output.print_dek_summary(report, args.json)
    return _run_exit(report.ok, report.stopped)


def _cmd_shred(args: argparse.Namespace) -> int:
    if not (args.yes or args.dry_run):
        output.print_failed(
            f"shredding destroys every data key of tenant {args.tenant}: none of its "
            "secrets can be opened again. Rerun with --yes (or --dry-run to see the count)."
        )
        return EXIT_USAGE
    report = jobs.shred_job(load_settings(), args.tenant, dry_run=args.dry_run)
    output.print_shred(report, args.json)
    return EXIT_OK


def _cmd_tenant_key_set(args: argparse.Namespace) -> int:
    return _move_tenant_keys(args, args.key, args.cache_max_age)


def _cmd_tenant_key_unset(args: argparse.Namespace) -> int:
    return _move_tenant_keys(args, None, None)


def _move_tenant_keys(args: argparse.Namespace, key: str | None, max_age: int | None) -> int:
    progress = output.TenantKeyOutput(args.json)
    with _stop_on_interrupt() as stop:
        report = jobs.tenant_key_job(
            load_settings(),
            args.tenant,
            key,
            cache_max_age_seconds=max_age,
            batch_size=args.batch_size,
            stop=stop,
            on_progress=progress.moved,
        )
    output.print_tenant_key_summary(report, args.json)
    if report.failures and report.stopped is None:
        return EXIT_INCOMPLETE
    return _run_exit(report.ok, report.stopped)


def _cmd_tenant_key_show(args: argparse.Namespace) -> int:
    report = jobs.tenant_key_status(load_settings(), args.tenant or None)
    output.print_tenant_keys(report, args.json)
    return EXIT_OK if all(t.usable for t in report) else EXIT_UNHEALTHY


def _read_heads(path: str) -> dict[str, Head]:
    """Heads written by ``audit verify --heads-out``."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise InvalidInputError(f"--expect-heads: {path} does not exist") from None
    except OSError as exc:
        raise InvalidInputError(f"--expect-heads: cannot read {path}: {exc.strerror}") from None
    try:
        raw = json.loads(text)
        return {str(t): Head(int(h["seq"]), str(h["hash"])) for t, h in raw.items()}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        raise AuditError(
            f"--expect-heads: {path} is not a heads file written by audit verify --heads-out"
        ) from None


def _check_writable(path: Path) -> None:
    """Refuse a ``--heads-out`` file that cannot be written, before a verify that may
    take minutes: its heads would be lost at the end."""
    if path.is_dir():
        raise InvalidInputError(f"--heads-out: {path} is a directory")
    where = path if path.exists() else path.parent
    if not where.is_dir() and not path.exists():
        raise InvalidInputError(f"--heads-out: cannot write {path}: {where} does not exist")
    if not os.access(where, os.W_OK):
        raise InvalidInputError(f"--heads-out: cannot write {path}: permission denied")


def _cmd_audit_verify(args: argparse.Namespace) -> int:
    heads_out = None if args.heads_out is None else Path(args.heads_out)
    if heads_out is not None:
        _check_writable(heads_out)
    expected = None if args.expect_heads is None else _read_heads(args.expect_heads)
    report = jobs.audit_verify_job(load_settings(), args.tenant or None, expected_heads=expected)
    output.print_audit_verify(report, args.json)
    if heads_out is not None:
        try:
            output.write_heads(report.heads, heads_out)
        except OSError as exc:
            raise AuditError(f"--heads-out: cannot write {heads_out}: {exc.strerror}") from None
    return EXIT_OK if report.ok else EXIT_AUDIT_BROKEN


def _cmd_audit_prune(args: argparse.Namespace) -> int:
    expected = None if args.expect_heads is None else _read_heads(args.expect_heads)
    try:
        report = jobs.audit_prune_job(
            load_settings(),
            keep_months=args.keep_months,
            dry_run=args.dry_run,
            expected_heads=expected,
        )
    except AuditChainBroken as exc:
        output.print_failed(failures.describe(exc))
        return EXIT_AUDIT_BROKEN
    output.print_audit_prune(report)
    return EXIT_OK


def _cmd_audit_partitions(args: argparse.Namespace) -> int:
    made = jobs.audit_partitions_job(load_settings(), months_ahead=args.months_ahead)
    output.print_audit_partitions(made, args.months_ahead)
    return EXIT_OK


def _cmd_purge(args: argparse.Namespace) -> int:
    report = jobs.purge_job(
        load_settings(), older_than_days=args.older_than_days, dry_run=args.dry_run
    )
    output.print_purge(report, args.json)
    return EXIT_OK


def _cmd_tokens_refresh(args: argparse.Namespace) -> int:
    report = tokens.refresh_tokens(
        load_settings(),
        expiring_within=timedelta(seconds=args.expiring_within),
        idle=None if args.idle_days is None else timedelta(days=args.idle_days),
        tenants=args.tenant or (),
        dry_run=args.dry_run,
        progress=output.TokenProgress(args.json),
    )
    output.print_token_refresh(report, args.json)
    return EXIT_OK if report.ok else EXIT_INCOMPLETE


def _cmd_tokens_status(args: argparse.Namespace) -> int:
    report = tokens.token_status(
        load_settings(), expiring_within=timedelta(seconds=args.expiring_within)
    )
    output.print_token_status(report, args.json)
    return EXIT_INCOMPLETE if report.reconsent_required else EXIT_OK


def _expiring_within(parser: argparse.ArgumentParser, verb: str) -> None:
    parser.add_argument(
        "--expiring-within",
        type=_Count(0),
        default=900,
        metavar="SECONDS",
        help=f"{verb} access tokens expiring within this many seconds (default 900)",
    )


def _add_token_parsers(commands: argparse._SubParsersAction[_Parser]) -> None:
    parser = commands.add_parser(
        "tokens", help="keep users' OAuth grants alive; list those needing re-consent"
    )
    jobs = parser.add_subparsers(dest="tokens_command", required=True, metavar="JOB")
    refresh = jobs.add_parser(
        "refresh",
        help="refresh managed OAuth tokens that expire soon or sat idle (exit 4: "
        "re-consent needed or a refresh failed)",
    )
    _expiring_within(refresh, "refresh")
    refresh.add_argument(
        "--idle-days",
        type=_Count(1),
        default=None,
        metavar="N",
        help="also refresh tokens not refreshed for N days (providers revoke idle grants: "
        "Microsoft after 90 days)",
    )
    refresh.add_argument(
        "--tenant", action="append", metavar="T", help="only this tenant (repeatable)"
    )
    refresh.add_argument("--dry-run", action="store_true", help="report what is due, send nothing")
    refresh.add_argument("--json", action="store_true", help="JSON lines")
    refresh.set_defaults(handler=_cmd_tokens_refresh)
    status = jobs.add_parser(
        "status", help="tokens needing re-consent and those expiring (exit 4: re-consent needed)"
    )
    _expiring_within(status, "list")
    status.add_argument("--json", action="store_true", help="JSON lines")
    status.set_defaults(handler=_cmd_tokens_status)


def _add_lifecycle_parsers(commands: argparse._SubParsersAction[_Parser]) -> None:
    audit = commands.add_parser(
        "audit",
        help="verify the audit chains, keep partitions ahead, drop old months",
        description="Exit codes: 0 done; 1 failed (one FAILED: line); 2 usage; 5 an audit "
        "chain is broken (verify names every bad row; prune refuses with one FAILED: line, "
        "dropping nothing).",
    )
    jobs = audit.add_subparsers(dest="job", required=True)
    verify = jobs.add_parser("verify", help="recompute every chain; name every broken row")
    verify.add_argument("--tenant", action="append", help="only this tenant (repeatable)")
    verify.add_argument("--json", action="store_true", help="JSON lines")
    verify.add_argument(
        "--heads-out",
        metavar="FILE",
        help="write where each chain ends, checked writable before verifying (keep it where "
        "the database's owner cannot write)",
    )
    verify.add_argument(
        "--expect-heads",
        metavar="FILE",
        help="a --heads-out file of an earlier run: each head must still be on its chain",
    )
    verify.set_defaults(handler=_cmd_audit_verify)
    prune = jobs.add_parser("prune", help="drop whole months older than the retention period")
    prune.add_argument(
        "--keep-months",
        type=_positive,
        required=True,
        help="keep this many whole months before the current one",
    )
    prune.add_argument("--dry-run", action="store_true", help="report, change nothing")
    prune.add_argument(
        "--expect-heads",
        metavar="FILE",
        help="a --heads-out file of audit verify: each head must still be on its chain "
        "before anything is dropped (without it, a chain re-hashed whole passes)",
    )
    prune.set_defaults(handler=_cmd_audit_prune)
    partitions = jobs.add_parser("partitions", help="create the coming months' partitions")
    partitions.add_argument(
        "--months-ahead",
        type=_positive,
        default=24,
        help="months after the current one to have partitions for (default: 24)",
    )
    partitions.set_defaults(handler=_cmd_audit_partitions)

    purge = commands.add_parser(
        "purge", help="remove the secrets, tokens and history of long-deleted configs"
    )
    purge.add_argument(
        "--older-than-days",
        type=_positive,
        required=True,
        help="configs deleted at least this many days ago",
    )
    purge.add_argument("--dry-run", action="store_true", help="report, change nothing")
    purge.add_argument("--json", action="store_true", help="JSON lines")
    purge.set_defaults(handler=_cmd_purge)


class _Count:
    """An option's type: a whole number from ``low`` (up to ``high`` where given).
    Its refusals name the range, never an internal function."""

    def __init__(self, low: int = 1, high: int | None = None) -> None:
        self.low, self.high = low, high

    @property
    def range(self) -> str:
        return f"{self.low}..{self.high}" if self.high else f"at least {self.low}"

    def __call__(self, text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a whole number ({self.range})"
            ) from None
        if value < self.low or (self.high is not None and value > self.high):
            raise argparse.ArgumentTypeError(f"must be {self.range}, not {value}")
        return value


_positive = _Count()
_batch_size = _Count(1, MAX_BATCH_SIZE)
_workers = _Count(1, MAX_WORKERS)


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one ``FAILED:`` line (exit 2) like every other
    failure, pointing at the command's ``--help``."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"FAILED: {message} (see `{self.prog} --help`)\n")


def _add_rotation_parsers(commands: argparse._SubParsersAction[_Parser]) -> None:
    rotate = commands.add_parser(
        "rotate-keys",
        help="rotate the KEK (the transit or AWS KMS key) or tenants' data keys; show what each "
        "key protects",
        description="Exit codes: 0 done; 1 failed (one FAILED: line); 2 usage; 4 finished but "
        "incomplete (values that would not open, tenants busy in another process); "
        "130 interrupted (stopped after a batch; rerun to resume).",
    )
    jobs = rotate.add_subparsers(dest="job", required=True)

    status_parser = jobs.add_parser("status", help="per tenant: DEK versions, states, counts")
    status_parser.add_argument("--tenant", action="append", help="only this tenant (repeatable)")
    status_parser.add_argument("--json", action="store_true", help="JSON lines")
    status_parser.set_defaults(handler=_cmd_rotate_status)

    kek = jobs.add_parser("kek", help="rotate the KEK and rewrap every data key")
    kek.add_argument(
        "--no-rotate",
        action="store_true",
        help="do not make a new transit key version; rewrap to the latest (after transit "
        "rotated the key by itself)",
    )
    kek.add_argument(
        "--min-decryption-version",
        action="store_true",
        help="afterwards forbid unwrapping with older KEK versions (refused unless no data "
        "key still needs one)",
    )
    kek.add_argument(
        "--key",
        metavar="REF",
        help="a tenant's own KEK (transit:<key>) instead of the deployment's: rewrap the data "
        "keys under it to its latest version (with --no-rotate after its owner rotated it)",
    )
    kek.add_argument("--dry-run", action="store_true", help="report, change nothing")
    kek.add_argument(
        "--batch-size",
        type=_batch_size,
        default=1000,
        metavar="N",
        help=f"data keys per transaction ({_batch_size.range}; default: 1000)",
    )
    kek.add_argument(
        "--workers",
        type=_workers,
        default=1,
        metavar="N",
        help=f"threads, batches each ({_workers.range}; default: 1)",
    )
    kek.add_argument("--json", action="store_true", help="JSON lines")
    kek.set_defaults(handler=_cmd_rotate_kek)

    dek = jobs.add_parser(
        "dek", help="new data keys for tenants; re-seal what the old ones protect"
    )
    which = dek.add_mutually_exclusive_group(required=True)
    which.add_argument("--tenant", action="append", help="a tenant id (repeatable)")
    which.add_argument("--all", action="store_true", help="every tenant that has a data key")
    dek.add_argument(
        "--workers",
        type=_workers,
        default=1,
        metavar="N",
        help=f"threads, a whole tenant each ({_workers.range}; default: 1)",
    )
    dek.add_argument(
        "--batch-size",
        type=_batch_size,
        default=1000,
        metavar="N",
        help=f"rows per transaction ({_batch_size.range}; default: 1000)",
    )
    dek.add_argument(
        "--reseal-only",
        action="store_true",
        help="no new data key: re-seal values in the old format under the active key",
    )
    dek.add_argument("--dry-run", action="store_true", help="report, change nothing")
    dek.add_argument("--json", action="store_true", help="JSON lines")
    dek.set_defaults(handler=_cmd_rotate_dek)

    shred = commands.add_parser(
        "shred", help="crypto-shred a tenant: destroy its data keys (configs stay as records)"
    )
    shred.add_argument("--tenant", required=True, help="the tenant id to shred")
    shred.add_argument("--yes", action="store_true", help="yes, destroy them")
    shred.add_argument("--dry-run", action="store_true", help="report, change nothing")
    shred.add_argument("--json", action="store_true", help="JSON lines")
    shred.set_defaults(handler=_cmd_shred)


def _add_tenant_key_parsers(commands: argparse._SubParsersAction[_Parser]) -> None:
    tenant_key = commands.add_parser(
        "tenant-key",
        help="a tenant's own KEK (a customer-managed key): set, show, unset",
        description="Exit codes: 0 done; 1 failed (one FAILED: line; the KEK is checked "
        "before anything is written); 2 usage; 3 (show) a tenant's KEK is not usable now; "
        "4 finished but keys are left under another KEK (rerun); 130 interrupted (rerun "
        "to resume).",
    )
    actions = tenant_key.add_subparsers(dest="action", required=True)
    set_parser = actions.add_parser(
        "set", help="wrap the tenant's data keys by KEY from now on, and move its keys under it"
    )
    set_parser.add_argument("--tenant", required=True, help="the tenant id")
    set_parser.add_argument(
        "--key",
        required=True,
        help="the KEK: transit:<key name> (a derived key on the configured mount) or "
        "awskms:<key id or ARN>",
    )
    set_parser.add_argument(
        "--cache-max-age",
        type=_positive,
        metavar="SECONDS",
        help="cache the tenant's unwrapped data keys at most this long: the delay before a "
        "revoked key stops serving (default: TENANTVAULT_DEK_CACHE_MAX_AGE_SECONDS)",
    )
    set_parser.set_defaults(handler=_cmd_tenant_key_set)
    show = actions.add_parser(
        "show", help="each tenant's KEK, whether it is usable now, and keys left elsewhere"
    )
    show.add_argument(
        "--tenant",
        action="append",
        help="only this tenant (repeatable; default: every tenant with its own KEK or keys "
        "to move)",
    )
    show.add_argument("--json", action="store_true", help="JSON lines")
    show.set_defaults(handler=_cmd_tenant_key_show)
    unset = actions.add_parser(
        "unset", help="back to the deployment's KEK, moving the tenant's keys under it"
    )
    unset.add_argument("--tenant", required=True, help="the tenant id")
    unset.set_defaults(handler=_cmd_tenant_key_unset)
    for moving in (set_parser, unset):
        moving.add_argument(
            "--batch-size",
            type=_batch_size,
            default=100,
            metavar="N",
            help=f"data keys moved per transaction ({_batch_size.range}; default: 100)",
        )
        moving.add_argument("--json", action="store_true", help="JSON lines")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="tenantvault",
        description="Tenant-isolated, envelope-encrypted email credentials.",
        epilog="Exit codes: 0 done; 1 failed (one FAILED: line on stderr); 2 usage (one "
        "FAILED: line naming the option: a number out of its range, an unknown tenant or "
        "revision, a file that cannot be read or written); 3 status found the deployment "
        "unhealthy; 4 a rotation finished incomplete; 5 an audit chain is broken; "
        "130 interrupted.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {installed_version()}")
    commands = parser.add_subparsers(dest="command", required=True)

    m = commands.add_parser("migrate", help="upgrade (or downgrade) the database schema")
    m.add_argument("--sql", action="store_true", help="print the SQL instead of running it")
    m.add_argument("--revision", default="head", help="target revision (default: head)")
    m.add_argument(
        "--adopt",
        action="store_true",
        help="the database already has the application's tables: stamp the baseline first",
    )
    m.add_argument("--downgrade", action="store_true", help="downgrade to --revision")
    m.add_argument(
        "--from",
        dest="from_revision",
        default="head",
        metavar="R",
        help="with --sql --downgrade: the revision the database is at (default: head)",
    )
    m.add_argument(
        "--allow-data-loss",
        action="store_true",
        help="acknowledge that a downgrade deletes data the older schema cannot hold",
    )
    m.set_defaults(handler=_cmd_migrate)

    s = commands.add_parser("status", help="schema revision, tenant isolation and the KMS's state")
    s.set_defaults(handler=_cmd_status)

    g = commands.add_parser(
        "grants",
        help="print the SQL that sets up the application's login (tenant isolation kept)",
        description="Prints, for the schema's owner to run, the grants on the application's "
        "own tables and sequences, and, for a DBA, the membership in the app role. Refuses a "
        "login that could cross tenants, and the owner's part where the schema's owner does "
        "not own every table and sequence (each named).",
    )
    g.add_argument(
        "--app-login", required=True, metavar="ROLE", help="the application's login role"
    )
    g.add_argument(
        "--part",
        choices=["dba", "owner"],
        help="print only the DBA's statements or only the owner's (default: both)",
    )
    g.set_defaults(handler=_cmd_grants)

    demo = commands.add_parser("demo", help="store and load credentials end to end")
    demo.set_defaults(handler=_cmd_demo)

    _add_rotation_parsers(commands)
    _add_tenant_key_parsers(commands)
    _add_lifecycle_parsers(commands)
    _add_token_parsers(commands)

    _add_dev_parsers(commands)
    return parser


def _add_dev_parsers(commands: argparse._SubParsersAction[_Parser]) -> None:
    d = commands.add_parser(
        "dev",
        help="embedded PostgreSQL + OpenBao for development",
        description="Exit codes: 0 done; 1 failed (one FAILED: line: the stack not running, "
        "a service of it stopped, the schema not migrated, a state dir or file not yours "
        "alone); 2 usage (one FAILED: line: a malformed tenant id or name).",
    )
    state_help = (
        "default: the nearest .tenantvault/dev here or in a parent, else ./.tenantvault/dev"
    )
    # Before the action (dev --state-dir D up) or after it (dev up --state-dir D).
    d.add_argument("--state-dir", help=state_help)
    actions = d.add_subparsers(dest="action", required=True, metavar="ACTION")
    helps = {
        "up": "start PostgreSQL and OpenBao (or reuse them; on the ports they had) and "
        "print their variables",
        "down": "stop them, keeping their data and ports; returns once they have exited",
        "env": "print the variables of the running stack (fails if a service stopped)",
        "reset": "stop them and delete their data",
        "add-tenant": "add a row to the stack's tenants table (the configured schema), as "
        "the application would; a tenant that exists is left as it is",
    }
    for action, text in helps.items():
        sub = actions.add_parser(action, help=text, description=text)
        sub.add_argument("--state-dir", default=argparse.SUPPRESS, help=state_help)
        if action == "add-tenant":
            sub.add_argument("tenant_id", metavar="ID", help="the tenant's id ([A-Za-z0-9_.:-])")
            sub.add_argument("--name", help="the tenant's name (default: its id)")
        sub.set_defaults(handler=_cmd_dev)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except KeyboardInterrupt:
        output.print_failed("interrupted")
        return EXIT_INTERRUPTED
    except InvalidInputError as exc:  # an argument the database refutes: usage
        output.print_failed(failures.describe(exc))
        return EXIT_USAGE
    except Exception as exc:  # every failure is one line, never a traceback
        output.print_failed(failures.describe(exc))
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
