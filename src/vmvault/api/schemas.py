"""Response models: the JSON the service layer returns, as documented in /openapi.json.

They model what the service returns, not a new shape: camelCase keys (aliases of snake_case
fields), extra keys allowed where a shape varies (a VM's connector details, a job's error, a
point's verification), and the keys kept in the order the service wrote them (View), so the API
answers the same JSON text the CLI prints locally. FastAPI validates every answer against its
model (an answer that does not match is a 500, caught by tests/test_api_schemathesis.py). Dates
are strings (ISO 8601 UTC) so they pass through unchanged; numbers that may be ints or floats are
`Number` so an int is not turned into a float.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Generic, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    PrivateAttr,
    SerializerFunctionWrapHandler,
    model_serializer,
    model_validator,
)
from pydantic.alias_generators import to_camel

from vmvault.service import azure_shape

Number = int | float


class View(BaseModel):
    """A service view: camelCase keys, extra keys kept as they are, in the order the service wrote them.

    The order is kept so the API answers the very JSON text the service returns (the CLI's
    --server output equals its local output), whatever order the fields are declared in.
    """

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="allow")
    _order: tuple[str, ...] = PrivateAttr(default=())

    @model_validator(mode="wrap")
    @classmethod
    def _keep_order(cls, data: Any, handler: ModelWrapValidatorHandler[View]) -> View:
        model = handler(data)
        if isinstance(data, dict):
            model._order = tuple(data)
        return model

    # No return annotation: pydantic would document it instead of the model's fields.
    @model_serializer(mode="wrap")
    def _in_order(self, handler: SerializerFunctionWrapHandler):  # type: ignore[no-untyped-def]
        out = handler(self)
        if not self._order or not isinstance(out, dict):
            return out
        ordered = {key: out[key] for key in self._order if key in out}
        ordered.update((key, value) for key, value in out.items() if key not in ordered)
        return ordered


T = TypeVar("T")


class Resource(View):
    """An Azure-shaped resource (service/azure_shape.py): a service view given to it is shaped first.

    So a route returns its service view (or a list of them) and the answer is the very JSON
    `vmvault -o json` prints, built in one place.
    """

    _shaper: ClassVar[Callable[[Any], Any] | None] = None
    id: str = Field(description="Azure-style path, e.g. /vaults/V/backupJobs/JOB")
    name: str = Field(description="What commands and routes take: the job id, point id, VM or vault name")
    type: str

    @model_validator(mode="wrap")
    @classmethod
    def _keep_order(cls, data: Any, handler: ModelWrapValidatorHandler[Resource]) -> Resource:  # type: ignore[override]
        if cls._shaper is not None and isinstance(data, dict):
            data = cls._shaper(data)
        model = handler(data)
        if isinstance(data, dict):
            model._order = tuple(data)
        return model


class Page(View, Generic[T]):
    """A list, as Azure answers one: a page of `value`, and the link to the next page (null on the last)."""

    value: list[T]
    next_link: str | None = Field(description="The next page: this request with $skipToken set")


# ---- errors -------------------------------------------------------------------------------------


class ErrorBody(View):
    """Every error: a stable code, a message naming the object, a hint saying what to do."""

    code: str = Field(description="Stable code, e.g. not_found, forbidden, invalid_input, busy")
    message: str
    hint: str | None


class Problem(View):
    location: list[str]
    message: str


class ValidationErrorBody(ErrorBody):
    """422 from request validation: the first problem in message, all of them in details."""

    details: list[Problem] | None = None


# ---- vaults, policies, usage --------------------------------------------------------------------


class RedundancySettings(View):
    standard_tier_storage_redundancy: str | None = Field(description="LocallyRedundant or GeoRedundant")
    cross_region_restore: str


class VaultSku(View):
    name: str
    tier: str


class VaultProperties(View):
    provisioning_state: str
    redundancy_settings: RedundancySettings
    redundancy: str = Field(description="LRS or GRS")
    uuid: str
    storage_dir: str
    chunk_size: int
    created: str
    protected_items: int
    recovery_points: int
    secondary_storage: str | None = Field(default=None, description="GRS: the secondary location")
    replication: dict[str, Any] | None = Field(
        default=None, description="GRS: state, lastReplicatedPoint, lagSeconds, lagBytes, lastError"
    )


class Vault(Resource):
    """A vault as a Microsoft.RecoveryServices/vaults resource."""

    _shaper = azure_shape.vault
    location: str
    sku: VaultSku
    properties: VaultProperties


class DeletedVaultProperties(VaultProperties):
    storage_deleted: bool = Field(description="False with keepStorage: the directory was left as it is")


class DeletedVault(Vault):
    properties: DeletedVaultProperties


class Policy(View):
    """A backup policy in Azure's shape (properties: schedulePolicy, retentionPolicy, timeZone, ...)."""

    id: str
    name: str
    type: str
    vault: str
    properties: dict[str, Any]
    notes: list[str] = Field(
        default_factory=list, description="What of the policy vmvault keeps but does not act on (docs/policies.md)"
    )


