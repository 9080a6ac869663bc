#!/usr/bin/env bash
# Build the VMShop "tiny" guest image into a warehouse directory.
#
#   scripts/build_guest_image.sh [--force] WAREHOUSE_DIR
#
# Produces WAREHOUSE_DIR/tiny/{vmlinux,initrd.img,disk.qcow2,image.xml} and
# lists the absolute path of image.xml in WAREHOUSE_DIR/index.txt (once).
#
# Everything comes from Debian 12 packages: the kernel (linux-image-*-amd64)
# and busybox-static, fetched with apt-get download and cached in
# ${VMSHOP_CACHE:-$HOME/.cache/vmshop}/debs.  The build host needs apt (and
# root, to install the few host tools it needs if they are missing and to
# create the device node in the initramfs); no other network access.
#
# The build is idempotent: when nothing that goes into the image changed (this
# script, guest/, the two .deb files) it stops at once with "up to date";
# --force (or VMSHOP_FORCE_REBUILD=1) builds again.  Outputs are written under
# temporary names and renamed into place.  Rebuilding replaces disk.qcow2:
# clones (qcow2 overlays) made from the previous base must be discarded.
#
# See docs/guest-image.md for the boot command line and the agent protocol.
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

IMAGE_NAME=tiny
DISK_MIB=512
MEMORY_MIB=128
VCPUS=1
# The machine type and kernel command line that boot fastest and reliably
# under TCG (docs/guest-image.md has the measurements).
MACHINE=q35
CMDLINE="console=ttyS0 root=/dev/vda rootfstype=ext4 rw panic=-1 quiet loglevel=4 i8042.noaux i8042.nokbd i8042.nopnp clocksource=hpet no_timer_check random.trust_cpu=on mitigations=off"
# Fixed time stamps: the same inputs give the same image bytes.
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-1700000000}

log() { echo "build_guest_image: $*" >&2; }
die() { log "error: $*"; exit 1; }

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
GUEST=$REPO/guest
if [ ! -f "$GUEST/initramfs-init" ] || [ ! -d "$GUEST/rootfs" ]; then
	die "guest files not found in $GUEST"
fi

mkdir -p "${args[0]}"
WAREHOUSE=$(cd "${args[0]}" && pwd)
OUT=$WAREHOUSE/$IMAGE_NAME
CACHE=${VMSHOP_CACHE:-$HOME/.cache/vmshop}
DEBS=$CACHE/debs
mkdir -p "$DEBS" "$OUT"

start_time=$(date +%s)

# One build at a time per warehouse.
exec 9>"$WAREHOUSE/.build.lock"
flock 9

# ---------------------------------------------------------------------------
# Host tools
# ---------------------------------------------------------------------------
apt_updated=
apt_update_once() {
	if [ -z "$apt_updated" ]; then
		log "apt-get update"
		apt-get update -qq >&2
		apt_updated=1
	fi
}

need_pkgs=()
for p in e2fsprogs qemu-utils busybox-static cpio xz-utils gzip util-linux; do
	if [ "$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null)" != installed ]; then
		need_pkgs+=("$p")
	fi
done
if [ "${#need_pkgs[@]}" -gt 0 ]; then
	[ "$(id -u)" = 0 ] || die "missing host packages (${need_pkgs[*]}): run as root or install them"
	log "installing host packages: ${need_pkgs[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >&2 || {
		apt_update_once
		apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >&2
	}
fi
[ "$(id -u)" = 0 ] || die "must run as root (device nodes in the initramfs, apt-get)"

# ---------------------------------------------------------------------------
# Packages: the kernel and busybox-static, cached
# ---------------------------------------------------------------------------
kernel_pkg() {
	apt-cache depends linux-image-amd64 2>/dev/null |
		sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*-amd64\)$/\1/p' | head -n 1
}

# deb_for PKG: prints the path of PKG's .deb in the cache, downloading the
# candidate version if it is not there.  Offline, falls back to a cached one.
deb_for() {
	local pkg=$1 ver file
	ver=$(apt-cache show --no-all-versions "$pkg" 2>/dev/null | sed -n 's/^Version: //p' | head -n 1)
	if [ -z "$ver" ]; then
		apt_update_once || :
		ver=$(apt-cache show --no-all-versions "$pkg" 2>/dev/null | sed -n 's/^Version: //p' | head -n 1)
	fi
	if [ -n "$ver" ]; then
		file="$DEBS/${pkg}_${ver//:/%3a}_amd64.deb"
		if [ ! -s "$file" ]; then
			log "downloading $pkg $ver"
			(cd "$DEBS" && apt-get download -qq -o APT::Sandbox::User=root "$pkg=$ver" >&2)
		fi
		[ -s "$file" ] || die "apt-get download $pkg=$ver did not give $file"
		echo "$file"
		return
	fi
	file=$(ls -1 "$DEBS/${pkg}"_*_amd64.deb 2>/dev/null | sort -V | tail -n 1 || :)
	[ -n "$file" ] || die "cannot find package $pkg (apt-get update?)"
	log "apt does not know $pkg: using cached $file"
	echo "$file"
}

