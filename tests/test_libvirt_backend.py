"""The libvirt backend's own parts: its domain XML for every flavor (checked with libvirt's own
schema by ``virt-xml-validate``), its state table, its options, and real guests through a
libvirtd it starts itself (tests marked ``guest``; ``scripts/setup_libvirt.sh`` sets the host up).

The contract (rules 1-7) is checked by ``tests/test_backend_contract.py`` like every backend's.
Xen and ESX hosts do not exist here: their XML is only schema-checked, and the tests check that
the backend says so.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from conftest import SpecFactory, processes_naming
from lxml import etree

from vmplant_service.backends import load_backend
from vmplant_service.backends.base import GuestSpec, Nic, VMState
from vmplant_service.backends.domainxml import (
    QEMU_NS,
    VMSHOP_NS,
    DomainOptions,
    domain_name,
    domain_uuid,
    domain_xml,
)
from vmplant_service.backends.libvirt import (
    LIBVIRT_STATES,
    NOT_EXERCISED,
    LibvirtBackend,
    translate_state,
)
from vmplant_service.channel import ActionContext, Channel
from vmplant_service.segment import VdeSegment, mac_for
from vmshop_common.dag import NetworkAction, ScriptAction
from vmshop_common.errors import BackendError, ConfigurationError

BOOT_TIMEOUT = 120.0
SEGMENT_NET = "192.168.78."
#: What the tests run against: this host's privileged daemon, started on demand (exits 20 s after use).
OPTIONS = {"uri": "qemu:///system", "daemon": "spawn", "daemon_timeout": "10"}
FLAVOR_OPTIONS = {
    "qemu": DomainOptions(),
    "kvm": DomainOptions(flavor="kvm", domain_type="kvm", dac_label=None),
    "xen-pv": DomainOptions(flavor="xen", xen_mode="pv"),
    "xen-hvm": DomainOptions(flavor="xen", xen_mode="hvm"),
    "esx-e1000": DomainOptions(flavor="esx", bridge="VM Network", nic_model="e1000"),
    "esx-vmxnet3": DomainOptions(flavor="esx", bridge="VM Network", nic_model="vmxnet3"),
}


def spec_on_paper(tmp_path: Path, **changes: object) -> GuestSpec:
    """A spec whose files need not exist (for the XML only)."""
    nics = (Nic("user", "52:54:00:00:00:01", host_port=18080), Nic("user", "52:54:00:00:00:02"),
            Nic("segment", "52:54:00:00:00:03", switch=str(tmp_path / "sw,1.ctl")))
    spec = GuestSpec(vm_id="paper", disk=tmp_path / "disk.qcow2", memory=128, vcpus=2, run_dir=tmp_path / "run",
                     channel_dir=tmp_path / "channel", kernel=tmp_path / "vmlinux", initrd=tmp_path / "initrd.img",
                     cmdline="console=ttyS0 quiet a=<&>", machine="q35", data_dir=tmp_path / "data", nics=nics)
    return replace(spec, **changes)  # type: ignore[arg-type]


def parse(xml: str) -> etree._Element:
    return etree.fromstring(xml.encode())


def validate(xml: str, where: Path) -> None:
    """``virt-xml-validate FILE domain``: libvirt's own RelaxNG schema (Debian's libvirt-clients)."""
    tool = shutil.which("virt-xml-validate")
    if tool is None or shutil.which("xmllint") is None:
        pytest.fail("virt-xml-validate (libvirt-clients) and xmllint (libxml2-utils) are needed: "
                    "run 'bash scripts/setup_libvirt.sh'", pytrace=False)
    path = where / "domain.xml"
    path.write_text(xml)
    checked = subprocess.run([tool, str(path), "domain"], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr


# The domain XML -------------------------------------------------------------------------------
@pytest.mark.parametrize("flavor", sorted(FLAVOR_OPTIONS))
def test_domain_xml_is_valid_for_libvirt(flavor: str, tmp_path: Path) -> None:
    spec = spec_on_paper(tmp_path)
    if flavor.startswith(("xen", "esx")):
        spec = replace(spec, nics=tuple(nic for nic in spec.nics if nic.kind == "segment"))
    validate(domain_xml(spec, FLAVOR_OPTIONS[flavor]), tmp_path)
    validate(domain_xml(replace(spec, nics=(), data_dir=None, initrd=None, cmdline=""), FLAVOR_OPTIONS[flavor]),
             tmp_path)


def test_qemu_domain_xml(tmp_path: Path) -> None:
    spec = spec_on_paper(tmp_path)
    root = parse(domain_xml(spec, DomainOptions()))
    assert root.get("type") == "qemu"
    assert root.findtext("name") == "vmshop-paper" == domain_name("paper")
    assert root.findtext("uuid") == domain_uuid("paper") == domain_uuid("paper")
    assert root.find("memory").get("unit") == "MiB" and root.findtext("memory") == "128"
    assert root.findtext("vcpu") == "2"
    os_type = root.find("os/type")
    assert (os_type.text, os_type.get("arch"), os_type.get("machine")) == ("hvm", "x86_64", "q35")
    assert root.findtext("os/kernel") == str(tmp_path / "vmlinux")
    assert root.findtext("os/initrd") == str(tmp_path / "initrd.img")
    assert root.findtext("os/cmdline") == "console=ttyS0 quiet a=<&>"
    assert root.find("features/acpi") is not None
    assert [root.findtext(e) for e in ("on_poweroff", "on_reboot", "on_crash")] == ["destroy"] * 3
    disk = root.find("devices/disk")
    assert disk.find("driver").attrib == {"name": "qemu", "type": "qcow2", "cache": "unsafe"}
    assert disk.find("source").get("file") == str(tmp_path / "disk.qcow2")
    assert disk.find("target").attrib == {"dev": "vda", "bus": "virtio"}
    shares = [(fs.get("accessmode"), fs.find("source").get("dir"), fs.find("target").get("dir"),
               fs.find("readonly") is not None) for fs in root.iterfind("devices/filesystem")]
    assert shares == [("passthrough", str(tmp_path / "channel"), "vmshop", False),
                      ("passthrough", str(tmp_path / "data"), "vmdata", True)]
    assert root.find("devices/serial/source").get("path") == str(tmp_path / "run" / "console.log")
    assert root.find("devices/interface") is None, "NICs are QEMU arguments (libvirt has no restrict=on, no VDE)"
    assert root.find("seclabel").attrib == {"type": "static", "model": "dac", "relabel": "no"}
    assert root.findtext("seclabel/label") == "+0:+0"
    identity = root.find(f"metadata/{{{VMSHOP_NS}}}vm")
    assert identity.attrib == {"id": "paper", "run_dir": str(tmp_path / "run"), "disk": str(tmp_path / "disk.qcow2")}
    args = [arg.get("value") for arg in root.iterfind(f"{{{QEMU_NS}}}commandline/{{{QEMU_NS}}}arg")]
    assert args[0::2] == ["-netdev", "-device"] * 3
    netdevs = [json.loads(value) for value in args[1::4]]
    devices = [json.loads(value) for value in args[3::4]]
    assert netdevs == [
        {"type": "user", "id": "vmshop-net0", "restrict": True, "hostfwd": [{"str": "tcp:127.0.0.1:18080-:80"}]},
        {"type": "user", "id": "vmshop-net1", "restrict": True},
        {"type": "vde", "id": "vmshop-net2", "sock": str(tmp_path / "sw,1.ctl")}]
    assert [(d["driver"], d["netdev"], d["mac"], d["romfile"]) for d in devices] == [
        ("virtio-net-pci", f"vmshop-net{i}", f"52:54:00:00:00:0{i + 1}", "") for i in range(3)]
    assert "0.0.0.0" not in etree.tostring(root, encoding="unicode")


def test_qemu_domain_xml_variants(tmp_path: Path) -> None:
    plain = parse(domain_xml(spec_on_paper(tmp_path, nics=(), data_dir=None, initrd=None),
                             DomainOptions(domain_type="kvm", dac_label=None, disk_cache="writeback")))
    assert plain.get("type") == "kvm"
    assert plain.find(f"{{{QEMU_NS}}}commandline") is None and plain.find("seclabel") is None
    assert plain.find("os/initrd") is None
    assert [fs.find("target").get("dir") for fs in plain.iterfind("devices/filesystem")] == ["vmshop"]
    assert plain.find("devices/disk/driver").get("cache") == "writeback"


def test_xen_domain_xml(tmp_path: Path) -> None:
    spec = spec_on_paper(tmp_path, nics=(Nic("segment", "52:54:00:00:00:03"),))
    pv = parse(domain_xml(spec, DomainOptions(flavor="xen")))
    assert pv.get("type") == "xen"
    assert (pv.findtext("os/type"), pv.find("os/type").get("machine")) == ("linux", "xenpv")
    assert pv.findtext("os/kernel") == str(tmp_path / "vmlinux") and pv.findtext("os/cmdline")
    assert pv.find("devices/disk/driver").get("type") == "qcow2"
    assert pv.find("devices/disk/source").get("file") == str(tmp_path / "disk.qcow2")
    assert pv.find("devices/disk/target").attrib == {"dev": "xvda", "bus": "xen"}
    assert [fs.find("target").get("dir") for fs in pv.iterfind("devices/filesystem")] == ["vmshop", "vmdata"]
    [interface] = pv.findall("devices/interface")
    assert interface.get("type") == "bridge" and interface.find("source").get("bridge") == "xenbr0"
    assert interface.find("mac").get("address") == "52:54:00:00:00:03"
    hvm = parse(domain_xml(spec, DomainOptions(flavor="xen", xen_mode="hvm", bridge="br-vmshop")))
    assert (hvm.findtext("os/type"), hvm.find("os/type").get("machine")) == ("hvm", "xenfv")
    assert hvm.find("features/acpi") is not None and hvm.findtext("os/kernel")
    assert hvm.find("devices/interface/source").get("bridge") == "br-vmshop"


def test_esx_domain_xml(tmp_path: Path) -> None:
    spec = spec_on_paper(tmp_path, nics=(Nic("segment", "52:54:00:00:00:03"), Nic("segment", "52:54:00:00:00:04")))
    root = parse(domain_xml(spec, DomainOptions(flavor="esx", bridge="VM Network", nic_model="vmxnet3")))
    assert root.get("type") == "vmware"
    assert root.find("os/kernel") is None and root.find("devices/filesystem") is None
    assert root.find("devices/disk/source").get("file") == "[datastore1] vmshop/paper.vmdk"
    assert root.find("devices/controller").get("model") == "lsilogic"
    assert [(i.find("source").get("bridge"), i.find("model").get("type"), i.find("mac").get("address"))
            for i in root.iterfind("devices/interface")] == [
        ("VM Network", "vmxnet3", "52:54:00:00:00:03"), ("VM Network", "vmxnet3", "52:54:00:00:00:04")]
    other = parse(domain_xml(spec, DomainOptions(flavor="esx", datastore="ssd2")))
    assert other.find("devices/disk/source").get("file") == "[ssd2] vmshop/paper.vmdk"
    assert other.find("devices/interface/model").get("type") == "e1000"


# States ----------------------------------------------------------------------------------------
def test_state_table() -> None:
    expected = {0: VMState.UNKNOWN, 1: VMState.RUNNING, 2: VMState.RUNNING, 3: VMState.PAUSED, 4: VMState.RUNNING,
                5: VMState.STOPPED, 6: VMState.CRASHED, 7: VMState.PAUSED, 8: VMState.UNKNOWN, -1: VMState.UNKNOWN}
    for state, vm_state in expected.items():
        assert translate_state(state) == vm_state, state
    assert set(LIBVIRT_STATES) <= set(expected)


def test_state_numbers_are_libvirts() -> None:
    libvirt = pytest.importorskip("libvirt", reason="libvirt-python is installed by scripts/setup_libvirt.sh")
    names = {"RUNNING": 1, "BLOCKED": 2, "PAUSED": 3, "SHUTDOWN": 4, "SHUTOFF": 5, "CRASHED": 6,
             "PMSUSPENDED": 7, "NOSTATE": 0}
    for name, number in names.items():
        assert getattr(libvirt, f"VIR_DOMAIN_{name}") == number, name


# Options and what the backend says about itself -------------------------------------------------
@pytest.mark.parametrize("options", [
    {"flavor": "vbox"}, {"domain_type": "xen"}, {"daemon": "sometimes"}, {"flavor": "esx"},
    {"uri": "qemu+ssh://root@kvmhost/system", "daemon": "spawn"}, {"dac_label": "root"},
    {"disk_cache": "fast"}, {"daemon_timeout": "-1"}, {"max_vcpus": "many"},
])
def test_bad_options(options: dict[str, str]) -> None:
    with pytest.raises(ConfigurationError):
        load_backend("libvirt", options)


def test_defaults() -> None:
    backend = LibvirtBackend({})
    assert backend.uri == ("qemu:///system" if os.geteuid() == 0 else "qemu:///session")
    assert backend.domain_type == "qemu" and backend.daemon == "external"
    assert LibvirtBackend({"flavor": "xen"}).uri == "xen:///system"
    assert LibvirtBackend({"flavor": "kvm"}).domain_type == "kvm"
    remote = LibvirtBackend({"uri": "qemu+ssh://root@kvmhost/system"})
    assert remote.xml_options.dac_label is None  # a remote daemon runs QEMU as its own user


def test_unreachable_daemon_is_unavailable_with_the_reason() -> None:
    pytest.importorskip("libvirt", reason="libvirt-python is installed by scripts/setup_libvirt.sh")
    caps = LibvirtBackend({"uri": "qemu+unix:///system?socket=/nonexistent/libvirt-sock"}).capabilities()
    assert not caps.available and "/nonexistent/libvirt-sock" in caps.reason and caps.name == "libvirt"


@pytest.mark.parametrize("options, flavor", [
    ({"flavor": "xen", "uri": "xen+unix:///system?socket=/nonexistent/libvirt-sock"}, "xen"),
    ({"flavor": "esx", "uri": "esx://127.0.0.1/?no_verify=1"}, "esx"),
])
def test_xen_and_esx_say_they_were_not_exercised(options: dict[str, str], flavor: str) -> None:
    pytest.importorskip("libvirt", reason="libvirt-python is installed by scripts/setup_libvirt.sh")
    caps = LibvirtBackend(options).capabilities()
    assert not caps.available
    assert NOT_EXERCISED[flavor] in caps.reason and "never" in caps.reason
    assert caps.networks == ("segment",)


@pytest.mark.parametrize("change, message", [
    ({"nics": (Nic("tap", "52:54:00:00:00:01"),)}, "kind"),
    ({"nics": (Nic("user", "52:54:00:00:00:0G"),)}, "MAC"),
    ({"nics": (Nic("segment", "52:54:00:00:00:01", switch="/nonexistent/sw.ctl"),)}, "switch"),
    ({"vm_id": "a/b"}, "VM id"),
    ({"memory": 0}, "positive"),
    ({"disk": Path("/nonexistent/disk.qcow2")}, "disk"),
    ({"channel_dir": Path("/nonexistent/channel")}, "channel"),
    ({"data_dir": Path("/nonexistent/data")}, "data"),
])
def test_refused_specs_make_nothing(tmp_path: Path, change: dict[str, object], message: str) -> None:
    for name in ("disk.qcow2", "vmlinux", "initrd.img"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "channel").mkdir()
    (tmp_path / "data").mkdir()
    spec = spec_on_paper(tmp_path, **{"nics": (), **change})
    backend = LibvirtBackend({"uri": "qemu+unix:///system?socket=/nonexistent/libvirt-sock"})
    with pytest.raises(BackendError, match=message):
        backend.start(spec)
    assert not Path(spec.run_dir).exists() and backend.running() == []


def test_esx_xml_from_the_backend(tmp_path: Path) -> None:
    backend = LibvirtBackend({"flavor": "esx", "uri": "esx://127.0.0.1/?no_verify=1"})
    xml = backend.ex_domain_xml(spec_on_paper(tmp_path, nics=()))
    assert parse(xml).get("type") == "vmware"


# Real guests through libvirt --------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def spawned_daemons() -> list[tuple[int, str]]:
    """The libvirtd/virtlogd processes that daemon=spawn started (their command line says so)."""
    return [(pid, args) for pid, args in processes_naming("--daemon --timeout")
            if args.split()[0].endswith(("/libvirtd", "/virtlogd"))]


def vmshop_domains() -> list[str]:
    """Names of every domain (running or only defined) of this test run's plant prefix."""
    import libvirt
    conn = libvirt.open("qemu:///system")
    try:
        return sorted(d.name() for d in conn.listAllDomains() if d.name().startswith("vmshop-lvt"))
    finally:
        conn.close()