class UsageItem(View):
    name: str
    protection_state: str
    last_recovery_point: str | None
    protected_instance_bytes: int | None
    protected_instance_g_b: Number | None = Field(alias="protectedInstanceGB")
    billed: bool
    tier: str
    monthly_fee: Number


class UsageStorage(View):
    bytes: int
    gb: Number
    price_per_g_b_month: Number = Field(alias="pricePerGBMonth")
    monthly_fee: Number


class UsageTotals(View):
    protected_instances: int
    instance_fees: Number
    storage_fee: Number
    monthly: Number


class ReportRow(View):
    """One item (scope "item") or one vault (scope "vault", item "") over the report's period."""

    scope: str
    vault: str
    item: str
    backups: int
    succeeded: int
    failed: int
    success_rate: Number | None
    bytes_transferred: int
    stored_growth_bytes: int
    average_duration_seconds: Number | None
    longest_duration_seconds: Number | None
    rpo_breaches: int
    rpo_breached_now: bool | int  # an item: late now; a vault: how many of its items are


class Report(View):
    """Backup report over the last `days` days (service/reports.py)."""

    from_: str = Field(alias="from")
    to: str
    days: int
    rows: list[ReportRow]


class Usage(View):
    """A vault's protected instances and storage, priced like Azure Backup."""

    vault: str
    redundancy: str
    currency: str
    items: list[UsageItem]
    storage: UsageStorage
    totals: UsageTotals


class NotificationTarget(View):
    """Where a vault's job notifications go, and how their deliveries went."""

    id: int
    vault: str
    kind: str = Field(description="webhook or email")
    address: str
    smtp: str | None
    sender: str | None
    events: str = Field(description="failed or all")
    created: str
    delivered: int
    pending: int
    failed_deliveries: int


# ---- VMs, protected items, recovery points ------------------------------------------------------


class BackingFileView(View):
    path: str
    format: str


class VmDisk(View):
    name: str
    path: str | None
    format: str | None = Field(
        None, description="raw or qcow2, recorded at vm add and used for every open; unknown: set it with set-format"
    )
    backing_chain: list[BackingFileView] | None = Field(
        None, description="qcow2: the backing files recorded at vm add (checked before every backup)"
    )


class Vm(View):
    id: str
    name: str
    kind: str = Field(description="disks, qmp or libvirt")
    disks: list[VmDisk]
    created: str
    vault: str | None
    protection_state: str
    last_recovery_point: str | None
    quiesce_timeout_seconds: int | None = Field(
        None, description="A live backup's quiesce budget in seconds (vm update); null: the service's setting"
    )


class VmWithStatus(Vm):
    """A VM in the list: its power state and guest agent probed live (short timeouts), protection in words."""

    power_state: str = Field(description="running, stopped, paused, unknown, ... (as QEMU or libvirt says)")
    agent: str = Field(description="Whether its guest agent answers, e.g. answers, no answer, no socket")
    protection: str = Field(description="e.g. protected in vault main")


