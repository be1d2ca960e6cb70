"""The policy documents Azure users have: every documented AzureIaasVM shape is accepted and printed back.

tests/data/policies/*.json are written for these tests from Azure's documentation (REST API
"Protection Policies - Create Or Update" for AzureIaasVM, `az backup policy show` output, the
Enhanced policy how-to); none is a copy of Azure's files. Each accepted one goes through the pure
parser, the real CLI (`policy create/show/set`, show's output fed back to set) and the real API
(`vmvault serve`, HTTP and `--server`); the refused ones name the kind of policy they are.
"""

from __future__ import annotations

import copy
import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from helpers import Cli, HostKeyCli
from test_api_flows import served
from vmvault.domain.policy import PolicyError, parse_policy, policy_notes, to_properties

DATA = Path(__file__).parent / "data" / "policies"
ACCEPTED = sorted(p.name for p in DATA.glob("*.json") if not p.name.startswith("refused-"))
REFUSED = {"refused-azure-storage.json": "AzureStorage", "refused-azure-workload.json": "AzureWorkload"}


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    """Not about passphrases: only `vault create` gets one; the host key opens the vault (no scrypt)."""
    return HostKeyCli(home=tmp_path / "home")


def load(name: str) -> Any:
    return json.loads((DATA / name).read_text())


def properties_of(document: Any) -> dict[str, Any]:
    return dict(document.get("properties", document))


# ---- pure ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ACCEPTED)
def test_each_shape_is_accepted_and_reads_back_unchanged(name: str) -> None:
    document = load(name)
    policy = parse_policy(document)
    printed = to_properties(policy)
    assert parse_policy(printed) == policy
    assert to_properties(parse_policy(printed)) == printed
    given = properties_of(document)
    assert printed["timeZone"] == given["timeZone"], "the time zone is given back as the user named it"
    for key, value in given.items():  # kept fields come back under the name and with the value given
        if key in ("instantRPDetails", "instantRpDetails", "tieringPolicy", "resourceGuardOperationRequests") or (
            key.startswith("vmvault")
        ):
            assert printed[key] == value if value is not None else key not in printed, key


SHAPES = {
    # file: (policyType, frequency, local run times, IANA zone, instant-RP days)
    "az-show-standard-daily.json": ("V1", "Daily", ["22:00"], "America/Los_Angeles", 2),
    "az-show-enhanced-hourly.json": ("V2", "Hourly", ["04:00", "10:00", "16:00", "22:00"], "America/Los_Angeles", 7),
    "bare-short-daily-unknown-field.json": ("V1", "Daily", ["12:00"], "Europe/Berlin", 2),
    "rest-enhanced-daily-no-policytype.json": ("V2", "Daily", ["01:00"], "Asia/Tokyo", 30),
    "rest-enhanced-hourly.json": ("V2", "Hourly", ["06:00", "10:00", "14:00", "18:00", "22:00"], "Asia/Calcutta", 3),
    "rest-enhanced-weekly.json": ("V2", "Weekly", ["23:30"], "America/Sao_Paulo", 7),
    "rest-standard-weekly-full.json": ("V1", "Weekly", ["03:30"], "Europe/Berlin", 5),
}


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_each_shape_reads_as_documented(name: str) -> None:
    policy = parse_policy(load(name))
    kind, frequency, times, iana, instant = SHAPES[name]
    assert (policy.policy_type, policy.schedule.frequency, policy.iana_zone) == (kind, frequency, iana)
    assert [t.strftime("%H:%M") for t in policy.schedule.run_times] == times
    assert policy.instant_rp_days == instant


def test_every_shape_is_in_the_table() -> None:
    assert sorted(SHAPES) == ACCEPTED


def test_the_enhanced_hourly_policy_fields() -> None:
    policy = parse_policy(load("rest-enhanced-hourly.json"))
    sched = policy.schedule
    assert (sched.interval_hours, sched.window_start and sched.window_start.isoformat(), sched.window_hours) == (
        4, "06:00:00", 16)  # fmt: skip
    assert policy.retention.daily is not None and policy.retention.daily.duration.count == 1
    assert policy.snapshot_consistency_type == "OnlyCrashConsistent"
    notes = "\n".join(policy_notes(policy))
    assert "fewer than 7 days" in notes and "resourceGuardOperationRequests: kept, not enforced" in notes
    assert "OnlyCrashConsistent: honoured" in notes and "5 backups a day" in notes
    assert "India Standard Time' is a Windows name" in notes


