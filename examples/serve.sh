#!/usr/bin/env bash
# Start the vmvault service (REST API + scheduler + workers) in the foreground; `make run` runs this.
# It prints where the API listens and, on a home's first start, the path of a 0600 file holding a
# first-run Owner token (never the token itself: service managers keep stdout in their logs).
# Stop it with Ctrl-C or SIGTERM.
#
# Environment:
#   VMVAULT_HOME     the vmvault home it serves (default: /var/lib/vmvault for root, else ~/.local/share/vmvault)
#   VMVAULT_HOST     address of the API (default 127.0.0.1)
#   VMVAULT_PORT     port of the API (default 8080; 0 = any free port)
#   VMVAULT_WORKERS  how many jobs run in parallel at most (default 2)
#   VMVAULT          the vmvault command (default: .venv/bin/vmvault of this checkout)
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VMVAULT="${VMVAULT:-$ROOT/.venv/bin/vmvault}"
HOST="${VMVAULT_HOST:-127.0.0.1}"
PORT="${VMVAULT_PORT:-8080}"
WORKERS="${VMVAULT_WORKERS:-2}"

cat <<EOT
Starting vmvault serve. Portal: http://$HOST:$PORT/ (sign in with the token in the file named below).
What it needs: that token to sign in; a vault passphrase, chosen in the portal when you create the first
vault (Vaults > Create vault: offered over HTTPS or from a browser on this machine, http://localhost:$PORT/);
disk images under /var/lib/libvirt/images or /var/lib/vmvault/images, restores under /var/lib/vmvault/restores
(more folders: vmvault serve --allow-disks/--allow-restores DIR).
API: http://$HOST:$PORT/api/v1 (interactive docs: http://$HOST:$PORT/docs).
While it runs, in another shell:
  curl -H "Authorization: Bearer TOKEN" http://$HOST:$PORT/api/v1/items   protected VMs (TOKEN: in the file named below)
  $VMVAULT token create --role BackupReader   another token (roles: Owner, BackupContributor, BackupOperator, BackupReader)
  $VMVAULT backup now VM                      queued to this service, waits for the job
  $VMVAULT job list --status InProgress       what runs now
(Try the whole product first, without the service: make quickstart)
EOT
exec "$VMVAULT" serve --host "$HOST" --port "$PORT" --workers "$WORKERS"