class AgentChannel(View):
    """vm enable-agent: the guest agent channel added to a libvirt domain's definition."""

    vm: str
    domain: str | None
    added: bool
    effect: str
    note: str


class ItemExtendedInfo(View):
    recovery_point_count: int
    oldest_recovery_point: str | None
    policy_inconsistent: bool


class ProtectedItemProperties(View):
    protected_item_type: str = Field(description="Microsoft.Compute/virtualMachines")
    backup_management_type: str
    workload_type: str
    friendly_name: str
    virtual_machine_id: str
    source_resource_id: str
    protection_state: str = Field(description="IRPending, Protected or ProtectionStopped (also when soft deleted)")
    protection_status: str = Field(description="Healthy or Unhealthy")
    health_status: str = Field(description="Passed or ActionRequired")
    policy_id: str | None
    policy_name: str | None
    is_scheduled_for_deferred_delete: bool = Field(description="Soft deleted: purged at deferredDeleteTimeInUTC")
    deferred_delete_time_in_utc: str | None = Field(alias="deferredDeleteTimeInUTC")
    vault_name: str
    last_backup_status: str
    last_backup_time: str | None
    last_recovery_point: str | None
    extended_info: ItemExtendedInfo
    last_backup_job_id: str | None
    last_backup_error: dict[str, Any] | None
    next_scheduled_backup: str | None
    time_zone: str | None
    excluded_disks: list[str]
    backup_in_progress: str | None = Field(description="The id of the Backup job running for it")
    protected_since: str


class ProtectedItem(Resource):
    """A protected item as an AzureIaaSComputeVMProtectedItem resource."""

    _shaper = azure_shape.item
    properties: ProtectedItemProperties


class RecoveryPointProperties(View):
    expiry_time: str | None
    rule_name: str | None
    is_soft_deleted: bool


class RecoveryPointFields(View):
    object_type: str = Field(description="IaasVMRecoveryPoint")
    recovery_point_type: str = Field(description="AppConsistent, FileSystemConsistent or CrashConsistent")
    recovery_point_time: str
    recovery_point_properties: RecoveryPointProperties
    retention_rules: list[str]


class RecoveryPoint(Resource):
    """A recovery point as an IaasVMRecoveryPoint resource; its name is the id restores take (rp)."""

    _shaper = azure_shape.recovery_point
    properties: RecoveryPointFields


# ---- jobs ---------------------------------------------------------------------------------------


class JobErrorDetail(View):
    error_code: str
    error_string: str
    recommendations: list[str]


class JobOwner(View):
    pid: int
    boot_id: str | None


class JobTask(View):
    task_id: str
    status: str
    duration: str | None


class JobExtendedInfo(View):
    """Azure's progressPercentage and propertyBag, vmvault's bytes; job show adds Azure's tasksList and
    vmvault's trigger, policy, scheduledFor, retainUntil, recoveryPoint, restore, queued,
    cancelRequested, owner, heartbeat and rateBytesPerSecond."""

    progress_percentage: Number
    bytes_read: int
    bytes_written: int
    property_bag: dict[str, str]


class JobShowExtendedInfo(JobExtendedInfo):
    tasks_list: list[JobTask]
    queued: bool
    cancel_requested: bool
    owner: JobOwner | None
    rate_bytes_per_second: Number


class JobProperties(View):
    job_type: str = Field(description="AzureIaaSVMJob")
    entity_friendly_name: str | None = Field(description="The VM (or, for a vault's own jobs, the vault)")
    backup_management_type: str
    operation: str = Field(
        description="Backup, Restore, ConfigureBackup, DisableBackup, DeleteBackupData, Undelete, Verify, ..."
    )
    status: str = Field(description="InProgress, Cancelling, Completed, CompletedWithWarnings, Failed or Cancelled")
    start_time: str
    end_time: str | None
    vault_name: str | None
    duration: str | None = Field(description="ISO 8601, e.g. PT1M2.5S")
    host: str | None = Field(default=None, description="The host that ran it (a VM's agent host, or a server)")
    error_details: list[JobErrorDetail]
    extended_info: JobExtendedInfo