def test_notes_name_every_kept_but_not_enforced_field() -> None:
    notes = "\n".join(policy_notes(parse_policy(load("rest-standard-weekly-full.json"))))
    assert "tieringPolicy: kept, not enforced" in notes and "instantRPDetails: kept, not enforced" in notes
    assert "instantRpRetentionRangeInDays: kept, not enforced" in notes
    unknown = "\n".join(policy_notes(parse_policy(load("bare-short-daily-unknown-field.json"))))
    assert "vmvaultTestFutureField: not a field" in unknown and "3 day(s): honoured" in unknown
    assert policy_notes(parse_policy(load("az-show-standard-daily.json")))[0].startswith(
        "timeZone 'Pacific Standard Time' is a Windows name: times are computed in America/Los_Angeles")


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_another_kind_of_policy_is_refused_naming_it(name: str) -> None:
    with pytest.raises(PolicyError) as info:
        parse_policy(load(name))
    assert info.value.field == "backupManagementType"
    assert REFUSED[name] in str(info.value) and "AzureIaasVM" in str(info.value)


@pytest.mark.parametrize("kind", ["AzureIaaSVM", "azureiaasvm", "AZUREIAASVM"])
def test_a_case_variant_of_azure_iaas_vm_is_accepted(kind: str) -> None:
    document = load("az-show-standard-daily.json")
    document["properties"]["backupManagementType"] = kind
    assert to_properties(parse_policy(document))["backupManagementType"] == "AzureIaasVM"


def _hourly() -> dict[str, Any]:
    return properties_of(copy.deepcopy(load("rest-enhanced-hourly.json")))


BAD = [
    # (what, mutation, field named, words of the rule)
    ("interval 5", lambda p: p["schedulePolicy"]["hourlySchedule"].update(interval=5),
     "schedulePolicy.hourlySchedule.interval", "not one of 4, 6, 8, 12"),
    ("interval true", lambda p: p["schedulePolicy"]["hourlySchedule"].update(interval=True),
     "schedulePolicy.hourlySchedule.interval", "not one of"),
    ("window 0 hours", lambda p: p["schedulePolicy"]["hourlySchedule"].update(scheduleWindowDuration=0),
     "schedulePolicy.hourlySchedule.scheduleWindowDuration", "1-24"),
    ("window 25 hours", lambda p: p["schedulePolicy"]["hourlySchedule"].update(scheduleWindowDuration=25),
     "schedulePolicy.hourlySchedule.scheduleWindowDuration", "1-24"),
    ("window start missing", lambda p: p["schedulePolicy"]["hourlySchedule"].pop("scheduleWindowStartTime"),
     "schedulePolicy.hourlySchedule.scheduleWindowStartTime", "is required"),
    ("window start at a quarter past", lambda p: p["schedulePolicy"]["hourlySchedule"].update(
        scheduleWindowStartTime="2020-01-01T06:15:00Z"), "schedulePolicy.hourlySchedule.scheduleWindowStartTime",
     "not on the hour"),
    ("hourly and daily parts", lambda p: p["schedulePolicy"].update(
        dailySchedule={"scheduleRunTimes": ["2020-01-01T06:00:00Z"]}), "schedulePolicy.dailySchedule",
     "does not go with scheduleRunFrequency Hourly"),
    ("V1 fields in a V2 schedule", lambda p: p["schedulePolicy"].update(scheduleRunTimes=["2020-01-01T06:00:00Z"]),
     "schedulePolicy.scheduleRunTimes", "unknown field"),
    ("policyType V1 with a V2 schedule", lambda p: p.update(policyType="V1"), "policyType", "does not match"),
    ("policyType V3", lambda p: p.update(policyType="V3"), "policyType", "not V1 (Standard) or V2"),
    ("hourly without daily retention", lambda p: p["retentionPolicy"].pop("dailySchedule"),
     "retentionPolicy.dailySchedule", "required with a Hourly schedule"),
    ("retention time outside the window", lambda p: p["retentionPolicy"]["dailySchedule"].update(
        retentionTimes=["2020-01-01T07:00:00Z"]), "retentionPolicy.dailySchedule.retentionTimes[0]",
     "not the schedule's time"),
    ("unknown snapshot consistency", lambda p: p.update(snapshotConsistencyType="AppConsistentPlease"),
     "snapshotConsistencyType", "not one of Default, OnlyCrashConsistent"),
    ("unknown Windows zone", lambda p: p.update(timeZone="Atlantis Standard Time"), "timeZone", "unknown time zone"),
    ("resource guard requests not strings", lambda p: p.update(resourceGuardOperationRequests=[1]),
     "resourceGuardOperationRequests", "list of strings"),
    ("tiering not an object", lambda p: p.update(tieringPolicy="archive"), "tieringPolicy", "JSON object"),
    ("field given twice in two cases", lambda p: p.update(TimeZone="UTC"), "TimeZone", "given twice"),
    ("SimpleRetentionPolicy", lambda p: p["retentionPolicy"].update(retentionPolicyType="SimpleRetentionPolicy"),
     "retentionPolicy.retentionPolicyType", "not a VM retention"),
    ("a huge unknown field", lambda p: p.update(padding="x" * 70000), "(file)", "at most"),
]  # fmt: skip


