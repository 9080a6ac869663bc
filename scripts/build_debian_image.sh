#!/usr/bin/env bash
# Build the VMShop "debian12" image (a minimal Debian 12 cloud image) into a
# warehouse directory.
#
#   scripts/build_debian_image.sh [--force] WAREHOUSE_DIR
#
# Produces WAREHOUSE_DIR/debian12/{disk.qcow2,vmlinux,initrd.img,image.xml}
# and lists the absolute path of image.xml in WAREHOUSE_DIR/index.txt (once).
#
# The root file system is made by debootstrap (variant minbase) from Debian's
# packages, then apt installs, in the image, what a minimal cloud image has:
# systemd-sysv, linux-image-amd64, qemu-guest-agent (started by udev when
# its virtio-serial port appears), cloud-init (NoCloud) with cloud-guest-utils,
# iproute2, systemd-networkd (part of systemd), and GRUB's BIOS boot loader.
# Packages come from the mirrors the build host's apt uses (bookworm,
# bookworm-updates, bookworm-security), so the image has today's updates.
# The .debs are cached in ${VMSHOP_CACHE:-$HOME/.cache/vmshop}/debian12-debs.
#
# The disk is a partitioned disk as a cloud image has (MBR, one ext4
# partition, GRUB in the MBR gap), so it boots through its own boot loader;
# the plant boots it directly instead (docs/debian-image.md has the
# measurements): vmlinux is the kernel's uncompressed ELF (QEMU boots it
# through its PVH entry point) and initrd.img is the image's own initramfs.
#
# No loop devices or mounts outside a private mount namespace: the file
# system is made with mkfs.ext4 -d, the partition table with sfdisk on a
# file, GRUB's core image with grub-mkimage from the image itself.
#
# The build is idempotent: when this script, guest/debian/ and the Debian
# suite are unchanged and the outputs exist, it stops at once ("up to date");
# --force (or VMSHOP_FORCE_REBUILD=1) builds again (to take Debian's newest
# updates, say).  Outputs are written to a temporary directory in the
# warehouse and renamed into place, image.xml last.  Clones of the previous
# disk.qcow2 must be thrown away after a rebuild.
set -euo pipefail

usage() {
	echo "usage: $0 [--force] WAREHOUSE_DIR" >&2
	exit 2
}

force=${VMSHOP_FORCE_REBUILD:-}
args=()
for a in "$@"; do
	case "$a" in
		--force) force=1 ;;
		-h | --help) usage ;;
		-*) echo "unknown option: $a" >&2; usage ;;
		*) args+=("$a") ;;
	esac
done
[ "${#args[@]}" -eq 1 ] || usage

IMAGE_NAME=debian12
SUITE=bookworm
DISK_GIB=2
MEMORY_MIB=512
VCPUS=1
MACHINE=q35
# What the image is, as a step a blank-hardware request can name.
OS_STEP="#vmshop-os: Debian 12"
# Packages on top of debootstrap's minbase (their Depends come along, no Recommends).
PACKAGES=(systemd-sysv dbus linux-image-amd64 qemu-guest-agent cloud-init cloud-guest-utils iproute2 grub-pc-bin
	python3-cffi-backend)
# The kernel command line, the same for direct boot and for GRUB (ROOT_UUID is filled in below).
# quiet/loglevel: the console is a serial port, which costs a guest without KVM dearly;
# i8042.*: no PS/2 controller to probe; no_timer_check, clocksource=hpet, mitigations=off,
# random.trust_cpu: what tiny measured to boot fastest and reliably under TCG.
CMDLINE_TAIL="ro console=ttyS0 panic=-1 quiet loglevel=4 systemd.show_status=auto i8042.noaux i8042.nokbd i8042.nopnp clocksource=hpet no_timer_check random.trust_cpu=on mitigations=off"

log() { echo "build_debian_image: $*" >&2; }
die() { log "error: $*"; exit 1; }

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
GUEST=$REPO/guest/debian
[ -d "$GUEST/rootfs" ] || die "guest files not found in $GUEST"

mkdir -p "${args[0]}"
WAREHOUSE=$(cd "${args[0]}" && pwd)
OUT=$WAREHOUSE/$IMAGE_NAME
CACHE=${VMSHOP_CACHE:-$HOME/.cache/vmshop}
DEBS=$CACHE/debian12-debs
start_time=$(date +%s)

