"""Everything the ``tenantvault`` command prints: progress and reports (a rich
progress bar on a terminal, plain lines when not, JSON lines with ``--json``) and
the one ``FAILED:`` line. Reports hold ids, versions and counts only, so nothing
here can print a secret."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as RichProgress

from tenantvault.audit.chain import AuditVerifyReport, Head, PruneReport
from tenantvault.dev.stack import ResetReport, StackEnv
from tenantvault.dev.tenants import TenantRow
from tenantvault.ops.grants import AppLoginGrants
from tenantvault.ops.health import StatusReport
from tenantvault.ops.migrate import MigrationReport
from tenantvault.ops.purge import PurgeReport
from tenantvault.ops.tokens import TokenOutcome, TokenRefreshReport, TokenStatusReport
from tenantvault.rotation.dek import DekRotationReport, Progress, TenantRotation
from tenantvault.rotation.kek import KekProgress, KekRotationReport
from tenantvault.rotation.shred import ShredReport
from tenantvault.rotation.status import SEALS_WARNING, KeyStatusReport
from tenantvault.rotation.tenantkek import KekProgress as TenantKekProgress
from tenantvault.rotation.tenantkek import TenantKekReport, TenantKekStatus


def _json_line(out: TextIO, event: str, payload: object) -> None:
    if dataclasses.is_dataclass(payload) and not isinstance(payload, type):
        body: dict[str, Any] = dataclasses.asdict(payload)
    else:
        assert isinstance(payload, dict)
        body = payload
    out.write(json.dumps({"event": event, **body}, default=str) + "\n")
    out.flush()


def _tenant_line(t: TenantRotation) -> str:
    versions = f"v{t.from_version} -> v{t.to_version}" if t.to_version else ""
    retired = f", retired {', '.join(f'v{v}' for v in t.retired)}" if t.retired else ""
    left = f", {t.remaining} values still on an older key" if t.remaining else ""
    resealed = sum(t.resealed.values())
    if t.reason:
        return f"tenant {t.tenant_id}: {t.outcome}: {t.reason}; skipped"
    return f"tenant {t.tenant_id}: {t.outcome} {versions}, {resealed} values{retired}{left}"


class RotationOutput:
    """Progress for one run: ``mode`` is "rich", "plain" or "json"."""

    def __init__(self, mode: str, out: TextIO | None = None) -> None:
        self.mode = mode
        self.out = out or sys.stdout
        self._bar: RichProgress | None = None
        self._task: Any = None

    @classmethod
    def choose(cls, json_lines: bool, out: TextIO | None = None) -> RotationOutput:
        out = out or sys.stdout
        if json_lines:
            return cls("json", out)
        return cls("rich" if out.isatty() else "plain", out)

    def __enter__(self) -> RotationOutput:
        if self.mode == "rich":
            self._bar = RichProgress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                transient=False,
            )
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def _advance(self, description: str, completed: int, total: int) -> None:
        assert self._bar is not None
        if self._task is None:
            self._task = self._bar.add_task(description, total=total)
        self._bar.update(self._task, description=description, completed=completed, total=total)

    def dek(self, event: Progress) -> None:
        if self.mode == "json":
            kind = "tenant" if event.finished else "batch"
            payload = event.finished if event.finished else event
            _json_line(self.out, kind, payload)
        elif self.mode == "rich":
            label = f"{event.tenant_id} {event.column or 'done'}"
            self._advance(label, event.tenants_done, event.tenants_total)
            if event.finished:
                assert self._bar is not None
                self._bar.console.print(_tenant_line(event.finished))
        elif event.finished:
            self.out.write(_tenant_line(event.finished) + "\n")
            self.out.flush()

    def kek(self, event: KekProgress) -> None:
        if self.mode == "json":
            _json_line(self.out, "batch", event)
        elif self.mode == "rich":
            self._advance("rewrapping data keys", event.rewrapped, event.total)
        else:
            self.out.write(f"rewrapped {event.rewrapped} of {event.total} data keys\n")
            self.out.flush()


def print_dek_summary(
    report: DekRotationReport, json_lines: bool, out: TextIO | None = None
) -> None:
    out = out or sys.stdout
    if json_lines:
        for item in report.unopenable:
            _json_line(out, "unopenable", item)
        _json_line(
            out,
            "summary",
            {
                "dry_run": report.dry_run,
                "tenants": len(report.tenants),
                "resealed": report.resealed,
                # A dry run counts values; it opens none, so it cannot know which fail.
                "unopenable": None if report.dry_run else len(report.unopenable),
                "stopped": report.stopped,
                "ok": report.ok,
                "legacy_closed": report.legacy_closed,
            },
        )
        return
    for item in report.unopenable:
        out.write(
            f"could not open: tenant {item.tenant_id} {item.column} row {item.row} ({item.error})\n"
        )
    outcomes: dict[str, int] = {}
    for tenant in report.tenants:
        outcomes[tenant.outcome] = outcomes.get(tenant.outcome, 0) + 1
    counted = ", ".join(f"{n} {outcome}" for outcome, n in sorted(outcomes.items())) or "none"
    verb = "would re-seal" if report.dry_run else "re-sealed"
    out.write(
        f"summary: {len(report.tenants)} tenants ({counted}); {verb} {report.resealed} values"
    )
    if report.dry_run:
        out.write(" (a dry run opens nothing: the real run finds values that will not open)\n")
    else:
        out.write(f"; {len(report.unopenable)} could not be opened\n")
    if report.stopped:
        out.write(f"stopped: {report.stopped}\n")
    if report.legacy_closed:
        out.write("older formats: none left; the database now refuses them everywhere\n")


def print_kek_summary(
    report: KekRotationReport, json_lines: bool, out: TextIO | None = None
) -> None:
    out = out or sys.stdout
    if json_lines:
        _json_line(out, "summary", {**dataclasses.asdict(report), "ok": report.ok})
        return
    for failure in report.failures:
        out.write(
            f"could not rewrap: tenant {failure.tenant_id} data key v{failure.dek_version} "
            f"({failure.error})\n"
        )
    if report.dry_run:
        action = (
            f"would rotate v{report.kek_before} -> v{report.kek_after}"
            if report.rotated
            else (f"would not rotate (v{report.kek_before}: data keys still to rewrap)")
        )
        out.write(f"kek: {action}; {report.behind} data keys would be rewrapped\n")
        return
    rotated = (
        f"rotated v{report.kek_before} -> v{report.kek_after}"
        if report.rotated
        else (f"caught up to v{report.kek_after}")
    )
    out.write(f"kek: {rotated}; rewrapped {report.rewrapped} data keys; {report.behind} behind")
    if report.min_decryption_version is not None:
        out.write(f"; min_decryption_version = {report.min_decryption_version}")
    out.write("\n")
    if report.stopped:
        out.write(f"stopped: {report.stopped}\n")


def print_key_status(report: KeyStatusReport, json_lines: bool, out: TextIO | None = None) -> None:
    out = out or sys.stdout
    if json_lines:
        for tenant in report.tenants:
            _json_line(
                out,
                "tenant",
                {**dataclasses.asdict(tenant), "active_version": tenant.active_version},
            )
        _json_line(
            out,
            "summary",
            {
                "kek_latest": report.kek_latest,
                "kek_min_decryption_version": report.kek_min_decryption_version,
                "tenants": len(report.tenants),
                "behind_kek": report.behind_kek,
                "draining": report.draining,
                "legacy_values": report.legacy_values,
                "refused_values": report.refused_values,
                "legacy_open": report.legacy_open,
                "nonce_budget_low": report.nonce_budget_low,
                "malformed_values": report.malformed_values,
            },
        )
        return
    out.write(
        f"KEK: latest v{report.kek_latest}, "
        f"min_decryption_version {report.kek_min_decryption_version}\n"
    )
    for tenant in report.tenants:
        active = f"v{tenant.active_version}" if tenant.active_version else "none"
        notes = "".join(
            f"; {count} {what}"
            for count, what in (
                (tenant.legacy_values, "values in an older format"),
                (tenant.refused_values, "of them refused (not recorded at the upgrade)"),
                (tenant.malformed_values, "values that are not sealed values"),
            )
            if count
        )
        out.write(f"tenant {tenant.tenant_id}: active DEK {active}{notes}\n")
        for key in tenant.keys:
            kek = f"KEK v{key.kek_version}" + (" (behind)" if report.is_behind(key) else "")
            budget = f"; {key.seals} seals: ROTATE (nonce budget)" if key.nonce_budget_low else ""
            out.write(
                f"  DEK v{key.version} {key.state:<9} {kek:<16} protects {key.protects} values"
                f"{budget}\n"
            )
    out.write(
        f"summary: {len(report.tenants)} tenants; {report.behind_kek} data keys behind the KEK; "
        f"{report.draining} draining; {report.legacy_values} values in an older format"
        f"{' (re-seal them: rotate-keys dek --all --reseal-only)' if report.legacy_values else ''}"
        f"{f', {report.refused_values} refused' if report.refused_values else ''}"
        f"; older formats {'open' if report.legacy_open else 'closed'}"
        f"; {report.malformed_values} not sealed"
        f"; {report.nonce_budget_low} data keys past {SEALS_WARNING} seals\n"
    )


def print_shred(report: ShredReport, json_lines: bool, out: TextIO | None = None) -> None:
    out = out or sys.stdout
    if json_lines:
        _json_line(out, "summary", report)
        return
    verb = "would destroy" if report.dry_run else "destroyed"
    versions = ", ".join(f"v{v}" for v in report.destroyed_versions) or "no keys"
    out.write(
        f"tenant {report.tenant_id}: {verb} {versions}; "
        f"{report.sealed_values} sealed values can never be opened again\n"
    )


class TenantKeyOutput:
    """Progress of a ``tenant-key set``/``unset``: a line per batch of keys moved."""

    def __init__(self, json_lines: bool, out: TextIO | None = None) -> None:
        self._json = json_lines
        self._out = out or sys.stdout

    def moved(self, event: TenantKekProgress) -> None:
        if self._json:
            _json_line(self._out, "progress", event)
        else:
            self._out.write(f"tenant {event.tenant_id}: {event.moved} data keys moved\n")
        self._out.flush()


def print_tenant_key_summary(
    report: TenantKekReport, json_lines: bool, out: TextIO | None = None
) -> None:
    out = out or sys.stdout
    if json_lines:
        _json_line(out, "summary", report)
        return
    for failure in report.failures:
        out.write(f"tenant {report.tenant_id}: not moved: {failure}\n")
    out.write(
        f"tenant {report.tenant_id}: KEK {report.kek_ref}; {report.moved} data keys moved, "
        f"{report.left} left under another KEK\n"
    )


def print_tenant_keys(
    report: Sequence[TenantKekStatus], json_lines: bool, out: TextIO | None = None
) -> None:
    out = out or sys.stdout
    for tenant in report:
        if json_lines:
            _json_line(out, "tenant", tenant)
            continue
        whose = "its own" if tenant.own else "the deployment's"
        state = "usable" if tenant.usable else f"NOT USABLE ({tenant.reason})"
        out.write(
            f"tenant {tenant.tenant_id}: KEK {tenant.kek_ref} ({whose}), {state}; "
            f"{tenant.keys_elsewhere} data keys under another KEK\n"
        )
    if not report:
        out.write("no tenant has a KEK of its own\n")


def print_audit_verify(
    report: AuditVerifyReport, json_lines: bool, out: TextIO | None = None
) -> None:
    out = out or sys.stdout
    if json_lines:
        for item in report.breaks:
            _json_line(out, "break", item)
        _json_line(
            out,
            "summary",
            {
                "tenants": report.tenants,
                "events": report.events,
                "ok": report.ok,
                "heads": _heads(report.heads),
            },
        )
        return
    for item in report.breaks:
        when = f" at {item.occurred_at.isoformat()}" if item.occurred_at else ""
        out.write(f"BROKEN tenant {item.tenant_id} seq {item.seq}{when}: {item.problem}\n")
    state = (
        "every chain intact"
        if report.ok
        else f"{len(report.breaks)} breaks in {len(report.broken_tenants)} chains"
    )
    out.write(f"audit: {report.events} events of {report.tenants} tenants; {state}\n")


def _heads(heads: Mapping[str, Head]) -> dict[str, dict[str, object]]:
    return {tenant: {"seq": h.seq, "hash": h.hash} for tenant, h in sorted(heads.items())}


def write_heads(heads: Mapping[str, Head], path: Path) -> None:
    """The heads as JSON, readable by the operator only (``--expect-heads`` reads it)."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as file:
        json.dump(_heads(heads), file, indent=2)
        file.write("\n")
    path.chmod(0o600)


