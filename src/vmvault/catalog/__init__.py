"""vmvault.catalog: the SQLite index of vaults, VMs, protected items, recovery points and jobs.

Open it with ``vmvault.catalog.db.Catalog.open(path)``; query with ``vmvault.catalog.repos``.
"""