KPKG=${VMSHOP_KERNEL_PKG:-$(kernel_pkg)}
if [ -z "$KPKG" ]; then
	apt_update_once || :
	KPKG=$(kernel_pkg)
fi
if [ -z "$KPKG" ]; then
	KPKG=$(ls -1 "$DEBS"/linux-image-*-amd64_*.deb 2>/dev/null | sort -V | tail -n 1 | xargs -r basename | cut -d_ -f1 || :)
fi
[ -n "$KPKG" ] || die "cannot find the kernel package (apt-cache depends linux-image-amd64)"
KVER=${KPKG#linux-image-}
KDEB=$(deb_for "$KPKG")
BDEB=$(deb_for busybox-static)

# ---------------------------------------------------------------------------
# Up to date?
# ---------------------------------------------------------------------------
stamp=$(
	{
		sha256sum <"${BASH_SOURCE[0]}"
		(cd "$GUEST" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum)
		(cd "$GUEST" && find . -type f -perm -u+x -print | LC_ALL=C sort)
		basename "$KDEB"
		basename "$BDEB"
		echo "$SOURCE_DATE_EPOCH"
	} | sha256sum | cut -d' ' -f1
)
if [ -z "$force" ] && [ -f "$OUT/.build-stamp" ] &&
	[ "$(cat "$OUT/.build-stamp")" = "$stamp" ] &&
	[ -s "$OUT/vmlinux" ] && [ -s "$OUT/initrd.img" ] &&
	[ -s "$OUT/disk.qcow2" ] && [ -s "$OUT/image.xml" ] &&
	grep -Fxq "$OUT/image.xml" "$WAREHOUSE/index.txt" 2>/dev/null; then
	log "$OUT is up to date (kernel $KVER); --force rebuilds"
	exit 0
fi

# ---------------------------------------------------------------------------
# Unpack
# ---------------------------------------------------------------------------
TMP=$(mktemp -d "$WAREHOUSE/.$IMAGE_NAME.build.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
log "unpacking $(basename "$KDEB") and $(basename "$BDEB")"
mkdir -p "$TMP/kernel" "$TMP/busybox"
dpkg -x "$KDEB" "$TMP/kernel"
dpkg -x "$BDEB" "$TMP/busybox"
BUSYBOX=$TMP/busybox/bin/busybox
[ -x "$BUSYBOX" ] || die "no bin/busybox in $BDEB"
VMLINUZ=$TMP/kernel/boot/vmlinuz-$KVER
MODDIR=$TMP/kernel/lib/modules/$KVER
[ -f "$VMLINUZ" ] || die "no boot/vmlinuz-$KVER in $KDEB"
[ -d "$MODDIR" ] || die "no lib/modules/$KVER in $KDEB"

# ---------------------------------------------------------------------------
# Kernel: the uncompressed ELF vmlinux (QEMU boots it through its PVH entry
# point, skipping the in-guest decompression that costs ~3 s under TCG)
# ---------------------------------------------------------------------------
is_elf() { [ "$(head -c 4 "$1" | od -An -tx1 | tr -d ' \n')" = 7f454c46 ]; }

# Same approach as the kernel's scripts/extract-vmlinux: find each place the
# xz magic (FD 37 7A 58 5A 00) occurs and try to decompress from there.  tr
# turns the magic into "\nabcde" so grep -b can report its offset.
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
log "extracting vmlinux from vmlinuz-$KVER"
extract_vmlinux "$VMLINUZ" "$TMP/vmlinux" || die "no xz-compressed ELF kernel found in $VMLINUZ"

# ---------------------------------------------------------------------------
# Modules: resolve dependencies from each module's modinfo depends= field
# ---------------------------------------------------------------------------
declare -A KO=()
while IFS= read -r -d '' f; do
	n=${f##*/}
	n=${n%.ko*}
	KO[${n//-/_}]=$f
done < <(find "$MODDIR/kernel" -name '*.ko' -print0 -o -name '*.ko.xz' -print0 -o -name '*.ko.zst' -print0 -o -name '*.ko.gz' -print0)

# ko_read FILE: the module's bytes, decompressed if needed.
ko_read() {
	case "$1" in
		*.ko.xz) xz -dc "$1" ;;
		*.ko.zst) zstd -dcq "$1" ;;
		*.ko.gz) gzip -dc "$1" ;;
		*) cat "$1" ;;
	esac
}
ko_depends() {
	ko_read "$1" | tr '\0' '\n' | sed -n 's/^depends=//p' | head -n 1 | tr ',' ' '
}

declare -A STATE=()
ORDER=()
visit() { # depth-first, dependencies before the module itself
	local m=${1//-/_} d
	case "${STATE[$m]:-}" in
		visited) return 0 ;;
		active) die "module dependency cycle at $m" ;;
	esac
	[ -n "${KO[$m]:-}" ] || die "module $m not found in $KPKG"
	STATE[$m]=active
	for d in $(ko_depends "${KO[$m]}"); do
		visit "$d"
	done
	STATE[$m]=visited
	ORDER+=("$m")
}
while read -r m _; do
	case "$m" in '' | '#'*) continue ;; esac
	visit "$m"