# ---------------------------------------------------------------------------
# Up to date?
# ---------------------------------------------------------------------------
stamp=$(
	{
		sha256sum <"${BASH_SOURCE[0]}"
		(cd "$GUEST" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum)
		echo "$SUITE ${PACKAGES[*]}"
	} | sha256sum | cut -d' ' -f1
)
up_to_date() {
	[ -f "$OUT/.build-stamp" ] && [ "$(cat "$OUT/.build-stamp")" = "$stamp" ] &&
		[ -s "$OUT/vmlinux" ] && [ -s "$OUT/initrd.img" ] && [ -s "$OUT/disk.qcow2" ] && [ -s "$OUT/image.xml" ] &&
		grep -Fxq "$OUT/image.xml" "$WAREHOUSE/index.txt" 2>/dev/null
}
if [ -z "$force" ] && up_to_date; then
	log "$OUT is up to date; --force rebuilds"
	exit 0
fi
[ "$(id -u)" = 0 ] || die "must run as root (debootstrap, chroot)"
mkdir -p "$DEBS" "$OUT"

# One build at a time per warehouse (tiny's build takes the same lock).
exec 9>"$WAREHOUSE/.build.lock"
flock 9
if [ -z "$force" ] && up_to_date; then
	log "$OUT was built meanwhile"
	exit 0
fi
# What a build that was killed left (its temporary directory; its trap never ran): no build runs now.
rm -rf "$WAREHOUSE/.$IMAGE_NAME.build."*

# ---------------------------------------------------------------------------
# Host tools
# ---------------------------------------------------------------------------
need_pkgs=()
for p in debootstrap e2fsprogs fdisk qemu-utils xz-utils util-linux; do
	if [ "$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null)" != installed ]; then
		need_pkgs+=("$p")
	fi
done
if [ "${#need_pkgs[@]}" -gt 0 ]; then
	log "installing host packages: ${need_pkgs[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null || {
		apt-get update -qq >&2
		apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
	}
fi