def print_purge(report: PurgeReport, json_lines: bool, out: TextIO | None = None) -> None:
    out = out or sys.stdout
    if json_lines:
        for item in report.configs:
            _json_line(out, "config", item)
        _json_line(out, "summary", {"dry_run": report.dry_run, "configs": len(report.configs)})
        return
    verb = "would purge" if report.dry_run else "purged"
    for item in report.configs:
        out.write(
            f"{verb} tenant {item.tenant_id} config {item.config_id}: "
            f"{item.tokens} tokens, {item.versions} versions, its sealed credentials\n"
        )
    out.write(
        f"summary: {verb} {len(report.configs)} configs deleted before {report.cutoff:%Y-%m-%d}\n"
    )


class TokenProgress:
    """The tokens job's progress: a line per token it acted on (a JSON line with
    ``--json``); tenants and configs only, never a token."""

    def __init__(self, json_lines: bool, out: TextIO | None = None) -> None:
        self._json = json_lines
        self._out = out or sys.stdout

    def __call__(self, item: TokenOutcome) -> None:
        if self._json:
            _json_line(self._out, "token", item)
            return
        self._out.write(
            f"{item.outcome}: tenant {item.tenant_id} config {item.config_id} ({item.reason})\n"
        )
        self._out.flush()


def print_token_refresh(
    report: TokenRefreshReport, json_lines: bool, out: TextIO | None = None
) -> None:
    out = out or sys.stdout
    counts = {
        "refreshed": report.count("refreshed"),
        "reconsent_required": report.count("reconsent_required"),
        "failed": report.count("failed"),
        "would_refresh": report.count("would_refresh"),
    }
    if json_lines:
        _json_line(out, "summary", {"dry_run": report.dry_run, **counts})
        return
    parts = ", ".join(f"{count} {name.replace('_', ' ')}" for name, count in counts.items())
    out.write(f"summary: {parts}\n")
    if report.needs_reconsent:
        out.write("re-consent needed: send these users through authorization_url again\n")