@dataclass
class Guest:
    spec: GuestSpec
    channel: Channel
    port: int
    address: str
    ready_seconds: float = 0.0

    @property
    def segment_mac(self) -> str:
        return next(nic.mac for nic in self.spec.nics if nic.kind == "segment")

    def run(self, body: str, timeout: int = 30) -> tuple[int, str]:
        name = self.channel.submit(ScriptAction(id="t", body=body, script_timeout=timeout), ActionContext())
        result = self.channel.wait(name, timeout)
        return result.status, result.output


@dataclass
class Pair:
    backend: LibvirtBackend
    guests: list[Guest]
    data_dir: Path


def is_running(backend: LibvirtBackend, vm_id: str) -> bool:
    return backend.state(vm_id) == VMState.RUNNING


@pytest.fixture(scope="module")
def daemons_end_by_themselves() -> Iterator[None]:
    """After the module, the spawned daemons must exit by themselves (nothing of libvirt is left running)."""
    yield
    deadline = time.monotonic() + float(OPTIONS["daemon_timeout"]) + 20
    while spawned_daemons() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert spawned_daemons() == [], "libvirtd/virtlogd started by daemon=spawn did not exit when idle"


@pytest.fixture(scope="module")
def backend(daemons_end_by_themselves: None) -> Iterator[LibvirtBackend]:
    instance = LibvirtBackend(OPTIONS)
    yield instance
    instance.close()


