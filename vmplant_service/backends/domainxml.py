"""libvirt domain XML for a :class:`~vmplant_service.backends.base.GuestSpec`.

One function per libvirt driver family, all pure (no connection, no files
touched), so every flavor can be checked against libvirt's own schema
(``virt-xml-validate FILE domain``) on a host that has no such hypervisor:

- ``qemu`` / ``kvm`` (libvirt's QEMU driver; run for real here, TCG only).
  QEMU runs as the unprivileged ``dac_label`` user (``<seclabel
  type='static' model='dac' relabel='yes'>``), which cannot enter the
  plant's 0700 directories, and nothing shared may be handed to it:

  * the disk: the plant's qcow2 overlay and every layer below it (the
    cached image) are given as descriptors the plant opens itself
    (``<source ... fdgroup='vmshop-disk'>`` and ``vmshop-base<N>`` in an
    explicit ``<backingStore>`` chain, read-write / read-only, passed with
    ``virDomainFDAssociate``): libvirt then chowns neither (it would chown
    a backing image to QEMU's user for good: it never restores read-only
    layers), and QEMU needs no path into the plant's state; a cloud-init
    seed is a second disk, ``<readonly/>``, passed the same way
    (``vmshop-seed``, opened read-only);
  * the kernel, initramfs and command line are QEMU arguments
    (``-kernel``/``-initrd``/``-append`` in ``<qemu:commandline>``), not
    ``<os><kernel>``: libvirt's DAC driver chowns an ``<os>`` kernel to
    QEMU's user for as long as any domain boots it (measured), which would
    let an escaped QEMU rewrite the kernel every VM boots. QEMU reads them
    as its own user: they must be readable by it (the warehouse is);
  * the agent's channel is ``<channel type='unix'>`` with target
    ``org.qemu.guest_agent.0`` at a path libvirt picks (libvirt connects to
    it itself; the plant talks through libvirt's API);
  * the serial console is a unix socket ``run_dir/console.sock`` that
    libvirt makes and hands to QEMU as a descriptor; the backend reads it
    into a size-bounded log;
  * application data is a 9p ``<filesystem accessmode='squash'>`` with
    ``<readonly/>`` (QEMU's ``security_model=none,readonly``: the guest
    changes nothing, and sees the data store's own owners and modes;
    ``passthrough`` would chown the guest's files if it could write, and
    ``mapped`` would hide the site's owners and modes behind xattrs);
  * NICs: a 'user' NIC is QEMU arguments passed through
    ``<qemu:commandline>`` (libvirt 9.0's ``<interface type='user'>`` takes
    neither ``restrict=on`` nor a port forward, and passt has no
    ``restrict``), JSON so QEMU creates it after libvirt's own devices.
    libvirt has no VDE interface, and QEMU's own VDE client could not
    reach the plant's 0700 switch as QEMU's user: the backend connects to
    the switch itself and hot-plugs the NIC into the paused domain with
    the connection's descriptors (:func:`segment_port_alias` names the
    PCIe root port kept free for it on q35). With ``pass_fds`` off (a
    remote daemon, which cannot receive descriptors) the disk is a plain
    path and a 'segment' NIC is QEMU's ``vde`` netdev.
- ``xen`` (libvirt's libxl driver; never run here): PV (``xenpv``) or HVM
  (``xenfv``) with direct kernel boot, the overlay as a ``qcow2`` disk,
  the agent's channel (target type ``xen``), the data share read-only,
  every NIC bridged.
- ``esx`` (libvirt's ESX driver, ``<domain type='vmware'>``; never run
  here): the disk is a VMDK in a datastore (``[datastore1]
  vmshop/<id>.vmdk``), NICs are e1000 or vmxnet3 on a port group. ESX has
  no 9p, no agent channel and no direct kernel boot, so none appears.

Every domain carries ``<metadata><vmshop:vm .../></metadata>`` naming the
VM's id, run directory and disk: the backend checks it before it touches a
domain, as the QEMU backend checks a pid's command line.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from pathlib import Path

from lxml import etree

from .base import GuestSpec, Nic

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
VMSHOP_NS = "urn:vmshop:libvirt:1"
#: Domains of this plant are named ``vmshop-<vm id>``.
NAME_PREFIX = "vmshop-"
FLAVORS = ("qemu", "kvm", "xen", "esx")
XEN_MODES = ("pv", "hvm")
ESX_NIC_MODELS = ("e1000", "vmxnet3")
#: The guest port a 'user' NIC's host port forwards to (the guest's httpd).
GUEST_HTTP_PORT = 80
#: Names UUIDs of domains (uuid5), so the same VM id always gets the same UUID.
UUID_NAMESPACE = uuid.UUID("5f0d7d8e-6b1e-4a53-9d8c-76d6b2f0c1a1")
#: The virtio-serial port name qemu-ga looks for, and that libvirt treats as "the guest agent".
AGENT_PORT = "org.qemu.guest_agent.0"
#: The descriptor group of the VM's own overlay (read-write); layers below it are ``vmshop-base<N>`` (read-only).
DISK_FD_GROUP = "vmshop-disk"
#: The descriptor group of the VM's cloud-init seed (read-only).
SEED_FD_GROUP = "vmshop-seed"
#: PCI controller indexes of the root ports kept for hot-plugged segment NICs (above libvirt's own).
FIRST_HOTPLUG_PORT_INDEX = 16


@dataclass(frozen=True)
class DiskLayer:
    """One image below the VM's overlay in its backing chain: its path and format."""

    path: str
    format: str


