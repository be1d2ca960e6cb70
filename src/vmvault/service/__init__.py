"""vmvault.service: the use cases, shared by the CLI and (later) the API.

Open a context once, call use cases with it, close it::

    from vmvault.settings import load_settings
    from vmvault.service.context import context
    from vmvault.service import backups

    with context(load_settings()) as ctx:
        outcome = backups.backup_now(ctx, "web1", retain_until="2030-01-31")
        print(outcome.job["status"])

Use cases return JSON-ready dicts (camelCase keys); long operations return a JobOutcome whose
``job`` is the job as `vmvault job show` prints it. Bad input raises a VmvaultError before
anything is recorded.
"""