@pytest.fixture(scope="module")
def pair(backend: LibvirtBackend, guest_specs: SpecFactory, guest_tmp: Path) -> Iterator[Pair]:
    """Two guests through libvirt, booted at once: each a user NIC (forward to its httpd) and a VDE NIC."""
    segment = VdeSegment(guest_tmp / "lvt-segment")
    segment.start()
    data_dir = guest_tmp / "lvt-data"
    data_dir.mkdir()
    (data_dir / "hello.txt").write_text("application data\n")
    guests: list[Guest] = []
    try:
        for index in (1, 2):
            port = free_port()
            nics = (Nic("user", mac_for(f"lvt-{index}", 0), host_port=port),
                    Nic("segment", mac_for(f"lvt-{index}", 1), switch=str(segment.control)))
            spec = guest_specs.new("lvt", nics=nics, data_dir=data_dir if index == 1 else None)
            guests.append(Guest(spec, Channel(spec.channel_dir), port, f"{SEGMENT_NET}{10 + index}"))
        started = time.monotonic()
        for guest in guests:
            backend.start(guest.spec)
        for guest in guests:
            guest.channel.wait_agent(BOOT_TIMEOUT, alive=functools.partial(is_running, backend, guest.spec.vm_id))
            guest.ready_seconds = time.monotonic() - started
        yield Pair(backend, guests, data_dir)
    finally:
        for guest in guests:
            backend.destroy(guest.spec.vm_id)
        segment.stop()
    assert vmshop_domains() == []
    assert [args for guest in guests for _, args in processes_naming(str(guest.spec.disk))] == []


