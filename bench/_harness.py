"""Shared benchmark plumbing: a throwaway database on the embedded stack, and timing."""

from __future__ import annotations

import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg

from tenantvault.dev import stack as devstack
from tenantvault.ops import migrate
from tenantvault.ops.migrate import migration_engine
from tenantvault.settings import Settings, load_settings


@dataclass(frozen=True)
class Timing:
    name: str
    p50_us: float
    p99_us: float

    def ratio_to(self, baseline: Timing) -> str:
        return f"{self.p50_us / baseline.p50_us:.2f}x p50, {self.p99_us / baseline.p99_us:.2f}x p99"


SMTP = {"host": "smtp.example.com", "port": 587, "secure": False, "auth_type": "login", "user": "u"}
"""The config every load bench stores (its credentials are one password)."""
CONFIG_ROW = (
    "SELECT type, version, config, encrypted_credentials "
    "FROM dripiq_app.email_provider_configs WHERE id = %s"
)
"""The floor of a credentials load: the columns it reads, by primary key (DB-API)."""


def line(
    timing: Timing, baseline: Timing | None = None, *, target: str = "", width: int = 34
) -> str:
    """A timing's p50 and p99, and its ratios to ``baseline`` (or "(floor)" if it is one)."""
    text = f"{timing.name:<{width}} p50 {timing.p50_us:8.1f} us  p99 {timing.p99_us:8.1f} us"
    if baseline is None:
        return text + "  (floor)"
    return text + f"  ({timing.ratio_to(baseline)}{target})"


def measure(
    name: str, operation: Callable[[], object], *, iterations: int, warmup: int = 200
) -> Timing:
    for _ in range(warmup):
        operation()
    samples = []
    for _ in range(iterations):
        started = time.perf_counter_ns()
        operation()
        samples.append((time.perf_counter_ns() - started) / 1000)
    return summarize(name, samples)


def summarize(name: str, samples: list[float]) -> Timing:
    """p50 and p99 of ``samples`` (microseconds)."""
    samples = sorted(samples)
    return Timing(name, statistics.median(samples), samples[int(len(samples) * 0.99) - 1])


def measure_interleaved(
    operations: dict[str, Callable[[], object]], *, iterations: int, warmup: int = 200
) -> dict[str, Timing]:
    """Time several operations in alternation, so machine noise falls on all alike."""
    samples: dict[str, list[float]] = {name: [] for name in operations}
    for round_number in range(warmup + iterations):
        for name, operation in operations.items():
            started = time.perf_counter_ns()
            operation()
            if round_number >= warmup:
                samples[name].append((time.perf_counter_ns() - started) / 1000)
    return {name: summarize(name, values) for name, values in samples.items()}


@contextmanager
def throwaway_database() -> Iterator[tuple[str, str]]:
    """(database URL, OpenBao address) on a private dev stack, all removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="tenantvault-bench.") as state:
        environment = devstack.up(Path(state)).variables
        os.environ["_TENANTVAULT_BENCH_TOKEN"] = environment["VAULT_TOKEN"]
        admin = environment["TENANTVAULT_DATABASE_URL"]
        name = f"bench_{uuid.uuid4().hex[:8]}"
        try:
            with psycopg.connect(admin, autocommit=True) as connection:
                connection.execute(f'CREATE DATABASE "{name}"')
            yield admin.rsplit("/", 1)[0] + "/" + name, environment["VAULT_ADDR"]
        finally:
            devstack.reset(Path(state))


APP_LOGIN = "tenantvault_bench_app"


def vault_token() -> str:
    """The root token of the throwaway stack's OpenBao (set by :func:`throwaway_database`)."""
    return os.environ["_TENANTVAULT_BENCH_TOKEN"]


def migrated_with_app_login(url: str, vault_addr: str, tenants: int) -> tuple[Settings, Settings]:
    """The throwaway database migrated, ``tenants`` tenant rows ('t1'...), and a login
    in the app role: (the owner's settings, the application's settings)."""
    token = vault_token()
    settings = load_settings(database_url=url, VAULT_ADDR=vault_addr, VAULT_TOKEN=token)
    migrate.upgrade(settings)
    owner = migration_engine(settings)
    with owner.begin() as connection:
        connection.exec_driver_sql(
            f"DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{APP_LOGIN}') "
            f"THEN CREATE ROLE {APP_LOGIN} LOGIN; END IF; END $$"
        )
        connection.exec_driver_sql(f"GRANT tenantvault_app TO {APP_LOGIN}")
        connection.exec_driver_sql(
            "INSERT INTO dripiq_app.tenants (id, name) "
            f"SELECT 't' || i, 'T' FROM generate_series(1, {tenants}) i"
        )
    owner.dispose()
    app_settings = load_settings(
        database_url=url.replace("postgres@", f"{APP_LOGIN}@"),
        VAULT_ADDR=vault_addr,
        VAULT_TOKEN=token,
    )
    return settings, app_settings


def copy_rows(
    connection: psycopg.Connection, table: str, columns: str, rows: Sequence[tuple[object, ...]]
) -> None:
    """``rows`` into ``dripiq_app.<table>`` with COPY (seeding at scale, as the owner)."""
    with (
        connection.cursor() as cursor,
        cursor.copy(f"COPY dripiq_app.{table} ({columns}) FROM STDIN") as copy,
    ):
        for row in rows:
            copy.write_row(row)