@pytest.mark.parametrize(("what", "mutate", "field", "rule"), BAD, ids=[b[0] for b in BAD])
def test_a_bad_enhanced_policy_is_refused_naming_the_field(what: str, mutate: Any, field: str, rule: str) -> None:
    document = _hourly()
    mutate(document)
    with pytest.raises(PolicyError) as info:
        parse_policy(document)
    assert info.value.field == field, f"{what}: {info.value}"
    assert rule in str(info.value), f"{what}: {info.value}"


def test_windows_names_match_in_any_case_and_are_kept_as_given() -> None:
    document = _hourly()
    document["timeZone"] = "pacific standard time"
    policy = parse_policy(document)
    assert policy.iana_zone == "America/Los_Angeles" and to_properties(policy)["timeZone"] == "pacific standard time"
    document["timeZone"] = "UTC"
    assert parse_policy(document).iana_zone in ("UTC", "Etc/UTC")


def test_field_names_match_in_any_case() -> None:
    document = _hourly()
    document["SchedulePolicy"] = document.pop("schedulePolicy")
    document["SchedulePolicy"]["HourlySchedule"] = document["SchedulePolicy"].pop("hourlySchedule")
    assert parse_policy(document) == parse_policy(_hourly())


# ---- CLI ----------------------------------------------------------------------------------------


def test_each_shape_round_trips_through_the_cli(cli: Cli, tmp_path: Path) -> None:
    cli.ok("vault", "create", "v1", "--storage", str(tmp_path / "v1"), "--timezone", "Tokyo Standard Time")
    default = cli.ok("policy", "show", "DefaultPolicy", "--vault", "v1").json()
    assert default["properties"]["timeZone"] == "Tokyo Standard Time" and "Asia/Tokyo" in default["notes"][0]
    for i, name in enumerate(ACCEPTED):
        policy = f"P{i}"
        created = cli.ok("policy", "create", policy, "--vault", "v1", "--file", str(DATA / name)).json()
        shown = cli.ok("policy", "show", policy, "--vault", "v1").json()
        assert created == shown, name
        assert shown["properties"]["timeZone"] == properties_of(load(name))["timeZone"], name
        assert shown["notes"] == policy_notes(parse_policy(load(name))), name
        # show's output, as it is, is a valid file for set, and setting it changes nothing
        again = tmp_path / f"{policy}.json"
        again.write_text(json.dumps(shown))
        assert cli.ok("policy", "set", policy, "--vault", "v1", "--file", str(again)).json() == shown, name
        assert cli.ok("policy", "show", policy, "--vault", "v1").json() == shown, name
    table = cli.ok("policy", "list", "--vault", "v1", json_output=False).stdout
    assert "Hourly" in table and "Pacific Standard Time" in table and "06:00, 10:00, 14:00" in table