# The mirrors: the host's own (its deb822 .sources or sources.list lines for
# Debian), so the build reaches what the host's apt reaches.
host_uri() { # host_uri PATTERN: the first URI of an enabled Debian source whose suites match PATTERN
	{
		cat /etc/apt/sources.list.d/*.sources 2>/dev/null |
			awk -v pat="$1" 'BEGIN{RS=""} /Types:[^\n]*deb/ && $0 ~ "Suites:[^\n]*" pat {
				if (match($0, /URIs: *[^ \n]+/)) { u=substr($0, RSTART, RLENGTH); sub(/URIs: */, "", u); print u } }'
		grep -hs '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list |
			awk -v pat="$1" '$0 ~ " " pat " " {for (i = 2; i <= NF; i++) if ($i ~ /^https?:/) {print $i; break}}'
	} | head -n 1 || :
}
MIRROR=${VMSHOP_DEBIAN_MIRROR:-$(host_uri "$SUITE( |$)")}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
SECURITY=${VMSHOP_DEBIAN_SECURITY:-$(host_uri "$SUITE-security")}
SECURITY=${SECURITY:-http://deb.debian.org/debian-security}
log "mirrors: $MIRROR, $SECURITY"

TMP=$(mktemp -d "$WAREHOUSE/.$IMAGE_NAME.build.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
ROOT=$TMP/root

# in_root COMMAND...: run COMMAND in the image (chroot), with /proc, /sys, a
# /dev of its own and the package cache mounted in a mount namespace of its
# own (gone with it).  The image's /dev is a tmpfs with new nodes, never the
# host's /dev: with the host's bound there, udev's and systemd's postinst
# scripts gave the host's /dev/kvm the image's group "kvm" (a gid that is
# another group on the host), which closed it to libvirt-qemu; libvirtd then
# found its QEMU capabilities stale on every call and probed QEMU again each
# time, and the suite's libvirt tests crawled (a define took minutes).
in_root() {
	unshare --mount --propagation private --fork -- /bin/sh -ec '
		root=$1 debs=$2; shift 2
		mount -t proc proc "$root/proc"
		mount -t sysfs sysfs "$root/sys"
		mount -t tmpfs -o mode=0755,nosuid,size=16m vmshop-dev "$root/dev"
		for node in null:3 zero:5 full:7 random:8 urandom:9; do
			mknod -m 0666 "$root/dev/${node%%:*}" c 1 "${node#*:}"
		done
		mknod -m 0666 "$root/dev/tty" c 5 0
		mkdir "$root/dev/pts" "$root/dev/shm"
		mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 devpts "$root/dev/pts"
		ln -s pts/ptmx "$root/dev/ptmx"
		ln -s /proc/self/fd "$root/dev/fd"
		ln -s /proc/self/fd/0 "$root/dev/stdin"
		ln -s /proc/self/fd/1 "$root/dev/stdout"
		ln -s /proc/self/fd/2 "$root/dev/stderr"
		mkdir -p "$root/var/cache/apt/archives"
		mount --bind "$debs" "$root/var/cache/apt/archives"
		exec chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 \
			DEBIAN_FRONTEND=noninteractive "$@"' in_root "$ROOT" "$DEBS" "$@"
}

# ---------------------------------------------------------------------------
# 1. debootstrap: Debian's essential and required packages, and apt
# ---------------------------------------------------------------------------
log "debootstrap --variant=minbase $SUITE (cache $DEBS)"
t0=$(date +%s)
if ! debootstrap --variant=minbase --cache-dir="$DEBS" "$SUITE" "$ROOT" "$MIRROR" >"$TMP/debootstrap.log" 2>&1; then
	tail -n 20 "$TMP/debootstrap.log" >&2
	tail -n 30 "$ROOT/debootstrap/debootstrap.log" >&2 2>/dev/null || :
	die "debootstrap failed"
fi
log "debootstrap took $(($(date +%s) - t0)) s"

# ---------------------------------------------------------------------------
# 2. The image's own configuration (before its packages, so that dpkg's
#    path-excludes and the initramfs settings apply to them)
# ---------------------------------------------------------------------------
cp -a "$GUEST/rootfs/." "$ROOT/"
# What the minbase packages already wrote that the excludes leave out.
find "$ROOT/usr/share/doc" -mindepth 1 ! -name copyright ! -type d -delete 2>/dev/null || :
find "$ROOT/usr/share/doc" -mindepth 1 -type d -empty -delete 2>/dev/null || :
rm -rf "$ROOT/usr/share/man" "$ROOT/usr/share/info" "$ROOT/usr/share/lintian"
find "$ROOT/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} + 2>/dev/null || :
cat >"$ROOT/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $MIRROR
Suites: $SUITE $SUITE-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $SECURITY
Suites: $SUITE-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
rm -f "$ROOT/etc/apt/sources.list"
# No service may start in the image while it is being built.
printf '#!/bin/sh\nexit 101\n' >"$ROOT/usr/sbin/policy-rc.d"
chmod 0755 "$ROOT/usr/sbin/policy-rc.d"
echo "$IMAGE_NAME" >"$ROOT/etc/hostname"
printf '127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n' >"$ROOT/etc/hosts"
echo 'LANG=C.UTF-8' >"$ROOT/etc/default/locale"

# ---------------------------------------------------------------------------
# 3. The packages, with today's updates
# ---------------------------------------------------------------------------
t0=$(date +%s)
APT_OPTS=(-y -qq -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold -o APT::Sandbox::User=root)
log "apt-get install ${PACKAGES[*]}"
if ! in_root sh -c "apt-get update -qq && apt-get ${APT_OPTS[*]} dist-upgrade &&
		apt-get ${APT_OPTS[*]} install --no-install-recommends ${PACKAGES[*]}" >"$TMP/apt.log" 2>&1; then
	tail -n 30 "$TMP/apt.log" >&2
	die "installing the image's packages failed"
fi
log "apt took $(($(date +%s) - t0)) s"
KVER=$(cd "$ROOT/boot" && ls -1 vmlinuz-* | sed 's/^vmlinuz-//' | sort -V | tail -n 1)
[ -n "$KVER" ] && [ -f "$ROOT/boot/initrd.img-$KVER" ] || die "no kernel and initrd in the image's /boot"

# ---------------------------------------------------------------------------
# 4. Services: what a first boot does, and no more
# ---------------------------------------------------------------------------
in_root systemctl enable systemd-networkd.service >/dev/null 2>&1
# e2scrub checks LVM snapshots (the image has no LVM): its boot-time reaper alone took 10 s of a TCG guest's CPU.
in_root systemctl mask e2scrub_reap.service e2scrub_all.timer >/dev/null 2>&1
rm -f "$ROOT/usr/sbin/policy-rc.d"
# Each clone makes its own machine id at its first boot (an empty file: systemd's first-boot convention).
: >"$ROOT/etc/machine-id"
rm -f "$ROOT/var/lib/dbus/machine-id"
# The build host's resolver is not the guest's (DHCP or cloud-init write it at boot).
: >"$ROOT/etc/resolv.conf"
# Nothing of the build left in the image: apt's lists and caches, logs, debootstrap's notes.
rm -rf "$ROOT/var/lib/apt/lists/"* "$ROOT/var/cache/apt/"*.bin "$ROOT/var/cache/apt/archives/"*.deb "$ROOT/debootstrap" "$ROOT/var/log/"*.log \
	"$ROOT/var/log/apt/"* "$ROOT/var/cache/debconf/"*-old "$ROOT/var/lib/dpkg/"*-old
mkdir -p "$ROOT/var/lib/apt/lists/partial"
cat >"$ROOT/etc/vmshop-release" <<EOF
NAME=vmshop-$IMAGE_NAME
OS=$(. "$ROOT/etc/os-release" && echo "$PRETTY_NAME")
DEBIAN_VERSION=$(cat "$ROOT/etc/debian_version")
KERNEL=$KVER
AGENT=qemu-ga $(in_root dpkg-query -W -f='${Version}' qemu-guest-agent)
CLOUD_INIT=$(in_root dpkg-query -W -f='${Version}' cloud-init)
BUILT=$(date -u +%Y-%m-%dT%H:%M:%SZ)
EOF

# ---------------------------------------------------------------------------
# 5. The disk: MBR, one ext4 partition from 1 MiB, GRUB in the MBR gap
# ---------------------------------------------------------------------------
uuid=$(cat /proc/sys/kernel/random/uuid)
CMDLINE="root=UUID=$uuid $CMDLINE_TAIL"
echo "UUID=$uuid / ext4 rw,discard,errors=remount-ro 0 1" >"$ROOT/etc/fstab"
mkdir -p "$ROOT/boot/grub/i386-pc"
cp "$ROOT/usr/lib/grub/i386-pc/"*.mod "$ROOT/usr/lib/grub/i386-pc/"*.lst "$ROOT/boot/grub/i386-pc/"
cat >"$ROOT/boot/grub/grub.cfg" <<EOF
# Written by scripts/build_debian_image.sh: boot the one kernel at once.
set timeout=0
serial --unit=0 --speed=115200
terminal_input serial
terminal_output serial
search --no-floppy --fs-uuid --set=root $uuid
linux /boot/vmlinuz-$KVER $CMDLINE
initrd /boot/initrd.img-$KVER
boot
EOF
# core.img: what the BIOS-loaded boot sector loads from sectors 1..; it finds /boot/grub by the prefix.
in_root grub-mkimage -O i386-pc -o /tmp/core.img -p "(hd0,msdos1)/boot/grub" \
	biosdisk part_msdos ext2 search search_fs_uuid linux normal serial terminal
mv "$ROOT/tmp/core.img" "$TMP/core.img"
cp "$ROOT/usr/lib/grub/i386-pc/boot.img" "$TMP/boot.img"
core_sectors=$((($(stat -c %s "$TMP/core.img") + 511) / 512))
[ "$core_sectors" -lt 2047 ] || die "GRUB's core image does not fit the MBR gap"

log "making the ext4 file system (${DISK_GIB} GiB disk)"
PART_START=2048 # sectors: 1 MiB
disk_bytes=$((DISK_GIB * 1024 * 1024 * 1024))
part_bytes=$((disk_bytes - PART_START * 512))
truncate -s "$part_bytes" "$TMP/part.raw"
mkfs.ext4 -q -F -L debian-root -U "$uuid" -E lazy_itable_init=0,lazy_journal_init=0,root_owner=0:0 \
	-d "$ROOT" "$TMP/part.raw"
e2fsck -fn "$TMP/part.raw" >/dev/null 2>&1 || die "e2fsck finds errors in the new file system"
truncate -s "$disk_bytes" "$TMP/disk.raw"
printf 'label: dos\nstart=%d, type=83, bootable\n' "$PART_START" | sfdisk -q "$TMP/disk.raw"
dd if="$TMP/part.raw" of="$TMP/disk.raw" bs=1M seek=1 conv=notrunc,sparse status=none
rm -f "$TMP/part.raw"
# The boot sector's code (not the partition table after byte 440), then core.img from sector 1.
dd if="$TMP/boot.img" of="$TMP/disk.raw" bs=440 count=1 conv=notrunc status=none
dd if="$TMP/core.img" of="$TMP/disk.raw" bs=512 seek=1 conv=notrunc status=none
qemu-img convert -q -f raw -O qcow2 -o cluster_size=65536 "$TMP/disk.raw" "$TMP/disk.qcow2"
rm -f "$TMP/disk.raw"

# ---------------------------------------------------------------------------
# 6. The kernel and initrd for direct boot
# ---------------------------------------------------------------------------
is_elf() { [ "$(head -c 4 "$1" | od -An -tx1 | tr -d ' \n')" = 7f454c46 ]; }
# As scripts/build_guest_image.sh does (the kernel's extract-vmlinux): find the xz payload and unpack it.
extract_vmlinux() {
	local img=$1 out=$2 pos
	for pos in $(tr '\3757zXZ\000\nabcde' '\nabcde=' <"$img" | grep -abo '^abcde' | cut -d: -f1); do
		tail -c "+$pos" "$img" | xz -dc --single-stream >"$out" 2>/dev/null || :
		if [ -s "$out" ] && is_elf "$out"; then
			return 0
		fi
	done
	return 1
}
extract_vmlinux "$ROOT/boot/vmlinuz-$KVER" "$TMP/vmlinux" || die "no xz-compressed ELF kernel in vmlinuz-$KVER"
cp "$ROOT/boot/initrd.img-$KVER" "$TMP/initrd.img"

# ---------------------------------------------------------------------------
# 7. Image configuration
# ---------------------------------------------------------------------------
xml_escape() { sed -e 's/&/\&amp;/g' -e 's/</\&lt;/g' -e 's/>/\&gt;/g' -e 's/"/\&quot;/g'; }
cat >"$TMP/image.xml" <<EOF
<?xml version="1.0" encoding="UTF-8"?>
<image xmlns="urn:vmshop:image:1" name="$IMAGE_NAME">
  <description>$(. "$ROOT/etc/os-release" && echo "$PRETTY_NAME" | xml_escape), minimal cloud image (kernel $KVER), built by scripts/build_debian_image.sh</description>
  <disk file="disk.qcow2" format="qcow2"/>
  <boot kernel="vmlinux" initrd="initrd.img" cmdline="$(printf '%s' "$CMDLINE" | xml_escape)" machine="$MACHINE"/>
  <hardware memory="$MEMORY_MIB" vcpus="$VCPUS" disk="$DISK_GIB" arch="x86_64"/>
  <guest agent="qemu-ga" contextualization="cloud-init" kernel="own" data-share="9p"/>
  <dag xmlns="urn:vmshop:dag:1">
    <nodes>
      <blank id="hw" memory="$MEMORY_MIB" vcpus="$VCPUS" disk="$DISK_GIB" arch="x86_64"/>
      <script id="os" interpreter="/bin/sh">$OS_STEP</script>
    </nodes>
    <edges><edge from="hw" to="os"/></edges>
  </dag>
</image>
EOF

# ---------------------------------------------------------------------------
# 8. Into the warehouse: rename into place, image.xml and the stamp last
# ---------------------------------------------------------------------------
rm -f "$OUT/.build-stamp"
chmod 0755 "$OUT"
for f in vmlinux initrd.img disk.qcow2 image.xml; do
	chmod 0644 "$TMP/$f"
	mv -f "$TMP/$f" "$OUT/$f"
done
echo "$stamp" >"$OUT/.build-stamp"
INDEX=$WAREHOUSE/index.txt
touch "$INDEX"
if ! grep -Fxq "$OUT/image.xml" "$INDEX"; then
	if [ -s "$INDEX" ] && [ -n "$(tail -c 1 "$INDEX")" ]; then echo >>"$INDEX"; fi
	echo "$OUT/image.xml" >>"$INDEX"
fi
log "built $OUT (kernel $KVER, $(du -sh --apparent-size "$OUT/disk.qcow2" | cut -f1) disk.qcow2, $(du -sh "$OUT" | cut -f1) on disk) in $(($(date +%s) - start_time)) s"
