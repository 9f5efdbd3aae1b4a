"""Sealing values: AES-256-GCM under a tenant data key, and the wire format.

No SQL, no network: this layer imports nothing of tenantvault but ``errors``.
"""