@dataclass(frozen=True)
class DomainOptions:
    """How to render a spec: the flavor and what only some flavors use.

    ``domain_type`` is ``qemu`` (TCG) or ``kvm`` for the qemu flavor;
    ``dac_label`` (qemu/kvm) is the ``+uid:+gid`` (or ``user:group``) QEMU
    runs as, with libvirt relabelling what it makes for the VM; None leaves
    it to the daemon's own configuration; ``pass_fds`` (qemu/kvm): the disk
    chain and segment NICs are descriptors the backend passes (a local
    daemon), else paths; ``bridge`` is where xen and esx NICs plug in (the
    original's Xen bridge ``xenbr0``; an ESX port group such as ``VM
    Network``).
    """

    flavor: str = "qemu"
    domain_type: str = "qemu"
    disk_cache: str = "unsafe"
    dac_label: str | None = None
    pass_fds: bool = True
    xen_mode: str = "pv"
    bridge: str = "xenbr0"
    datastore: str = "datastore1"
    nic_model: str = "e1000"


def domain_name(vm_id: str) -> str:
    return NAME_PREFIX + vm_id


def domain_uuid(vm_id: str) -> str:
    return str(uuid.uuid5(UUID_NAMESPACE, vm_id))


def console_path(spec: GuestSpec) -> Path:
    """The guest's serial console log (kept by the backend from :func:`console_socket`)."""
    return Path(spec.run_dir).absolute() / "console.log"


def console_socket(spec: GuestSpec) -> Path:
    """The unix socket libvirt makes for the guest's serial console."""
    return Path(spec.run_dir).absolute() / "console.sock"


def esx_disk_path(spec: GuestSpec, datastore: str) -> str:
    """The VMDK an ESX domain boots: ``[datastore] vmshop/<id>.vmdk``."""
    return f"[{datastore}] vmshop/{spec.vm_id}.vmdk"


def base_fd_group(depth: int) -> str:
    """The descriptor group of the backing layer ``depth`` levels below the overlay (0: its backing file)."""
    return f"vmshop-base{depth}"


def is_q35(machine: str) -> bool:
    return machine == "q35" or machine.startswith("pc-q35")


def segment_port_alias(index: int) -> str:
    """The alias (QEMU id) of the root port kept free for the hot-plugged NIC ``index`` on a q35 machine."""
    return f"ua-vmshop-port{index}"


def hotplugged_segments(spec: GuestSpec, options: DomainOptions) -> list[int]:
    """Indexes of ``spec.nics`` that the backend hot-plugs with descriptors (segment NICs, qemu/kvm, pass_fds)."""
    if options.flavor not in ("qemu", "kvm") or not options.pass_fds:
        return []
    return [index for index, nic in enumerate(spec.nics) if nic.kind == "segment"]