def print_token_status(
    report: TokenStatusReport, json_lines: bool, out: TextIO | None = None
) -> None:
    out = out or sys.stdout
    listed = [("reconsent_required", t) for t in report.reconsent_required]
    listed += [("expiring", t) for t in report.expiring]
    for state, token in listed:
        if json_lines:
            _json_line(out, "token", {"state": state, **dataclasses.asdict(token)})
        else:
            when = token.reconsent_required_since if state != "expiring" else token.expires_at
            out.write(
                f"{state}: tenant {token.tenant_id} config {token.config_id} "
                f"({token.type}, since/at {when:%Y-%m-%d %H:%M} UTC)\n"
                if when is not None
                else f"{state}: tenant {token.tenant_id} config {token.config_id}\n"
            )
    summary = {
        "reconsent_required": len(report.reconsent_required),
        "expiring": len(report.expiring),
    }
    if json_lines:
        _json_line(out, "summary", summary)
    else:
        out.write(
            f"summary: {summary['reconsent_required']} need re-consent, "
            f"{summary['expiring']} expiring\n"
        )


def print_failed(why: str) -> None:
    """The one line a failed command prints (on stderr)."""
    print(f"FAILED: {why}", file=sys.stderr)


def print_stopping() -> None:
    print("stopping after the current batch (Ctrl-C again to stop now)", file=sys.stderr)


