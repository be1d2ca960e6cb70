"""vmvault.hypervisor."""
