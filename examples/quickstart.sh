#!/usr/bin/env bash
# vmvault quickstart: back a small demo disk up twice, change it in between, restore both points
# and check them byte for byte. Run it with `make run` (which installs what is missing first).
#
# Environment:
#   VMVAULT_HOME        where vmvault keeps its catalog, keys and vault (default: a new /tmp dir)
#   VMVAULT_PASSPHRASE  the vault passphrase (default: a demo value; never use it for real data)
#   VMVAULT             the vmvault command (default: .venv/bin/vmvault of this checkout)
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VMVAULT="${VMVAULT:-$ROOT/.venv/bin/vmvault}"
export VMVAULT_HOME="${VMVAULT_HOME:-$(mktemp -d /tmp/vmvault-quickstart.XXXXXX)}"
export VMVAULT_PASSPHRASE="${VMVAULT_PASSPHRASE:-quickstart-demo-passphrase}"
WORK="$VMVAULT_HOME/quickstart"
DISK="$WORK/demo-disk.raw"
VM=demo
VAULT=demo-vault

if [ -t 1 ]; then BOLD=$'\033[1m' PLAIN=$'\033[0m'; else BOLD='' PLAIN=''; fi
step() { printf '\n%s==> %s%s\n' "$BOLD" "$*" "$PLAIN"; }
vv() { printf '$ vmvault %s\n' "$*"; "$VMVAULT" "$@"; }

rm -rf "$WORK"
mkdir -p "$WORK"

step "Building a demo VM disk: a 256 MiB raw image with an ext4 file system ($DISK)"
stage="$WORK/stage"
mkdir -p "$stage/etc" "$stage/home/demo/photos" "$stage/var/log"
for i in $(seq 1 40); do seq "$i" 7 200000 >"$stage/var/log/app-$i.log"; done
for i in $(seq 1 12); do head -c $((2 << 20)) /dev/urandom >"$stage/home/demo/photos/img-$i.jpg"; done
cp -r /usr/share/common-licenses "$stage/etc/licenses" 2>/dev/null || true
echo "version 1" >"$stage/home/demo/notes.txt"
mke2fs -q -t ext4 -L demo -d "$stage" -F "$DISK" 256M
rm -rf "$stage"
echo "disk: $(du -h --apparent-size "$DISK" | cut -f1) logical, $(du -h "$DISK" | cut -f1) allocated"

step "Creating a vault, adding the VM by its disk, and protecting it"
vv vault create "$VAULT"
vv vm add "$VM" --disk "$DISK"
vv protection enable --vm "$VM" --vault "$VAULT"

step "First backup (full)"
vv backup now "$VM"
cp --sparse=always "$DISK" "$WORK/disk-at-point-1.raw"

step "Changing files inside the disk image (like a running VM would)"
extra="$WORK/new-photo.jpg"
head -c $((3 << 20)) /dev/urandom >"$extra"
echo "version 2: edited after the first backup" >"$WORK/notes.txt"
debugfs -w "$DISK" -f - >/dev/null 2>&1 <<EOF
rm /home/demo/notes.txt
write $WORK/notes.txt /home/demo/notes.txt
write $extra /home/demo/photos/new-photo.jpg
rm /var/log/app-3.log
EOF
e2fsck -fn "$DISK" >/dev/null
cmp -s "$DISK" "$WORK/disk-at-point-1.raw" && { echo "the disk did not change" >&2; exit 1; }
echo "changed: notes.txt edited, a 3 MiB photo added, a log file removed"

step "Second backup (incremental: only changed chunks are stored)"
vv backup now "$VM"
cp --sparse=always "$DISK" "$WORK/disk-at-point-2.raw"

step "Recovery points of $VM"
vv recoverypoint list "$VM"
# listed newest first, as Azure; oldest first here, to match the disk copies made at each backup
mapfile -t POINTS < <("$VMVAULT" recoverypoint list "$VM" --query "reverse([].name)" -o tsv | tr '\t' '\n')
[ "${#POINTS[@]}" -eq 2 ] || { echo "expected 2 recovery points, got ${#POINTS[@]}" >&2; exit 1; }

step "Restoring both points and comparing them with the disk as it was at each backup"
for n in 1 2; do
  rp="${POINTS[$((n - 1))]}"
  out="$WORK/restore-$n"
  vv restore disks "$VM" --rp "$rp" --target-dir "$out"
  restored="$(ls "$out"/*.raw)"
  if cmp "$restored" "$WORK/disk-at-point-$n.raw"; then
    echo "point $n ($rp): $restored is byte-identical to the disk at backup $n"
  else
    echo "point $n ($rp): restored disk DIFFERS" >&2
    exit 1
  fi
done

step "Checking the whole vault"
vv vault verify "$VAULT"

step "Jobs"
vv job list

vault_dir="$("$VMVAULT" vault show "$VAULT" --query properties.storageDir -o tsv)"
cat <<EOF

Done. Two recovery points of VM '$VM' restored byte-identically.
  vault:      $vault_dir ($(du -sh "$vault_dir" | cut -f1) on disk for two backups of a 256 MiB disk)
  home:       $VMVAULT_HOME   (catalog, host keys; remove it when done: rm -rf $VMVAULT_HOME)
  try:        $VMVAULT --home $VMVAULT_HOME vm list
EOF