def domain_xml(spec: GuestSpec, options: DomainOptions, chain: tuple[DiskLayer, ...] | None = None) -> str:
    """The domain XML that runs ``spec`` under ``options.flavor`` (a string, UTF-8, no declaration).

    ``chain`` is the overlay's backing chain (qemu/kvm with ``pass_fds``:
    needed, since libvirt cannot probe a chain passed as descriptors).
    """
    if options.flavor in ("qemu", "kvm"):
        root = qemu_domain(spec, options, chain)
    elif options.flavor == "xen":
        root = xen_domain(spec, options)
    elif options.flavor == "esx":
        root = esx_domain(spec, options)
    else:
        raise ValueError(f"no domain XML for flavor {options.flavor!r} (known: {', '.join(FLAVORS)})")
    return etree.tostring(root, pretty_print=True, encoding="unicode")


# The pieces every flavor shares -------------------------------------------------------------
def _sub(parent: etree._Element, tag: str, text: str | None = None, **attributes: str) -> etree._Element:
    element = etree.SubElement(parent, tag, {key.rstrip("_"): value for key, value in attributes.items()})
    if text is not None:
        element.text = text
    return element


def _domain(spec: GuestSpec, domain_type: str, nsmap: dict[str | None, str] | None = None) -> etree._Element:
    root = etree.Element("domain", {"type": domain_type}, nsmap=nsmap)
    _sub(root, "name", domain_name(spec.vm_id))
    _sub(root, "uuid", domain_uuid(spec.vm_id))
    metadata = _sub(root, "metadata")
    etree.SubElement(metadata, f"{{{VMSHOP_NS}}}vm", {
        "id": spec.vm_id, "run_dir": str(Path(spec.run_dir).absolute()), "disk": str(Path(spec.disk).absolute())},
        nsmap={"vmshop": VMSHOP_NS})
    _sub(root, "memory", str(spec.memory), unit="MiB")
    _sub(root, "vcpu", str(spec.vcpus))
    return root


def _direct_boot(os_element: etree._Element, spec: GuestSpec) -> None:
    if spec.kernel is not None:
        _sub(os_element, "kernel", str(Path(spec.kernel).absolute()))
        if spec.initrd is not None:
            _sub(os_element, "initrd", str(Path(spec.initrd).absolute()))
        if spec.cmdline:
            _sub(os_element, "cmdline", spec.cmdline)


def _lifecycle(root: etree._Element) -> None:
    # Like QEMU's -no-reboot: a reboot, a panic (panic=-1 reboots) or a power-off ends the domain.
    for event in ("on_poweroff", "on_reboot", "on_crash"):
        _sub(root, event, "destroy")


def _data_share(devices: etree._Element, spec: GuestSpec) -> None:
    """The application data, read-only (9p tag ``vmdata``); ``squash`` is QEMU's ``security_model=none``."""
    if spec.data_dir is None:
        return
    share = _sub(devices, "filesystem", type="mount", accessmode="squash")
    _sub(share, "source", dir=str(Path(spec.data_dir).absolute()))
    _sub(share, "target", dir="vmdata")
    _sub(share, "readonly")


def _seclabel(root: etree._Element, label: str | None) -> None:
    if label:
        # relabel='yes': libvirt gives QEMU's user what it makes for the VM (sockets, its own run directory)
        # and restores it; the shared inputs are kept out of its reach (see the module docstring).
        seclabel = _sub(root, "seclabel", type="static", model="dac", relabel="yes")
        _sub(seclabel, "label", label)


# qemu / kvm ---------------------------------------------------------------------------------
def qemu_domain(spec: GuestSpec, options: DomainOptions, chain: tuple[DiskLayer, ...] | None = None
                ) -> etree._Element:
    """``<domain type='qemu'|'kvm'>`` for libvirt's QEMU driver (see the module docstring)."""
    root = _domain(spec, options.domain_type, nsmap={"qemu": QEMU_NS})
    os_element = _sub(root, "os")
    _sub(os_element, "type", "hvm", arch=spec.arch, machine=spec.machine)
    _sub(_sub(root, "features"), "acpi")  # the power button: stop() asks the guest through ACPI
    _lifecycle(root)
    devices = _sub(root, "devices")
    _qemu_disk(devices, spec, options, chain)
    _data_share(devices, spec)
    # libvirt adds a USB controller and a balloon unless told not to; the guest uses neither.
    _sub(devices, "controller", type="usb", model="none")
    if is_q35(spec.machine):
        for number, index in enumerate(hotplugged_segments(spec, options)):
            port = _sub(devices, "controller", type="pci", index=str(FIRST_HOTPLUG_PORT_INDEX + number),
                        model="pcie-root-port")
            _sub(port, "alias", name=segment_port_alias(index))
    serial = _sub(devices, "serial", type="unix")
    _sub(serial, "source", mode="bind", path=str(console_socket(spec)))
    _sub(serial, "target", port="0")
    channel = _sub(devices, "channel", type="unix")
    _sub(channel, "target", type="virtio", name=AGENT_PORT)
    _sub(devices, "memballoon", model="none")
    _seclabel(root, options.dac_label)
    arguments = identity_arguments(spec) + qemu_boot_arguments(spec) + qemu_nic_arguments(
        spec.nics, vde=not options.pass_fds)
    if arguments:
        commandline = etree.SubElement(root, f"{{{QEMU_NS}}}commandline")
        for argument in arguments:
            etree.SubElement(commandline, f"{{{QEMU_NS}}}arg", value=argument)
    return root


