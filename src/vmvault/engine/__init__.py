"""vmvault.engine."""
