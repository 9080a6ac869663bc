#!/usr/bin/env bash
# Set up everything VMShop needs on a fresh Debian 12 machine, idempotently:
# Debian packages (QEMU, VDE, tools the guest image is built with), the
# Python environment in .venv, and the guest image in var/warehouse.
# Re-running it only does what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

# systemd: only for systemd-analyze, which checks contrib/systemd's units (tests/test_systemd_units.py). Installing
# it where systemd is not PID 1 starts nothing: its maintainer scripts call systemctl only when
# /run/systemd/system exists, and otherwise add a few system users and enable-symlinks.
# postgresql: the tests' private PostgreSQL clusters (initdb, pg_ctl; the shared registry of issue 13).
APT_PACKAGES=(qemu-system-x86 qemu-utils vde2 busybox-static e2fsprogs cpio xz-utils iproute2
              user-mode-linux libvdeplug-slirp systemd debootstrap fdisk postgresql)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if ((${#missing[@]})); then
  echo "setup: installing Debian packages: ${missing[*]}"
  SUDO=""; [[ $(id -u) -eq 0 ]] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The unprivileged user hypervisors run as (QEMU drops to it with -runas, UML is started as it): a system
# user with no login and no home, in group kvm (for /dev/kvm where KVM works).
HV_USER=vmshop-qemu
if ! getent passwd "$HV_USER" >/dev/null; then
  echo "setup: creating the system user $HV_USER (hypervisors run as it)"
  SUDO=""; [[ $(id -u) -eq 0 ]] || SUDO="sudo"
  getent group kvm >/dev/null || $SUDO groupadd --system kvm
  $SUDO useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin \
    --user-group --groups kvm "$HV_USER"
fi

PYTHON=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  echo "setup: creating .venv"
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.vmshop-installed
if [[ ! -f $stamp || setup.py -nt $stamp ]]; then
  echo "setup: installing Python packages"
  .venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
  touch "$stamp"
fi

# The libvirt backend: libvirt's daemon and tools, libvirt-python built into .venv.
bash scripts/setup_libvirt.sh

# The toolkits of the generated C, Java and Node.js clients the tests build and run.
bash scripts/setup_clients.sh

WAREHOUSE=${VMSHOP_WAREHOUSE:-$ROOT/var/warehouse}
# The build is idempotent: it does nothing (in about 2 s) unless its inputs changed.
bash scripts/build_guest_image.sh "$WAREHOUSE"
# The Debian 12 cloud image ("debian12": debootstrap from the Debian mirror this host's apt uses, ~2 minutes the
# first time, then cached): the tests and the demo's Debian sample boot it. VMSHOP_DEBIAN_IMAGE=0 skips it.
if [[ ${VMSHOP_DEBIAN_IMAGE:-1} != 0 ]]; then
  SUDO=""; [[ $(id -u) -eq 0 ]] || SUDO="sudo"
  $SUDO bash scripts/build_debian_image.sh "$WAREHOUSE"
fi
echo "setup: ready (python: .venv, warehouse: $WAREHOUSE)"
