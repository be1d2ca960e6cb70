"""vmvault.api."""
