#!/usr/bin/env bash
# Start the vmvault service (scheduler + workers) in the foreground; `make run` runs this.
# It prints where it listens (its status endpoint, GET /healthz); stop it with Ctrl-C or SIGTERM.
#
# Environment:
#   VMVAULT_HOME     the vmvault home it serves (default: /var/lib/vmvault for root, else ~/.local/share/vmvault)
#   VMVAULT_LISTEN   HOST:PORT of the status endpoint (default 127.0.0.1:8480; port 0 = any free port)
#   VMVAULT_WORKERS  how many jobs run in parallel at most (default 2)
#   VMVAULT          the vmvault command (default: .venv/bin/vmvault of this checkout)
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VMVAULT="${VMVAULT:-$ROOT/.venv/bin/vmvault}"
LISTEN="${VMVAULT_LISTEN:-127.0.0.1:8480}"
WORKERS="${VMVAULT_WORKERS:-2}"

cat <<EOT
Starting vmvault serve. While it runs, in another shell:
  $VMVAULT item list                      protected VMs, their last and next backup
  $VMVAULT backup now VM                  queued to this service, waits for the job
  $VMVAULT job list --status InProgress   what runs now
  curl ADDRESS/healthz                    the service's status (ADDRESS: printed below)
(Try the whole product first, without the service: make quickstart)
EOT
exec "$VMVAULT" serve --listen "$LISTEN" --workers "$WORKERS"
