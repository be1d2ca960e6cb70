"""vmvault.domain: pure rules (policies, schedules, prices); no I/O, imports only vmvault.errors."""