class Job(Resource):
    """A job as an AzureIaaSVMJob resource; long operations answer 202 with it."""

    _shaper = azure_shape.job
    properties: JobProperties


class JobShowProperties(JobProperties):
    extended_info: JobShowExtendedInfo


class JobDetails(Job):
    """A job with its per-disk tasks, rate, owner and recovery point in extendedInfo (job show)."""

    properties: JobShowProperties


# ---- file recovery ------------------------------------------------------------------------------


class SessionVolume(View):
    disk: str | None
    partition: Any
    file_system: str | None
    path: str | None
    status: str | None
    driver: str | None
    reason: str | None


class SessionExport(View):
    unix_socket: str | None
    tls_address: str | None


class FileSession(View):
    """A file-recovery session: a point's volumes mounted (or served) until it expires."""

    id: str
    vm: str
    recovery_point: str
    state: str
    mountpoint: str | None
    created: str
    expires: str
    ended: str | None
    end_reason: str | None
    volumes: list[SessionVolume]
    paths: list[str]
    export: SessionExport
    host: str | None = Field(default=None, description="The host it is mounted on (an agent's host, or a server)")


class BrowseEntry(View):
    """A directory entry (type file, dir, symlink, ...) or, at the top, a mounted volume (type volume)."""

    name: str
    type: str
    size: int | None


class RecoveryScript(View):
    """files script: the script for another machine (content), and its password, shown only here."""

    script: str = Field(description="Its file name")
    password: str
    expires: str
    session: str
    address: str = Field(description="HOST:PORT of the point's TLS export")
    content: str = Field(description="The script (a shell script, run as root on the other machine)")


# ---- tokens -------------------------------------------------------------------------------------


class Token(View):
    id: str
    name: str | None
    role: str
    vault: str | None
    created: str
    expires: str | None
    revoked: str | None
    last_used: str | None
    host: str | None = None


class NewToken(Token):
    token: str = Field(description="The secret, shown once: send it as Authorization: Bearer TOKEN")


class Host(View):
    """A machine of the deployment (service/hosts.py): a server, or an agent on a hypervisor host."""

    name: str
    role: str = Field(description="Server or Agent")
    state: str = Field(description="Online while its heartbeat is younger than the lease (60 s), else Offline")
    last_heartbeat: str | None
    version: str | None = Field(description="The vmvault version it runs")
    version_mismatch: bool = Field(description="It runs another vmvault version than this server")
    address: str | None
    running_jobs: int
    vms: int = Field(description="VMs that belong to it")


class HostDetail(Host):
    registered: str | None
    boot_id: str | None
    vm_names: list[str]
    running_job_ids: list[str]
    details: dict[str, Any]


class RemovedHost(Host):
    removed: bool


class Health(View):
    status: str


def _error(description: str, model: type[ErrorBody] = ErrorBody) -> dict[str, Any]:
    return {"model": model, "description": description}


# The statuses vmvault.errors classes map to (api/errors.py), documented on every /api/v1 operation.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: _error("The body could not be read as JSON"),
    401: _error("No token, or an unknown, expired or revoked one (or a wrong vault passphrase)"),
    403: _error("The token's role or vault scope does not allow this"),
    404: _error("No such vault, policy, VM, item, recovery point, job, session or token"),
    409: _error("Conflicts with the current state (already exists, cancelled, point failed verification)"),
    422: _error("The request or a value in it is invalid", ValidationErrorBody),
    423: _error("Busy: a job already runs for this object, or the VM runs"),
    502: _error("The hypervisor (QEMU, libvirt, guest agent) failed"),
    503: _error("The vault's storage failed"),
}

# The answer of a long operation: its job, just recorded.
ACCEPTED: dict[int | str, dict[str, Any]] = {
    202: {"description": "Accepted: the job (status InProgress); follow it with GET /api/v1/jobs/{id}"}
}
