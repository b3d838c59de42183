"""The tool parsers of preflight on the outputs the tools' own documentation shows (tests/data/preflight, sources in
its README) and on broken ones: a missing tool, garbage, empty output, the wrong JSON shape. Each broken case is one
clear line, never a traceback."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from llama3_hyperpod.preflight import checks
from llama3_hyperpod.preflight.parsers import (
    ParseError,
    fi_info_error,
    parse_core_list,
    parse_dpkg_versions,
    parse_fi_info,
    parse_neuron_ls,
    parse_version,
)
from llama3_hyperpod.preflight.tools import ToolError, ToolResult, run_tool

DATA = Path(__file__).resolve().parents[1] / "data" / "preflight"


def doc(name: str) -> str:
    return (DATA / name).read_text(encoding="utf-8")


def result(stdout: str, returncode: int = 0, stderr: str = "", tool: str = "neuron-ls") -> ToolResult:
    return ToolResult([f"/opt/aws/neuron/bin/{tool}"], returncode, stdout, stderr, 0.1)


def one_line(text: str) -> bool:
    return "\n" not in text and "Traceback" not in text and len(text) < 300


# ---------------------------------------------------------------------------------------------------- neuron-ls


def test_neuron_ls_documented_example_parses_to_devices_cores_and_processes() -> None:
    devices = parse_neuron_ls(doc("neuron-ls-json-trn2n-two-devices.json"))
    assert [d.index for d in devices] == [0, 15]
    first, last = devices
    assert first.nc_count == 4 and first.core_ids == (0, 1, 2, 3) and last.core_ids == (60, 61, 62, 63)
    assert first.memory_bytes == 103079215104  # 96 GiB of a Trainium2 device
    assert [(p.pid, p.runtime_version) for p in first.processes] == [(113985, "2.0.0")]
    assert first.processes[0].command.startswith("neuron-bench exec")


def test_neuron_ls_example_as_printed_in_the_docs_is_refused_in_one_line() -> None:
    """The documentation elides 14 devices with '...': not JSON, and the parser says where."""
    with pytest.raises(ParseError) as err:
        parse_neuron_ls(doc("neuron-ls-json-trn2n-doc.txt"))
    assert str(err.value).startswith("neuron-ls output is not JSON (Expecting value at line 30")
    assert one_line(str(err.value))


@pytest.mark.parametrize(("text", "message"), [
    ("", "neuron-ls printed nothing"),
    ("   \n", "neuron-ls printed nothing"),
    ("NEURON DEVICE | CORES", "neuron-ls output is not JSON"),
    ('{"neuron_device": 0}', "neuron-ls JSON is a dict, expected a list of devices"),
    ("[1, 2]", "neuron-ls device #0 is a int, expected an object"),
    ('[{"neuron_device": "0", "nc_count": 2}]', "'neuron_device' is '0', not an integer"),
    ('[{"neuron_device": 0, "nc_count": true}]', "'nc_count' is True, not an integer"),
    ('[{"neuron_device": 0, "nc_count": 2, "neuroncore_ids": "0-1"}]', "'neuroncore_ids' is '0-1'"),
    ('[{"neuron_device": 0, "nc_count": 2, "neuron_processes": {"pid": 1}}]', "'neuron_processes' is"),
    ('[{"neuron_device": 0, "nc_count": 2, "neuron_processes": [{"command": "x"}]}]', "'pid' is None"),
])
def test_neuron_ls_broken_outputs_are_one_line(text: str, message: str) -> None:
    with pytest.raises(ParseError) as err:
        parse_neuron_ls(text)
    assert message in str(err.value) and one_line(str(err.value))


def test_neuron_ls_without_core_ids_numbers_cores_device_by_device() -> None:
    devices = parse_neuron_ls('[{"neuron_device": 1, "nc_count": 2, "connected_to": null}]')
    assert devices[0].core_ids == (2, 3) and devices[0].processes == ()


def test_busy_core_is_named_with_its_pid_and_free_cores_pass() -> None:
    listing = result(doc("neuron-ls-json-trn2n-two-devices.json"))
    # 8 ranks take cores 0-7: device 0 (cores 0-3) is held by the documented neuron-bench process.
    devices, free, _ = checks.check_neuron_devices(listing, 8, None)
    assert devices.status == "PASS" and devices.measured.startswith("2 devices x 4 NeuronCores = 8")
    assert free.status == "FAIL"
    assert "pid 113985 (neuron-bench exec --run-as-cc-neff --...) on device 0 (cores 0-3)" in free.measured
    assert "stop them" in free.fix
    # NEURON_RT_VISIBLE_CORES=60-63: the job uses device 15 only, which the documented process holds as well.
    _, free15, _ = checks.check_neuron_devices(listing, 4, {60, 61, 62, 63})
    assert free15.status == "FAIL" and "device 15 (cores 60-63)" in free15.measured
    assert "device 0" not in free15.measured


def test_too_few_neuroncores_fail_and_no_processes_pass() -> None:
    quiet = '[{"neuron_device": 0, "nc_count": 2, "neuroncore_ids": [0, 1], "neuron_processes": []}]'
    devices, free, _ = checks.check_neuron_devices(result(quiet), 32, None)
    assert devices.status == "FAIL" and "1 devices x 2 NeuronCores = 2, the plan needs 32" in devices.measured
    assert free.status == "PASS" and free.measured == "no other process on cores 0-1"
    _, outside, _ = checks.check_neuron_devices(result(quiet), 2, {4})
    assert outside.status == "FAIL" and "names cores [4]" in outside.measured


@pytest.mark.parametrize("outcome", [
    ToolError("neuron-ls not found on PATH or in /opt/aws/neuron/bin (it comes with aws-neuronx-tools)"),
    result("", returncode=1, stderr="ERROR: Failed to open neuron device\n"),
    result("garbage {"),
])
def test_neuron_ls_failures_fail_both_checks_in_one_line(outcome: ToolResult | ToolError) -> None:
    devices, free, found = checks.check_neuron_devices(outcome, 2, None)
    assert (devices.status, free.status, found) == ("FAIL", "FAIL", [])
    assert one_line(devices.line()) and one_line(free.line())


# ------------------------------------------------------------------------------------------------------ fi_info


def test_fi_info_documented_efa_output_passes() -> None:
    interfaces = parse_fi_info(doc("fi_info-efa-p3dn-ec2-doc.txt"))
    assert [(i.provider, i.domain, i.version, i.ep_type, i.protocol) for i in interfaces] == [
        ("efa", "efa_0-rdm", "2.0", "FI_EP_RDM", "FI_PROTO_EFA")]
    check = checks.check_efa_provider(result(doc("fi_info-efa-p3dn-ec2-doc.txt"), tool="fi_info"), None)
    assert check.status == "PASS" and check.measured == "1 FI_EP_RDM interfaces (efa_0-rdm), provider version 2.0"
    warned = checks.check_efa_provider(result(doc("fi_info-efa-p3dn-ec2-doc.txt"), tool="fi_info"), "tcp")
    assert warned.status == "WARN" and "FI_PROVIDER=tcp" in warned.measured


@pytest.mark.parametrize("name", ["fi_info-verbs-dgram-libfabric-doc.txt", "fi_info-tcp-libfabric-doc.txt"])
def test_fi_info_documented_other_providers_parse_but_are_not_efa(name: str) -> None:
    interfaces = parse_fi_info(doc(name))
    assert len(interfaces) == 1 and interfaces[0].provider in {"verbs", "tcp"} and interfaces[0].version == "116.0"
    check = checks.check_efa_provider(result(doc(name), tool="fi_info"), None)
    assert check.status == "FAIL" and check.measured == "fi_info listed 1 interfaces, none of provider efa"


def test_fi_info_two_documented_outputs_concatenated_are_two_blocks() -> None:
    text = doc("fi_info-verbs-dgram-libfabric-doc.txt") + doc("fi_info-tcp-libfabric-doc.txt")
    assert [i.provider for i in parse_fi_info(text)] == ["verbs", "tcp"]


@pytest.mark.parametrize(("text", "message"), [
    ("", "fi_info printed nothing"),
    (doc("fi_info-verbose-libfabric-doc.txt"), "fi_info line 1 is not a 'key: value' line of its summary output"),
    ("    fabric: efa\n", "fi_info line 1 (fabric) comes before any 'provider:' line"),
    ("provider: efa\n    fabric: efa\n", "lacks domain, protocol, type, version"),
    ("\x00\x01garbage", "fi_info line 1 is not a 'key: value' line"),
])
def test_fi_info_broken_outputs_are_one_line(text: str, message: str) -> None:
    with pytest.raises(ParseError) as err:
        parse_fi_info(text)
    assert message in str(err.value) and one_line(str(err.value))


def test_fi_info_no_efa_interface_is_named_from_its_exit_code() -> None:
    """util/info.c prints `fi_getinfo: -61` and exits 61 (FI_ENODATA) when nothing matches the filter."""
    assert "FI_ENODATA" in fi_info_error(61, "fi_getinfo: -61\n")
    assert fi_info_error(1, "") == "fi_info exited 1: no message"
    check = checks.check_efa_provider(result("", 61, "fi_getinfo: -61\n", tool="fi_info"), None)
    assert check.status == "FAIL" and "no interface of that provider on this node" in check.measured


# ----------------------------------------------------------------------------------------- dpkg, versions, cores


def test_dpkg_versions_and_runtime_pins() -> None:
    pins = {"aws-neuronx-runtime-lib": "2.30.51.0", "aws-neuronx-tools": "2.28.23.0"}
    out = "aws-neuronx-runtime-lib 2.30.51.0-faa1b8a6e\naws-neuronx-tools 2.28.23.0-f3c1ecb2d\n"
    assert parse_dpkg_versions(out) == {"aws-neuronx-runtime-lib": "2.30.51.0-faa1b8a6e",
                                        "aws-neuronx-tools": "2.28.23.0-f3c1ecb2d"}
    assert checks.check_neuron_runtime(result(out, tool="dpkg-query"), pins).status == "PASS"
    older = out.replace("2.30.51.0", "2.29.40.0")
    wrong = checks.check_neuron_runtime(result(older, tool="dpkg-query"), pins)
    assert wrong.status == "FAIL" and "aws-neuronx-runtime-lib 2.29.40.0-faa1b8a6e (pinned 2.30.51.0)" in wrong.measured
    # dpkg-query lists what it found on stdout and exits 1 for the rest.
    missing = checks.check_neuron_runtime(result("aws-neuronx-tools 2.28.23.0\n", 1, "dpkg-query: no packages "
                                                 "found matching aws-neuronx-runtime-lib\n", tool="dpkg-query"), pins)
    assert missing.status == "FAIL" and missing.measured == "aws-neuronx-runtime-lib not installed in this image"
    prefix = checks.check_neuron_runtime(result("aws-neuronx-runtime-lib 2.30.51.01\naws-neuronx-tools 2.28.23.0\n",
                                                tool="dpkg-query"), pins)
    assert prefix.status == "FAIL"  # 2.30.51.01 is not 2.30.51.0
    with pytest.raises(ParseError):
        parse_dpkg_versions("just-one-field\n")


def test_driver_versions_compare_numerically() -> None:
    assert parse_version("2.26.5.0") == (2, 26, 5, 0)
    assert parse_version("2.9.4.0-8a6fdf29") < parse_version("2.26.5.0")  # 9 < 26: numbers, not strings
    assert checks.check_neuron_driver("2.26.5.0", "2.26.5.0", "2.28.0", "2.30.51.0").status == "PASS"
    old = checks.check_neuron_driver("2.24.7.0", "2.26.5.0", "2.28.0", "2.30.51.0")
    assert old.status == "FAIL" and old.measured == ("2.24.7.0 loaded; Neuron 2.28.0 (runtime 2.30.51.0) was released "
                                                     "with driver 2.26.5.0")
    assert checks.check_neuron_driver(None, "2.26.5.0", "2.28.0", "x").measured.startswith("not loaded")
    assert checks.check_neuron_driver("weird", "2.26.5.0", "2.28.0", "x").status == "WARN"


def test_visible_core_lists() -> None:
    assert parse_core_list("0-3,8, 10-11") == {0, 1, 2, 3, 8, 10, 11}
    for bad in ("a", "3-1", "1,,2", "-1"):
        with pytest.raises(ParseError):
            parse_core_list(bad)


# ------------------------------------------------------------------------------------------------ running tools


def test_missing_tool_is_one_line() -> None:
    with pytest.raises(ToolError) as err:
        run_tool(["neuron-ls-not-installed-here", "--json-output"], package="aws-neuronx-tools")
    assert str(err.value).startswith("neuron-ls-not-installed-here not found on PATH or in /opt/aws/neuron/bin")
    assert "aws-neuronx-tools" in str(err.value) and one_line(str(err.value))


def test_hanging_tool_times_out_in_one_line() -> None:
    with pytest.raises(ToolError) as err:
        run_tool([sys.executable, "-c", "import time; time.sleep(30)"], package="python", timeout=0.5)
    assert str(err.value) == f"{sys.executable} did not answer within 0.5 s"


def test_failing_tool_reports_its_exit_code_and_stderr() -> None:
    failing = run_tool([sys.executable, "-c", "import sys; sys.stderr.write('no device\\n'); sys.exit(3)"],
                       package="python")
    assert failing.returncode == 3 and failing.stderr == "no device\n"
    devices, _, _ = checks.check_neuron_devices(failing, 2, None)
    assert devices.status == "FAIL" and devices.measured.endswith("exited 3: no device")


def test_nvidia_smi_csv() -> None:
    gpus = checks.parse_nvidia_smi("0, 81559, 0\n1, 81559, 4000\n")
    assert [(g.index, g.total // 2**20, g.used // 2**20) for g in gpus] == [(0, 81559, 0), (1, 81559, 4000)]
    with pytest.raises(ParseError):
        checks.parse_nvidia_smi("[N/A], 81559, 0\n")