@pytest.mark.guest
def test_guest_runs_through_libvirt(pair: Pair) -> None:
    import libvirt
    guest = pair.guests[0]
    print(f"two guests through libvirt: agent ready after {[round(g.ready_seconds, 1) for g in pair.guests]} s")
    status, output = guest.run("echo hello from $(hostname)")
    assert (status, output) == (0, "hello from vmshop-guest\n")
    assert pair.backend.running() == sorted(g.spec.vm_id for g in pair.guests)
    conn = libvirt.open("qemu:///system")
    try:
        domain = conn.lookupByName(domain_name(guest.spec.vm_id))
        assert domain.isPersistent() and domain.isActive()
        live = parse(domain.XMLDesc(0))
        assert live.find("seclabel[@model='dac']/label").text == "+0:+0"
    finally:
        conn.close()
    [(pid, args)] = processes_naming(str(guest.spec.disk))
    assert "restrict" in args and "127.0.0.1" in args and "0.0.0.0" not in args
    assert os.stat(f"/proc/{pid}").st_uid == 0
    assert "vmshop-agent" in pair.backend.ex_console(guest.spec.vm_id)


@pytest.mark.guest
def test_cached_image_is_untouched(pair: Pair, guest_specs: SpecFactory) -> None:
    image = guest_specs.image
    assert image is not None
    for part in (image.disk, image.kernel, image.initrd):
        assert os.stat(part).st_uid == 0, f"libvirt chowned {part}"
    before = hashlib.sha256(Path(image.disk).read_bytes()).hexdigest()
    assert pair.guests[0].run("sync; echo written > /root/x; sync")[0] == 0
    assert hashlib.sha256(Path(image.disk).read_bytes()).hexdigest() == before


