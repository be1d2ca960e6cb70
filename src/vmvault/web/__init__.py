"""vmvault.web."""