done <"$GUEST/modules.list"
log "modules (${#ORDER[@]}): ${ORDER[*]}"

# ---------------------------------------------------------------------------
# Initramfs
# ---------------------------------------------------------------------------
IR=$TMP/initramfs
mkdir -p "$IR"/{bin,dev,proc,sys,newroot,etc,lib/modules}
install -m 0755 "$BUSYBOX" "$IR/bin/busybox"
ln -s busybox "$IR/bin/sh"
install -m 0755 "$GUEST/initramfs-init" "$IR/init"
: >"$IR/etc/modules.order"
for m in "${ORDER[@]}"; do
	ko_read "${KO[$m]}" >"$IR/lib/modules/$m.ko"
	echo "$m" >>"$IR/etc/modules.order"
done
mknod -m 0600 "$IR/dev/console" c 5 1
mknod -m 0666 "$IR/dev/null" c 1 3
find "$IR" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
(cd "$IR" && find . -print0 | LC_ALL=C sort -z |
	cpio --null --create --format=newc --owner=0:0 --reproducible --quiet) |
	gzip -n -6 >"$TMP/initrd.img"

# ---------------------------------------------------------------------------
# Root file system: ext4 made with mkfs.ext4 -d from a directory
# ---------------------------------------------------------------------------
RF=$TMP/rootfs
mkdir -p "$RF"/{bin,sbin,usr/bin,usr/sbin,etc,dev,proc,sys,tmp,run,root,var/log,var/run,vmshop,vmdata,lib/modules,mnt}
chmod 1777 "$RF/tmp"
chmod 0700 "$RF/root"
install -m 0755 "$BUSYBOX" "$RF/bin/busybox"
# Applet links made at build time (busybox --list-full gives bin/ls, ...).
while read -r a; do
	[ "$a" = bin/busybox ] && continue
	[ -e "$RF/$a" ] || [ -L "$RF/$a" ] && continue
	case "$a" in
		bin/*) ln -s busybox "$RF/$a" ;;
		*) ln -s /bin/busybox "$RF/$a" ;;
	esac
done < <("$BUSYBOX" --list-full)
cp -a "$GUEST/rootfs/." "$RF/"
chmod 0755 "$RF/sbin/vmshop-agent" "$RF/etc/init.d/rcS" "$RF/etc/init.d/rcK" \
	"$RF/etc/udhcpc/default.script" "$RF/etc/acpi/PWRF/00000080"
mknod -m 0600 "$RF/dev/console" c 5 1
mknod -m 0666 "$RF/dev/null" c 1 3
cat >"$RF/etc/vmshop-release" <<EOF
NAME=vmshop-$IMAGE_NAME
OS=busybox-tiny-linux
BASE=debian12
KERNEL=$KVER
KERNEL_PACKAGE=$(basename "$KDEB")
BUSYBOX_PACKAGE=$(basename "$BDEB")
EOF
: >"$RF/etc/resolv.conf"
find "$RF" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +

uuid=$(echo "vmshop-$IMAGE_NAME-$stamp" | sha256sum |
	sed -E 's/^(.{8})(.{4}).(.{3}).(.{3})(.{12}).*/\1-\2-4\3-a\4-\5/')