@pytest.mark.guest
def test_host_reaches_each_guests_httpd(pair: Pair) -> None:
    for guest in pair.guests:
        with urllib.request.urlopen(f"http://127.0.0.1:{guest.port}/", timeout=10) as reply:
            assert b"vmshop-guest" in reply.read()


@pytest.mark.guest
def test_user_network_is_restricted(pair: Pair) -> None:
    """restrict=on through the passed-through netdev: the guest reaches no server of the host."""
    listeners = []
    out = subprocess.run(["ip", "-o", "route", "get", "1.1.1.1"], capture_output=True, text=True).stdout.split()
    for address in ["127.0.0.1"] + ([out[out.index("src") + 1]] if "src" in out else []):
        listener = socket.socket()
        listener.bind((address, 0))
        listener.listen(4)
        listener.setblocking(False)
        listeners.append(listener)
    targets = [f"10.0.2.2:{listeners[0].getsockname()[1]}"]
    targets += [":".join(map(str, listener.getsockname())) for listener in listeners[1:]]
    try:
        body = "".join(f"timeout 5 wget -q -O - http://{target}/ && echo REACHED {target}; " for target in targets)
        status, output = pair.guests[0].run(body + "exit 0")
        accepted = []
        for listener in listeners:
            try:
                accepted.append(listener.accept())
            except BlockingIOError:
                pass
    finally:
        for listener in listeners:
            listener.close()
    assert status == 0 and "REACHED" not in output, output
    assert accepted == [], f"a guest connected to the host: {accepted}"


