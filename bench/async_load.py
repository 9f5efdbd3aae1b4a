"""AsyncVault.load_credentials against bare async SQL, in one run on the embedded stack.

floor        a prepared primary-key SELECT of the same columns on one held psycopg
             AsyncConnection, timed interleaved with the load (p50, p99)
load         AsyncVault.load_credentials, warm key cache: its one statement on a held
             connection
64 tasks     loads per second with 64 concurrent tasks over 100 tenants, against bare
             prepared SELECTs by 64 tasks sharing as many held connections as the vault's
             hot path holds (TENANTVAULT_HOT_PATH_CONNECTIONS); five 1-second rounds of
             each, alternating, the median round of each reported
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable

import hvac
import psycopg

from tenantvault import AsyncVault, Vault
from tenantvault.kms.transit import TransitKeyProvider
from tenantvault.settings import Settings

from ._harness import (
    CONFIG_ROW,
    SMTP,
    Timing,
    migrated_with_app_login,
    summarize,
    throwaway_database,
    vault_token,
)

TENANTS = 100
ITERATIONS = 3000
TASKS = 64
SECONDS = 1.0  # a round of one side
ROUNDS = 5  # rounds of each side, alternating; the median round is reported


async def interleaved(
    operations: dict[str, Callable[[], Awaitable[object]]], iterations: int, warmup: int = 200
) -> dict[str, Timing]:
    samples: dict[str, list[float]] = {name: [] for name in operations}
    for round_number in range(warmup + iterations):
        for name, operation in operations.items():
            started = time.perf_counter_ns()
            await operation()
            if round_number >= warmup:
                samples[name].append((time.perf_counter_ns() - started) / 1000)
    return {name: summarize(name, values) for name, values in samples.items()}


async def per_second(operation: Callable[[int], Awaitable[object]]) -> float:
    """Operations per second done by TASKS tasks, each looping for SECONDS (one round)."""
    deadline = time.perf_counter() + SECONDS
    counts = [0] * TASKS

    async def worker(n: int) -> None:
        i = n
        while time.perf_counter() < deadline:
            await operation(i)
            counts[n] += 1
            i += TASKS

    started = time.perf_counter()
    await asyncio.gather(*(worker(n) for n in range(TASKS)))
    return sum(counts) / (time.perf_counter() - started)


def main() -> None:
    with throwaway_database() as (url, vault_addr):
        settings, app_settings = migrated_with_app_login(url, vault_addr, TENANTS)
        token = vault_token()

        def provider() -> TransitKeyProvider:
            client = hvac.Client(url=vault_addr, token=token, timeout=5)
            return TransitKeyProvider(client, key_name="bench")

        seeding = Vault.from_settings(app_settings, key_provider=provider())
        pairs = [
            (
                f"t{i}",
                seeding.create_config(
                    f"t{i}", type="smtp", name="R", config=SMTP, credentials={"password": "pw"}
                ).id,
            )
            for i in range(1, TENANTS + 1)
        ]
        seeding.engine.dispose()
        results = asyncio.run(_measure(app_settings, settings, url, provider(), pairs))

    floor, loaded, bare_rate, load_rate = results
    print(f"{floor.name:<34} p50 {floor.p50_us:8.1f} us  p99 {floor.p99_us:8.1f} us  (baseline)")
    print(
        f"{loaded.name:<34} p50 {loaded.p50_us:8.1f} us  p99 {loaded.p99_us:8.1f} us  "
        f"({loaded.ratio_to(floor)}; target <= 1.5x p50)"
    )
    print(f"{f'bare held SELECT, {TASKS} tasks':<34} {bare_rate:10.0f} /s  (baseline)")
    print(
        f"{f'AsyncVault.load_credentials, {TASKS} tasks':<34} {load_rate:10.0f} /s  "
        f"({load_rate / bare_rate:.2f}x the bare SELECTs' rate)"
    )


async def _measure(
    app_settings: Settings,
    settings: Settings,
    owner_url: str,
    provider: TransitKeyProvider,
    pairs: list[tuple[str, str]],
) -> tuple[Timing, Timing, float, float]:
    vault = AsyncVault.from_settings(app_settings, key_provider=provider)
    # The baselines read as the owner (no tenant to set), as bench.vault_load's does.
    tenant, config_id = pairs[49]
    for t, c in pairs:  # warm: every tenant's key cached
        await vault.load_credentials(t, c)
    held = await psycopg.AsyncConnection.connect(owner_url, autocommit=True)

    async def floor() -> object:
        cursor = await held.execute(CONFIG_ROW, (config_id,), prepare=True)
        return await cursor.fetchone()

    async def load() -> object:
        return await vault.load_credentials(tenant, config_id)

    timings = await interleaved(
        {"bare prepared SELECT, held conn": floor, "AsyncVault.load_credentials": load},
        ITERATIONS,
    )

    # The floor at the same concurrency: as many held autocommit connections as the
    # vault's hot path holds, shared by the tasks, each a prepared primary-key SELECT.
    free: asyncio.Queue[psycopg.AsyncConnection[object]] = asyncio.Queue()
    for _ in range(app_settings.hot_path_connections):
        free.put_nowait(await psycopg.AsyncConnection.connect(owner_url, autocommit=True))

    async def bare_select(i: int) -> object:
        connection = await free.get()
        try:
            cursor = await connection.execute(CONFIG_ROW, (pairs[i % TENANTS][1],), prepare=True)
            return await cursor.fetchone()
        finally:
            free.put_nowait(connection)

    async def vault_load(i: int) -> object:
        t, c = pairs[i % TENANTS]
        return await vault.load_credentials(t, c)

    # Interleaved in short rounds, so a slow patch of the machine weighs on both.
    bare_rates, load_rates = [], []
    for _ in range(ROUNDS):
        bare_rates.append(await per_second(bare_select))
        load_rates.append(await per_second(vault_load))
    bare_rate, load_rate = statistics.median(bare_rates), statistics.median(load_rates)
    await held.close()
    while not free.empty():
        await free.get_nowait().close()
    await vault.dispose()
    return (
        timings["bare prepared SELECT, held conn"],
        timings["AsyncVault.load_credentials"],
        bare_rate,
        load_rate,
    )


if __name__ == "__main__":
    main()
