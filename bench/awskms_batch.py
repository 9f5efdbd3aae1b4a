"""AWS KMS batch unwrap: one Decrypt per key, run by a pool of N threads, against N=1.

AWS KMS has no batch Decrypt, so ``unwrap_many`` (``warm``) and ``rewrap`` (KEK
rotation) issue one request per key, TENANTVAULT_AWSKMS_CONCURRENCY at a time.
Against moto's server in a process of its own on loopback (its own Python, so not
sharing this one's interpreter lock): BATCH keys unwrapped ROUNDS times per
concurrency, keys/s and the ratio to one at a time; first straight to moto, then
through a relay that holds each request LATENCY_MS, as a network to AWS does (a
Decrypt in the same region takes milliseconds). Straight, moto's CPU is the limit
(a few ms a Decrypt here, 2 cores shared); with latency, the pool overlaps the waits.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import boto3
import requests

from tenantvault.kms.awskms import AwsKmsKeyProvider
from tenantvault.kms.factory import awskms_client
from tenantvault.settings import load_settings

BATCH = 200
ROUNDS = 3
CONCURRENCY = (1, 2, 4, 8, 16)
LATENCY_MS = 10


def _pump(source: socket.socket, target: socket.socket, delay: float) -> None:
    try:
        while chunk := source.recv(65536):
            if delay:
                time.sleep(delay)
            target.sendall(chunk)
    except OSError:
        pass
    finally:
        target.close()


@contextmanager
def delayed(endpoint: str, delay: float) -> Iterator[str]:
    """A TCP relay to ``endpoint`` that holds what the client sends for ``delay`` seconds."""
    host, port = endpoint.removeprefix("http://").split(":")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)

    def accept() -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            server = socket.create_connection((host, int(port)))
            threading.Thread(target=_pump, args=(client, server, delay), daemon=True).start()
            threading.Thread(target=_pump, args=(server, client, 0.0), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.close()


@contextmanager
def moto_server() -> Iterator[str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                requests.get(f"{endpoint}/moto-api/", timeout=1)
                break
            except requests.ConnectionError:
                time.sleep(0.1)
        yield endpoint
    finally:
        process.terminate()
        process.wait(10)


def run(endpoint: str, key_id: str, items: list[tuple[str, str]]) -> None:
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    baseline = None
    for concurrency in CONCURRENCY:
        settings = load_settings(
            database_url="postgresql://bench@127.0.0.1/bench",
            key_provider="awskms",
            awskms_key_id=key_id,
            awskms_concurrency=concurrency,
        )
        provider = AwsKmsKeyProvider(
            awskms_client(settings), key_id=key_id, concurrency=concurrency
        )
        provider.unwrap_many(items[:16])  # connections opened
        started = time.perf_counter()
        for _ in range(ROUNDS):
            results = provider.unwrap_many(items)
            assert all(r.plaintext is not None for r in results)
        rate = BATCH * ROUNDS / (time.perf_counter() - started)
        baseline = baseline or rate
        print(
            f"  concurrency {concurrency:>2}: {rate:7.0f} keys/s "
            f"({1000 * BATCH / rate:6.1f} ms a batch of {BATCH}), {rate / baseline:5.2f}x"
        )


def main() -> None:
    with moto_server() as endpoint:
        os.environ.update(
            AWS_ENDPOINT_URL=endpoint,
            AWS_ACCESS_KEY_ID="bench",
            AWS_SECRET_ACCESS_KEY="bench",  # noqa: S106 - moto takes any
            AWS_DEFAULT_REGION="us-east-1",
        )
        key_id = boto3.client("kms").create_key()["KeyMetadata"]["KeyId"]
        settings = load_settings(
            database_url="postgresql://bench@127.0.0.1/bench",
            key_provider="awskms",
            awskms_key_id=key_id,
        )
        maker = AwsKmsKeyProvider(awskms_client(settings), key_id=key_id)
        items = [(f"t_{n}", maker.generate_data_key(f"t_{n}")[1].ciphertext) for n in range(BATCH)]
        print("moto on loopback:")
        run(endpoint, key_id, items)
        with delayed(endpoint, LATENCY_MS / 1000) as relay:
            print(f"moto behind {LATENCY_MS} ms of latency a request:")
            run(relay, key_id, items)


if __name__ == "__main__":
    main()
