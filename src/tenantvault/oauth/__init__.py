"""OAuth 2 with a mail provider's endpoints (authlib's client): below the vault, as the
KMS clients are; it knows no config, no database and no key."""
