"""The only door to the KMS: the ``KeyProvider`` protocol with its checked base,
Vault/OpenBao transit, a local provider for tests, and the factory that picks one.
No SQL here."""

from tenantvault.kms.factory import key_provider_from_settings, transit_client

__all__ = ["key_provider_from_settings", "transit_client"]
