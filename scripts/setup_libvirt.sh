#!/usr/bin/env bash
# Set up what the libvirt backend needs on a fresh Debian 12 machine, as root,
# idempotently (re-running only does what is missing):
#
# - Debian packages: libvirt's daemon with its QEMU driver, virsh and
#   virt-xml-validate (libvirt-clients, which needs xmllint from
#   libxml2-utils), and what libvirt-python is built with (libvirt-dev,
#   pkg-config, a C compiler). Not libvirt-daemon-system: it pulls in the
#   systemd units, polkit and a default NAT network the plant does not use.
# - libvirt-python, built from source into .venv (PyPI has no wheel; ~10 s).
# - What a standalone libvirtd (no systemd) needs for qemu:///system, which
#   libvirt-daemon-system would otherwise have done:
#   * the libvirt-qemu user (libvirtd refuses to start without the user its
#     QEMU driver is built for, even when every vmshop domain runs QEMU as
#     root through its <seclabel>);
#   * /dev/kvm in group kvm, mode 0660, with libvirt-qemu in it (udev does
#     that on a Debian host with systemd). Without it libvirt probes QEMU
#     with KVM but then finds /dev/kvm closed to libvirt-qemu, declares its
#     capability cache stale and probes again on every call: a define took
#     over 30 s;
#   * /var/log/libvirt (a daemonized libvirtd logs there).
#
# No daemon is left running: the backend's option daemon=spawn starts
# virtlogd and libvirtd when no daemon answers, with --timeout, so they exit
# by themselves once no plant is connected and no domain runs.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ $(id -u) -ne 0 ]]; then
  echo "setup_libvirt: must run as root (it installs packages and adds a system user)" >&2
  exit 1
fi

if [[ ! -x .venv/bin/python ]]; then
  echo "setup_libvirt: .venv is missing: run it from scripts/setup_host.sh, after .venv is made" >&2
  exit 1
fi

APT_PACKAGES=(libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients libxml2-utils libvirt-dev pkg-config gcc libc6-dev)
PYTHON_INCLUDE=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
[[ -f $PYTHON_INCLUDE/Python.h ]] || APT_PACKAGES+=(python3-dev)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if ((${#missing[@]})); then
  echo "setup_libvirt: installing Debian packages: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

LIBVIRT_PYTHON_VERSION=9.0.0  # the same version as Debian 12's libvirt
if ! .venv/bin/python -c "import libvirt, sys; sys.exit(libvirt.getVersion() < 9000000)" 2>/dev/null; then
  echo "setup_libvirt: building libvirt-python $LIBVIRT_PYTHON_VERSION into .venv"
  .venv/bin/pip install -q --disable-pip-version-check "libvirt-python==$LIBVIRT_PYTHON_VERSION"
fi

getent group libvirt-qemu >/dev/null || groupadd --system libvirt-qemu
getent group kvm >/dev/null || groupadd --system kvm
if ! getent passwd libvirt-qemu >/dev/null; then
  echo "setup_libvirt: adding the system user libvirt-qemu"
  useradd --system --gid libvirt-qemu --groups kvm --no-create-home --home-dir /var/lib/libvirt \
    --shell /usr/sbin/nologin --comment "Libvirt Qemu" libvirt-qemu
fi
id -nG libvirt-qemu | tr ' ' '\n' | grep -qx kvm || usermod -aG kvm libvirt-qemu
if [[ -c /dev/kvm ]] && [[ $(stat -c '%G %a' /dev/kvm) != "kvm 660" ]]; then
  echo "setup_libvirt: /dev/kvm to group kvm, mode 0660"
  chgrp kvm /dev/kvm
  chmod 0660 /dev/kvm
fi
mkdir -p /var/log/libvirt
echo "setup_libvirt: ready (libvirt $(virsh --version), libvirt-python $(.venv/bin/python -c 'import libvirt; print(libvirt.getVersion())'))"