log "making the ext4 root file system (${DISK_MIB} MiB)"
rm -f "$TMP/disk.raw"
truncate -s "${DISK_MIB}M" "$TMP/disk.raw"
E2FSPROGS_FAKE_TIME=$SOURCE_DATE_EPOCH mkfs.ext4 -q -F -L vmshop-root -U "$uuid" \
	-E "lazy_itable_init=0,lazy_journal_init=0,root_owner=0:0,hash_seed=$uuid" \
	-d "$RF" "$TMP/disk.raw"
# mkfs.ext4 -d copies each file's ctime (which touch cannot set): pin the
# inode times so that the same inputs give the same disk bytes.
(cd "$RF" && find .) | sed -e 's|^\.||' -e 's|^$|/|' |
	while IFS= read -r p; do
		for field in ctime crtime atime mtime; do
			printf 'sif "%s" %s @%s\n' "$p" "$field" "$SOURCE_DATE_EPOCH"
		done
	done >"$TMP/debugfs.cmds"
E2FSPROGS_FAKE_TIME=$SOURCE_DATE_EPOCH debugfs -w -f "$TMP/debugfs.cmds" "$TMP/disk.raw" >/dev/null 2>"$TMP/debugfs.err" ||
	die "debugfs failed: $(head -n 5 "$TMP/debugfs.err")"
if grep -v '^debugfs ' "$TMP/debugfs.err" | grep -q .; then
	die "debugfs: $(grep -v '^debugfs ' "$TMP/debugfs.err" | head -n 5)"
fi
e2fsck -fn "$TMP/disk.raw" >/dev/null 2>&1 || die "e2fsck finds errors in the new root file system"
qemu-img convert -q -f raw -O qcow2 "$TMP/disk.raw" "$TMP/disk.qcow2"
rm -f "$TMP/disk.raw"
virt_bytes=$(qemu-img info --output=json "$TMP/disk.qcow2" | sed -n 's/.*"virtual-size": *\([0-9]*\).*/\1/p' | head -n 1)
GIB=$((1024 * 1024 * 1024))
DISK_GIB=$(((virt_bytes + GIB - 1) / GIB))

# ---------------------------------------------------------------------------
# Image configuration
# ---------------------------------------------------------------------------
xml_escape() { sed -e 's/&/\&amp;/g' -e 's/</\&lt;/g' -e 's/>/\&gt;/g' -e 's/"/\&quot;/g'; }
CMDLINE_XML=$(printf '%s' "$CMDLINE" | xml_escape)
cat >"$TMP/image.xml" <<EOF
<?xml version="1.0" encoding="UTF-8"?>
<image xmlns="urn:vmshop:image:1" name="$IMAGE_NAME">
  <disk file="disk.qcow2" format="qcow2"/>
  <boot kernel="vmlinux" initrd="initrd.img" cmdline="$CMDLINE_XML" machine="$MACHINE"/>
  <hardware memory="$MEMORY_MIB" vcpus="$VCPUS" disk="$DISK_GIB" arch="x86_64"/>
  <dag xmlns="urn:vmshop:dag:1">
    <nodes>
      <blank id="hw" memory="$MEMORY_MIB" vcpus="$VCPUS" disk="$DISK_GIB" arch="x86_64"/>
      <script id="os" interpreter="/bin/sh">#vmshop-os: tiny busybox linux 1</script>
    </nodes>
    <edges><edge from="hw" to="os"/></edges>
  </dag>
</image>
EOF

# ---------------------------------------------------------------------------
# Install into the warehouse: rename into place, image.xml and the stamp last
# ---------------------------------------------------------------------------
rm -f "$OUT/.build-stamp"
for f in vmlinux initrd.img disk.qcow2 image.xml; do
	chmod 0644 "$TMP/$f"
	mv -f "$TMP/$f" "$OUT/$f"
done
echo "$stamp" >"$OUT/.build-stamp"
INDEX=$WAREHOUSE/index.txt
touch "$INDEX"
if ! grep -Fxq "$OUT/image.xml" "$INDEX"; then
	# keep one path a line even if the file does not end with a newline
	if [ -s "$INDEX" ] && [ -n "$(tail -c 1 "$INDEX")" ]; then echo >>"$INDEX"; fi
	echo "$OUT/image.xml" >>"$INDEX"
fi

log "built $OUT (kernel $KVER, disk ${DISK_GIB} GiB virtual, $(du -sh "$OUT" | cut -f1) on disk) in $(($(date +%s) - start_time)) s"