def test_another_kind_is_refused_by_the_cli_and_nothing_is_stored(cli: Cli, tmp_path: Path) -> None:
    cli.ok("vault", "create", "v1", "--storage", str(tmp_path / "v1"))
    for name, kind in REFUSED.items():
        r = cli.fails("policy", "create", "Other", "--vault", "v1", "--file", str(DATA / name))
        assert r.returncode == 64 and kind in r.stderr and "backupManagementType" in r.stderr, r
    assert [p["name"] for p in cli.ok("policy", "list", "--vault", "v1").json()] == ["DefaultPolicy"]


# ---- API ----------------------------------------------------------------------------------------


def _call(method: str, url: str, token: str, body: Any = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            text = response.read()
            return response.status, json.loads(text) if text else None
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def test_each_shape_round_trips_through_the_api(tmp_path: Path) -> None:
    cli = Cli(home=tmp_path / "home")
    cli.ok("vault", "create", "main")
    with served(cli) as (address, token):
        api = f"{address}/api/v1/vaults/main/policies"
        remote = Cli(home=tmp_path / "elsewhere", passphrase=None, extra_env={"VMVAULT_TOKEN": token})
        for i, name in enumerate(ACCEPTED):
            status, created = _call("POST", api, token, {"name": f"A{i}", "policy": load(name)})
            assert status in (200, 201), (name, created)
            assert created == cli.ok("policy", "show", f"A{i}", "--vault", "main").json(), name
            status, updated = _call("PUT", f"{api}/A{i}", token, {"policy": created})
            assert (status, updated) == (200, created), name
            # the CLI with --server: create from the file, show prints what the local CLI prints
            there = remote.ok("--server", address, "policy", "create", f"R{i}", "--vault", "main",
                              "--file", str(DATA / name)).json()  # fmt: skip
            assert there["properties"] == created["properties"] and there["notes"] == created["notes"], name
        for name, kind in REFUSED.items():
            status, error = _call("POST", api, token, {"name": "Other", "policy": load(name)})
            assert status in (400, 422) and kind in json.dumps(error), (status, error)
        status, listed = _call("GET", api, token)
        assert status == 200 and "Other" not in [p["name"] for p in listed["value"]]


# ---- the portal's policy form (its document goes through the same service as the CLI's) ------------


def test_the_portal_form_edits_an_enhanced_policy_and_keeps_what_it_does_not_show() -> None:
    from vmvault.web.policyform import PolicyForm

    stored = to_properties(parse_policy(load("az-show-enhanced-hourly.json")))
    form = PolicyForm.of("EveryFourHours", stored)
    assert (form.frequency, form.time, form.interval, form.window_hours, form.enhanced) == (
        "Hourly", "22:00", "6", "24", True)  # fmt: skip
    assert form.time_zone == "Pacific Standard Time"
    form.time, form.interval, form.window_hours, form.daily_days = "06:00", "8", "16", "10"
    edited = parse_policy(form.document(stored))
    assert [t.strftime("%H:%M") for t in edited.schedule.run_times] == ["06:00", "14:00", "22:00"]
    assert edited.policy_type == "V2" and edited.retention.daily is not None
    assert edited.retention.daily.duration.count == 10
    assert edited.extra["tieringPolicy"] == stored["tieringPolicy"], "kept fields survive an edit"
    # Daily in the form keeps an Enhanced policy Enhanced (Azure does not turn it back into Standard)
    form.frequency = "Daily"
    assert parse_policy(form.document(stored)).policy_type == "V2"
    # A Standard policy becomes Enhanced when the form asks for hourly backups
    standard = to_properties(parse_policy(load("az-show-standard-daily.json")))
    upgrade = PolicyForm.of("NightlyPST", standard)
    assert (upgrade.frequency, upgrade.enhanced) == ("Daily", False)
    upgrade.frequency = "Hourly"
    became = parse_policy(upgrade.document(standard))
    assert (became.policy_type, became.schedule.frequency, became.schedule.interval_hours) == ("V2", "Hourly", 4)