@pytest.mark.guest
def test_guests_ping_each_other_on_the_vde_segment(pair: Pair) -> None:
    for guest in pair.guests:
        context = ActionContext(segment_mac=guest.segment_mac)
        name = guest.channel.submit(NetworkAction(id="net", mode="static", address=guest.address, prefix=24), context)
        result = guest.channel.wait(name, 30)
        assert result.ok, result.output
    first, second = pair.guests
    status, output = first.run(f"ping -c 3 -W 2 {second.address}")
    assert status == 0 and " 0% packet loss" in output, output


@pytest.mark.guest
def test_data_share_is_read_only(pair: Pair) -> None:
    status, output = pair.guests[0].run(
        "mkdir -p /mnt/d && mount -t 9p -o trans=virtio,version=9p2000.L,ro vmdata /mnt/d && cat /mnt/d/hello.txt; "
        "touch /mnt/d/new 2>/dev/null && echo WROTE; umount /mnt/d; exit 0")
    assert status == 0 and output.startswith("application data\n") and "WROTE" not in output, output
    assert sorted(p.name for p in pair.data_dir.iterdir()) == ["hello.txt"]


@pytest.mark.guest
def test_stop_powers_down_and_keeps_the_definition_until_destroy(pair: Pair) -> None:
    import libvirt
    guest = pair.guests[1]
    started = time.monotonic()
    pair.backend.stop(guest.spec.vm_id, timeout=30)
    took = time.monotonic() - started
    print(f"{guest.spec.vm_id}: stop (ACPI power-down through libvirt) took {took:.1f} s")
    assert took < 30 and pair.backend.state(guest.spec.vm_id) == VMState.STOPPED
    assert "Power down" in pair.backend.ex_console(guest.spec.vm_id)
    assert processes_naming(str(guest.spec.disk)) == []
    assert domain_name(guest.spec.vm_id) in vmshop_domains()  # stopped: still defined (rule 3 keeps its files)
    restarted = LibvirtBackend(OPTIONS)
    assert restarted.adopt(guest.spec) is False
    restarted.close()
    pair.backend.destroy(guest.spec.vm_id)
    assert domain_name(guest.spec.vm_id) not in vmshop_domains()
    assert not Path(guest.spec.run_dir).exists()
    assert not Path(f"/var/log/libvirt/qemu/{domain_name(guest.spec.vm_id)}.log").exists()
    conn = libvirt.open("qemu:///system")
    try:
        with pytest.raises(libvirt.libvirtError):
            conn.lookupByName(domain_name(guest.spec.vm_id))
    finally:
        conn.close()


