"""vmvault.vault.backends."""
