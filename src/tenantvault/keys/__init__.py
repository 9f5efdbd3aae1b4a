"""Tenant data keys: the cache, the keyring that hands out sealing, and the registry
of sealed columns."""