def print_lines(lines: Sequence[str]) -> None:
    print("\n".join(lines))


def print_raw(text: str) -> None:
    """Text made to be piped on (SQL, shell variables), as it is."""
    sys.stdout.write(text)


def print_migration(report: MigrationReport) -> None:
    print(f"schema revision: {report.before or 'none'} -> {report.after or 'none'}")


def print_status(report: StatusReport) -> None:
    print(f"database      {report.database} (PostgreSQL {report.server_version})")
    if report.revision_detail:
        print(f"schema        revision {report.revision_detail}")
    else:
        state = "up to date" if report.up_to_date else f"behind (head is {report.head})"
        print(f"schema        revision {report.revision or 'none'}: {state}")
    if report.visibility_detail:
        print(f"isolation     rows visible to the app role {report.visibility_detail}")
    width = max((len(table.name) for table in report.tables), default=0)
    for table in report.tables:
        rls = "RLS forced" if table.row_level_security and table.forced else "RLS NOT FORCED"
        visible = table.rows_visible_to_app_without_tenant
        seen = "(not checked)" if visible is None else str(visible)
        print(
            f"  {table.name:<{width}} {rls}, {table.policies} policies, "
            f"{seen} rows visible to the app role without a tenant"
        )
    kms = report.kms
    if kms is not None:
        if kms.reachable:
            print(f"{kms.kind:<13} {kms.address}: reachable, {kms.summary}")
        else:
            print(f"{kms.kind:<13} {kms.address or '-'}: {kms.detail}")
    _print_kek_check(report)
    for problem in report.tenant_kek_problems:
        print(f"tenant KEK    NOT USABLE: {problem}")
    if report.tenant_keks_detail:
        print(f"tenant KEKs   {report.tenant_keks_detail}")
    elif report.tenant_keks_checked and not report.tenant_kek_problems:
        print(f"tenant KEKs   {report.tenant_keks_checked} in use, each wraps and unwraps")
    if report.revision or report.revision_detail:
        until = report.audit_partitions_until
        note = "" if report.audit_writable else " (too few: run `tenantvault audit partitions`)"
        print(f"audit log     partitions until {until or 'none'}{note}")


