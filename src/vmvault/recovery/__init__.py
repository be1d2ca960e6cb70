"""vmvault.recovery."""
