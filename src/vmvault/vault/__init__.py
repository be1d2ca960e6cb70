"""vmvault.vault."""