def _print_kek_check(report: StatusReport) -> None:
    kms = report.kms
    problem = report.kek_problem
    if problem is not None:
        print(f"data keys     CANNOT BE UNWRAPPED: {problem}")
    elif report.wrapped_detail:
        print(f"data keys     KEK versions {report.wrapped_detail}")
    elif report.wrapped_kek_versions is not None:
        low, high = report.wrapped_kek_versions
        if kms is not None and kms.key_versions is not None:
            minimum, latest = kms.key_versions
            print(
                f"data keys     wrapped under KEK v{low}..v{high}; {kms.key_label} "
                f"unwraps v{minimum}..v{latest}"
            )
        else:
            # The KMS side could not be read: say why (the KMS line's reason, not a
            # second one that contradicts it) rather than leave it blank.
            key = kms.key_label.removeprefix("the ") if kms is not None else "KMS key"
            detail = _kms_key_detail(report)
            print(f"data keys     wrapped under KEK v{low}..v{high}; {key} {detail}")


def _kms_key_detail(report: StatusReport) -> str:
    kms = report.kms
    if kms is None:
        return "not checked"
    if kms.key_detail:
        return kms.key_detail
    reason = kms.detail or f"{kms.kind} did not answer"
    return reason if reason.startswith("not checked") else f"not checked: {reason}"


def print_app_login_grants(grants: AppLoginGrants, part: str | None = None) -> None:
    """Both parts, or only the one named (``dba`` or ``owner``) to pipe into psql."""
    if part in (None, "dba"):
        print(f"-- The application's login {grants.login}. As a DBA (or a role with ADMIN on")
        print("-- the app role), once:")
        for statement in grants.dba_sql:
            print(statement)
    if part in (None, "owner"):
        print("-- As the schema's owner (rerun after the application adds a table):")
        for statement in grants.owner_sql:
            print(statement)


def print_dev_up(environment: StackEnv, env_file: Path, env_command: str) -> None:
    """The variables on stdout (to eval); on stderr, a port that changed and how to get
    the variables again (``env_command``, as it must be typed here)."""
    sys.stdout.write(environment.as_shell())
    for note in environment.notes:
        print(f"# {note}", file=sys.stderr)
    print(f'# written to {env_file}: eval "$({env_command})"', file=sys.stderr)


def print_dev_down(stopped: Sequence[str], looked: str | None = None) -> None:
    """What ``dev down``/``dev reset`` stopped (they return once it has exited); if
    nothing, where it looked."""
    if stopped:
        print("stopped: " + ", ".join(stopped))
    else:
        print("stopped: nothing was running" + (f" (looked in {looked})" if looked else ""))


def print_dev_reset(report: ResetReport, looked: str | None = None) -> None:
    """What ``dev reset`` stopped, then what it deleted."""
    print_dev_down(report.stopped, looked)
    if report.deleted:
        print("deleted: " + "; ".join(report.deleted) + " (the next `dev up` starts empty)")
    else:
        print("deleted: nothing (the stack had no data)")


def print_tenant_row(row: TenantRow) -> None:
    """``dev add-tenant``'s one line: the row added, or the one that was there."""
    if row.added:
        print(f"tenant {row.tenant_id} added to {row.table} (name {row.name!r})")
    else:
        print(f"tenant {row.tenant_id} already in {row.table} (name {row.name!r}): unchanged")


def print_audit_prune(report: PruneReport) -> None:
    verb = "would drop" if report.dry_run else "dropped"
    names = ", ".join(report.dropped) or "no partition"
    print(
        f"audit: {verb} {names} ({report.events_dropped} events; "
        f"{report.chains_verified} chains verified first)"
    )


def print_audit_partitions(made: int, months_ahead: int) -> None:
    print(f"audit: {made} new monthly partitions (through {months_ahead} months ahead)")