def _qemu_disk(devices: etree._Element, spec: GuestSpec, options: DomainOptions,
               chain: tuple[DiskLayer, ...] | None) -> None:
    disk = _sub(devices, "disk", type="file", device="disk")
    _sub(disk, "driver", name="qemu", type="qcow2", cache=options.disk_cache)
    if not options.pass_fds:
        _sub(disk, "source", file=str(Path(spec.disk).absolute()))
    else:
        if chain is None:
            raise ValueError("a disk passed as descriptors needs its backing chain")
        _sub(disk, "source", file=str(Path(spec.disk).absolute()), fdgroup=DISK_FD_GROUP)
        parent = disk
        for depth, layer in enumerate(chain):
            parent = _sub(parent, "backingStore", type="file")
            _sub(parent, "format", type=layer.format)
            _sub(parent, "source", file=layer.path, fdgroup=base_fd_group(depth))
        _sub(parent, "backingStore")  # the end of the chain: libvirt probes nothing further
    _sub(disk, "target", dev="vda", bus="virtio")
    if spec.seed is not None:
        # The cloud-init seed: a read-only raw disk, a descriptor the plant opened read-only (or its path).
        seed = _sub(devices, "disk", type="file", device="disk")
        _sub(seed, "driver", name="qemu", type="raw")
        if options.pass_fds:
            _sub(seed, "source", file=str(Path(spec.seed).absolute()), fdgroup=SEED_FD_GROUP)
            _sub(seed, "backingStore")
        else:
            _sub(seed, "source", file=str(Path(spec.seed).absolute()))
        _sub(seed, "target", dev="vdb", bus="virtio")
        _sub(seed, "readonly")


def identity_arguments(spec: GuestSpec) -> list[str]:
    """An inert QEMU object (a secret, which the guest cannot see) naming the VM's run directory and disk.

    With the disk passed as a descriptor and the sockets made by libvirt,
    nothing else on QEMU's command line names them; this keeps a VM's QEMU
    findable by its run directory and disk, as the qemu backend's is (the
    tests' leftover checks, an operator's ``ps``).
    """
    identity = {"qom-type": "secret", "id": "vmshop-vm",
                "data": f"run_dir={Path(spec.run_dir).absolute()} disk={Path(spec.disk).absolute()}"}
    return ["-object", json.dumps(identity, separators=(",", ":"))]


def qemu_boot_arguments(spec: GuestSpec) -> list[str]:
    """``-kernel``/``-initrd``/``-append``: QEMU reads them itself, so libvirt never chowns the shared kernel."""
    if spec.kernel is None:
        return []
    arguments = ["-kernel", str(Path(spec.kernel).absolute())]
    if spec.initrd is not None:
        arguments += ["-initrd", str(Path(spec.initrd).absolute())]
    if spec.cmdline:
        arguments += ["-append", spec.cmdline]
    return arguments


