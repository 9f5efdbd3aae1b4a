"""The operator command, ``tenantvault``. It parses, calls one library function,
prints the report, and maps tenantvault's errors to one ``FAILED:`` line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from tenantvault import devstack, migrate
from tenantvault.errors import TenantVaultError
from tenantvault.migration_support import MigrationOptions
from tenantvault.settings import load_settings
from tenantvault.status import StatusReport, status

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNHEALTHY = 3


def _print_status(report: StatusReport) -> int:
    state = "up to date" if report.up_to_date else f"behind (head is {report.head})"
    print(f"database      {report.database} (PostgreSQL {report.server_version})")
    print(f"schema        revision {report.revision or 'none'}: {state}")
    for table in report.tables:
        rls = "RLS forced" if table.row_level_security and table.forced else "RLS NOT FORCED"
        print(
            f"  {table.name:<24} {rls}, {table.policies} policies, "
            f"{table.rows_visible_to_app_without_tenant} rows visible to the app role "
            "without a tenant"
        )
    vault = report.vault
    if vault is not None:
        if vault.reachable:
            transit = "transit mounted" if vault.transit_mounted else "transit NOT mounted"
            print(f"vault         {vault.address}: reachable, {transit}")
        else:
            print(f"vault         {vault.address or '-'}: unreachable ({vault.detail})")
    healthy = report.up_to_date and report.isolated and bool(vault and vault.reachable)
    return EXIT_OK if healthy else EXIT_UNHEALTHY


def _cmd_migrate(args: argparse.Namespace) -> int:
    if args.sql:
        try:
            options = MigrationOptions.from_settings(load_settings())
        except TenantVaultError:
            options = MigrationOptions()  # offline SQL needs no database
        sys.stdout.write(migrate.offline_sql(options, args.revision))
        return EXIT_OK
    settings = load_settings()
    if args.downgrade:
        report = migrate.downgrade(settings, args.revision, allow_data_loss=args.allow_data_loss)
    else:
        report = migrate.upgrade(settings, args.revision, adopt=args.adopt)
    print(f"schema revision: {report.before or 'none'} -> {report.after or 'none'}")
    return EXIT_OK


def _cmd_status(args: argparse.Namespace) -> int:
    return _print_status(status(load_settings()))


def _cmd_demo(args: argparse.Namespace) -> int:
    from tenantvault.demo import run_demo

    report = run_demo(load_settings())
    print("\n".join(report.lines))
    return EXIT_OK if report.ok else EXIT_FAILED


def _cmd_dev(args: argparse.Namespace) -> int:
    state_dir = Path(args.state_dir)
    if args.action == "up":
        sys.stdout.write(devstack.up(state_dir).as_shell())
        print(f'# written to {state_dir / "env"}: eval "$(tenantvault dev env)"', file=sys.stderr)
    elif args.action == "env":
        sys.stdout.write(devstack.stack_env(state_dir).as_shell())
    else:
        stopped = devstack.down(state_dir)
        print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tenantvault", description="Tenant-isolated, envelope-encrypted email credentials."
    )
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
        "--allow-data-loss",
        action="store_true",
        help="acknowledge that a downgrade deletes data the older schema cannot hold",
    )
    m.set_defaults(handler=_cmd_migrate)

    s = commands.add_parser("status", help="schema revision, tenant isolation and Vault state")
    s.set_defaults(handler=_cmd_status)

    demo = commands.add_parser("demo", help="store and load credentials end to end")
    demo.set_defaults(handler=_cmd_demo)

    d = commands.add_parser("dev", help="embedded PostgreSQL + OpenBao for development")
    d.add_argument("action", choices=["up", "down", "env"])
    d.add_argument("--state-dir", default=str(devstack.DEFAULT_STATE_DIR))
    d.set_defaults(handler=_cmd_dev)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except TenantVaultError as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("FAILED: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
