"""libvirt domain XML for a :class:`~vmplant_service.backends.base.GuestSpec`.

One function per libvirt driver family, all pure (no connection, no files
touched), so every flavor can be checked against libvirt's own schema
(``virt-xml-validate FILE domain``) on a host that has no such hypervisor:

- ``qemu`` / ``kvm`` (libvirt's QEMU driver; run for real here, TCG only):
  direct kernel boot, the plant's qcow2 overlay as a virtio disk, the
  configuration share as ``<filesystem>`` (9p tag ``vmshop``; ``vmdata``
  read-only), serial console to ``run_dir/console.log``. The NICs are QEMU
  arguments passed through ``<qemu:commandline>``, because libvirt 9.0 has
  no element for either kind the contract needs: its ``<interface
  type='user'>`` takes neither ``restrict=on`` nor a port forward (a
  ``<portForward>`` there is schema-valid but silently dropped unless the
  passt backend is used, and passt has no equivalent of ``restrict``), and
  libvirt has no VDE interface at all. The passed-through ``-device`` is
  JSON so QEMU creates it after libvirt's own devices (QEMU creates
  key=value ``-device``s first, which would take PCI slots libvirt
  assigned).
- ``xen`` (libvirt's libxl driver; never run here): PV (``xenpv``) or HVM
  (``xenfv``) with direct kernel boot, the overlay as a ``qcow2`` disk,
  the share as a 9p ``<filesystem>``, every NIC bridged.
- ``esx`` (libvirt's ESX driver, ``<domain type='vmware'>``; never run
  here): the disk is a VMDK in a datastore (``[datastore1]
  vmshop/<id>.vmdk``), NICs are e1000 or vmxnet3 on a port group. ESX has
  no 9p and no direct kernel boot, so neither the configuration share nor
  the kernel appears.

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


@dataclass(frozen=True)
class DomainOptions:
    """How to render a spec: the flavor and what only some flavors use.

    ``domain_type`` is ``qemu`` (TCG) or ``kvm`` for the qemu flavor;
    ``dac_label`` (qemu/kvm) is the ``user:group`` QEMU runs as (``+0:+0``:
    root, with no relabelling of any file), None leaves it to the daemon;
    ``bridge`` is where xen and esx NICs plug in (the original's Xen bridge
    ``xenbr0``; an ESX port group such as ``VM Network``).
    """

    flavor: str = "qemu"
    domain_type: str = "qemu"
    disk_cache: str = "unsafe"
    dac_label: str | None = "+0:+0"
    xen_mode: str = "pv"
    bridge: str = "xenbr0"
    datastore: str = "datastore1"
    nic_model: str = "e1000"


def domain_name(vm_id: str) -> str:
    return NAME_PREFIX + vm_id


def domain_uuid(vm_id: str) -> str:
    return str(uuid.uuid5(UUID_NAMESPACE, vm_id))


def console_path(spec: GuestSpec) -> Path:
    """Where the qemu flavor writes the guest's serial console."""
    return Path(spec.run_dir).absolute() / "console.log"


def esx_disk_path(spec: GuestSpec, datastore: str) -> str:
    """The VMDK an ESX domain boots: ``[datastore] vmshop/<id>.vmdk``."""
    return f"[{datastore}] vmshop/{spec.vm_id}.vmdk"


def domain_xml(spec: GuestSpec, options: DomainOptions) -> str:
    """The domain XML that runs ``spec`` under ``options.flavor`` (a string, UTF-8, no declaration)."""
    if options.flavor in ("qemu", "kvm"):
        root = qemu_domain(spec, options)
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


def _shares(devices: etree._Element, spec: GuestSpec) -> None:
    shares = [(spec.channel_dir, "vmshop", False)]
    if spec.data_dir is not None:
        shares.append((spec.data_dir, "vmdata", True))
    for directory, tag, readonly in shares:
        share = _sub(devices, "filesystem", type="mount", accessmode="passthrough")
        _sub(share, "source", dir=str(Path(directory).absolute()))
        _sub(share, "target", dir=tag)
        if readonly:
            _sub(share, "readonly")


# qemu / kvm ---------------------------------------------------------------------------------
def qemu_domain(spec: GuestSpec, options: DomainOptions) -> etree._Element:
    """``<domain type='qemu'|'kvm'>`` for libvirt's QEMU driver (see the module docstring)."""
    root = _domain(spec, options.domain_type, nsmap={"qemu": QEMU_NS})
    os_element = _sub(root, "os")
    _sub(os_element, "type", "hvm", arch=spec.arch, machine=spec.machine)
    _direct_boot(os_element, spec)
    _sub(_sub(root, "features"), "acpi")  # the power button: stop() asks the guest through ACPI
    _lifecycle(root)
    devices = _sub(root, "devices")
    disk = _sub(devices, "disk", type="file", device="disk")
    _sub(disk, "driver", name="qemu", type="qcow2", cache=options.disk_cache)
    _sub(disk, "source", file=str(Path(spec.disk).absolute()))
    _sub(disk, "target", dev="vda", bus="virtio")
    _shares(devices, spec)
    # libvirt adds a USB controller and a balloon unless told not to; the guest uses neither.
    _sub(devices, "controller", type="usb", model="none")
    serial = _sub(devices, "serial", type="file")
    _sub(serial, "source", path=str(console_path(spec)))
    _sub(serial, "target", port="0")
    _sub(devices, "memballoon", model="none")
    if options.dac_label:
        # relabel='no': libvirt chowns nothing (not the cached image, kernel or shares).
        seclabel = _sub(root, "seclabel", type="static", model="dac", relabel="no")
        _sub(seclabel, "label", options.dac_label)
    arguments = qemu_nic_arguments(spec.nics)
    if arguments:
        commandline = etree.SubElement(root, f"{{{QEMU_NS}}}commandline")
        for argument in arguments:
            etree.SubElement(commandline, f"{{{QEMU_NS}}}arg", value=argument)
    return root


def qemu_nic_arguments(nics: tuple[Nic, ...]) -> list[str]:
    """QEMU arguments for the NICs: 'user' with ``restrict`` and a 127.0.0.1 forward, 'segment' on VDE.

    All JSON, so paths may hold any character and QEMU creates the devices
    after libvirt's own.
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
            netdev = {"type": "vde", "id": netdev_id, "sock": str(nic.switch)}
        else:
            raise ValueError(f"no NIC of kind {nic.kind!r}")
        device = {"driver": "virtio-net-pci", "netdev": netdev_id, "mac": nic.mac, "romfile": "",
                  "id": f"vmshop-nic{index}"}
        arguments += ["-netdev", json.dumps(netdev, separators=(",", ":")),
                      "-device", json.dumps(device, separators=(",", ":"))]
    return arguments


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
    _shares(devices, spec)
    _bridged_nics(devices, spec.nics, options.bridge, model=None)
    console = _sub(devices, "console", type="pty")
    _sub(console, "target", type="xen", port="0")
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