def qemu_nic_arguments(nics: tuple[Nic, ...], vde: bool = False) -> list[str]:
    """QEMU arguments for the NICs: 'user' with ``restrict`` and a 127.0.0.1 forward; 'segment' on VDE if ``vde``.

    All JSON, so paths may hold any character and QEMU creates the devices
    after libvirt's own. Without ``vde`` the backend hot-plugs segment NICs.
    """
    arguments: list[str] = []
    for index, nic in enumerate(nics):
        netdev_id = f"vmshop-net{index}"
        netdev: dict[str, object]
        if nic.kind == "user":
            netdev = {"type": "user", "id": netdev_id, "restrict": True}
            if nic.host_port:
                netdev["hostfwd"] = [{"str": f"tcp:127.0.0.1:{nic.host_port}-:{GUEST_HTTP_PORT}"}]
        elif nic.kind == "segment":
            if not vde:
                continue
            netdev = {"type": "vde", "id": netdev_id, "sock": str(nic.switch)}
        else:
            raise ValueError(f"no NIC of kind {nic.kind!r}")
        arguments += ["-netdev", json.dumps(netdev, separators=(",", ":")),
                      "-device", json.dumps(nic_device(nic, index), separators=(",", ":"))]
    return arguments


def nic_device(nic: Nic, index: int, bus: str | None = None) -> dict[str, object]:
    """QEMU's ``virtio-net-pci`` device for NIC ``index`` (on ``bus`` when hot-plugged into a root port)."""
    device: dict[str, object] = {"driver": "virtio-net-pci", "netdev": f"vmshop-net{index}", "mac": nic.mac,
                                 "romfile": "", "id": f"vmshop-nic{index}"}
    if bus is not None:
        device["bus"] = bus
    return device


# xen ----------------------------------------------------------------------------------------
def xen_domain(spec: GuestSpec, options: DomainOptions) -> etree._Element:
    """``<domain type='xen'>`` for libvirt's libxl driver: PV or HVM, direct kernel boot, bridged NICs."""
    root = _domain(spec, "xen")
    os_element = _sub(root, "os")
    if options.xen_mode == "pv":
        _sub(os_element, "type", "linux", arch=spec.arch, machine="xenpv")
    else:
        _sub(os_element, "type", "hvm", arch=spec.arch, machine="xenfv")
    _direct_boot(os_element, spec)
    if options.xen_mode == "hvm":
        features = _sub(root, "features")
        for feature in ("acpi", "apic", "pae"):
            _sub(features, feature)
    _lifecycle(root)
    devices = _sub(root, "devices")
    disk = _sub(devices, "disk", type="file", device="disk")
    _sub(disk, "driver", name="qemu", type="qcow2")
    _sub(disk, "source", file=str(Path(spec.disk).absolute()))
    _sub(disk, "target", dev="xvda", bus="xen")
    _data_share(devices, spec)
    _bridged_nics(devices, spec.nics, options.bridge, model=None)
    console = _sub(devices, "console", type="pty")
    _sub(console, "target", type="xen", port="0")
    channel = _sub(devices, "channel", type="unix")
    _sub(channel, "source", mode="bind", path=str(Path(spec.run_dir).absolute() / "qga.sock"))
    _sub(channel, "target", type="xen", name=AGENT_PORT)
    return root


# esx ----------------------------------------------------------------------------------------
def esx_domain(spec: GuestSpec, options: DomainOptions) -> etree._Element:
    """``<domain type='vmware'>`` for libvirt's ESX driver: a datastore VMDK, NICs on a port group."""
    root = _domain(spec, "vmware")
    _sub(_sub(root, "os"), "type", "hvm", arch=spec.arch)
    devices = _sub(root, "devices")
    disk = _sub(devices, "disk", type="file", device="disk")
    _sub(disk, "source", file=esx_disk_path(spec, options.datastore))
    _sub(disk, "target", dev="sda", bus="scsi")
    _sub(disk, "address", type="drive", controller="0", bus="0", target="0", unit="0")
    _sub(devices, "controller", type="scsi", index="0", model="lsilogic")
    _bridged_nics(devices, spec.nics, options.bridge, model=options.nic_model)
    serial = _sub(devices, "serial", type="file")
    _sub(serial, "source", path=f"[{options.datastore}] vmshop/{spec.vm_id}.serial")
    _sub(serial, "target", port="0")
    return root


def _bridged_nics(devices: etree._Element, nics: tuple[Nic, ...], bridge: str, model: str | None) -> None:
    for nic in nics:
        interface = _sub(devices, "interface", type="bridge")
        _sub(interface, "mac", address=nic.mac)
        _sub(interface, "source", bridge=bridge)
        if model:
            _sub(interface, "model", type=model)