def _garbage_kernel(spec: GuestSpec, where: Path) -> GuestSpec:
    kernel = where / "not-a-kernel"
    kernel.write_bytes(b"this is not a kernel\n" * 100)
    return replace(spec, kernel=kernel)


@pytest.mark.guest
@pytest.mark.parametrize("breaks", ["machine", "kernel"])
def test_failed_start_leaves_nothing(backend: LibvirtBackend, guest_specs: SpecFactory, guest_tmp: Path,
                                     breaks: str) -> None:
    spec = guest_specs.new("lvt-fail", nics=(Nic("user", mac_for("lvt-fail", 0), host_port=free_port()),))
    spec = replace(spec, machine="no-such-machine") if breaks == "machine" else _garbage_kernel(spec, guest_tmp)
    with pytest.raises(BackendError, match="define" if breaks == "machine" else "kernel"):
        backend.start(spec)
    assert vmshop_domains() == [] or domain_name(spec.vm_id) not in vmshop_domains()
    assert processes_naming(str(spec.disk)) == []
    assert not Path(spec.run_dir).exists()
    assert not Path(f"/var/log/libvirt/qemu/{domain_name(spec.vm_id)}.log").exists()
    assert spec.vm_id not in backend.running()
    assert backend.state(spec.vm_id) in (VMState.UNKNOWN, VMState.STOPPED)


@pytest.mark.guest
def test_a_domain_it_did_not_define_is_left_alone(backend: LibvirtBackend, guest_specs: SpecFactory) -> None:
    import libvirt
    spec = guest_specs.new("lvt-foreign")
    foreign = (f"<domain type='qemu'><name>{domain_name(spec.vm_id)}</name><memory unit='MiB'>64</memory>"
               "<os><type arch='x86_64'>hvm</type></os></domain>")
    conn = libvirt.open("qemu:///system")
    try:
        conn.defineXML(foreign)
        try:
            with pytest.raises(BackendError, match="did not define"):
                backend.start(spec)
            other = LibvirtBackend(OPTIONS)
            assert other.adopt(spec) is False
            other.destroy(spec.vm_id)
            other.close()
            assert domain_name(spec.vm_id) in vmshop_domains(), "a domain that is not the plant's was removed"
        finally:
            conn.lookupByName(domain_name(spec.vm_id)).undefine()
    finally:
        conn.close()


@pytest.mark.guest
def test_domain_type_auto_probes_kvm(backend: LibvirtBackend, guest_specs: SpecFactory) -> None:
    """'auto' boots the kernel under KVM once (KVM does not work on these hosts: the answer is qemu/TCG)."""
    spec = guest_specs.new("lvt-probe")
    auto = LibvirtBackend({**OPTIONS, "domain_type": "auto", "probe_timeout": "5"})
    try:
        assert auto.capabilities().accelerator == "auto"
        started = time.monotonic()
        decision = auto.domain_type_for(spec)
        took = time.monotonic() - started
        print(f"KVM probe through libvirt: {decision} in {took:.1f} s")
        assert decision in ("qemu", "kvm") and took < 5 + 30
        assert auto.domain_type_for(spec) == decision  # decided once
        assert auto.capabilities().accelerator == ("kvm" if decision == "kvm" else "tcg")
        assert processes_naming("VMSHOP-ACCEL-PROBE") == []
        assert list(Path("/var/log/libvirt/qemu").glob("vmshop-probe-*")) == []
    finally:
        auto.close()


@pytest.mark.guest
def test_capabilities_from_the_connection(backend: LibvirtBackend) -> None:
    caps = backend.capabilities()
    assert caps.available and caps.reason == "" and caps.accelerator == "tcg" and caps.channel == "9p"
    assert "x86_64" in caps.architectures and set(caps.networks) == {"user", "segment"}
    with open("/proc/meminfo") as handle:
        total = int(next(line for line in handle if line.startswith("MemTotal:")).split()[1]) // 1024
    assert abs(caps.max_memory - int(total * 0.75)) <= 2 and caps.max_vcpus == os.cpu_count()
