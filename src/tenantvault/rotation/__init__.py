"""Key rotation: tenants' data keys (dek), the transit key (kek), what each key
protects (status), and crypto-shredding (shred)."""
