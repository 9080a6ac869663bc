#!/usr/bin/env bash
# Build the VMShop "tiny" guest image into a warehouse directory.
#
#   scripts/build_guest_image.sh [--force] WAREHOUSE_DIR
#
# Produces WAREHOUSE_DIR/tiny/{vmlinux,initrd.img,disk.qcow2,image.xml} and
# lists the absolute path of image.xml in WAREHOUSE_DIR/index.txt (once).
#
# Everything comes from Debian 12 packages: the kernel (linux-image-*-amd64),
# busybox-static, and the QEMU guest agent (qemu-guest-agent, with the shared
# libraries its ELF NEEDED entries name, from their own packages), fetched with
# apt-get download and cached in ${VMSHOP_CACHE:-$HOME/.cache/vmshop}/debs.
# The build host needs apt (and root, to install the few host tools it needs
# if they are missing and to create the device node in the initramfs); no
# other network access.
#
# The build is idempotent: when nothing that goes into the image changed (this
# script, guest/, the .deb files) it stops at once with "up to date";
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
for p in e2fsprogs qemu-utils busybox-static cpio xz-utils gzip util-linux binutils; do
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
# Packages: the kernel, busybox-static and the guest agent's, cached
# ---------------------------------------------------------------------------
kernel_pkg() {
	apt-cache depends linux-image-amd64 2>/dev/null |
		sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*-amd64\)$/\1/p' | head -n 1
}

# debs_for PKG...: prints the path of each PKG's .deb in the cache (one a
# line, in the order given), downloading the candidate versions that are not
# there yet in one apt-get call.  Offline (apt does not know a package), falls
# back to the newest cached .deb of it.
debs_for() {
	local pkg ver file missing=() files=()
	declare -A vers=()
	# One apt-cache call for all: each record starts with Package:, then Version:.
	candidates() {
		apt-cache show --no-all-versions "$@" 2>/dev/null |
			awk '/^Package: /{p=$2} /^Version: /{if (p != "") print p, $2; p=""}'
	}
	while read -r pkg ver; do vers[$pkg]=$ver; done < <(candidates "$@")
	for pkg in "$@"; do
		if [ -z "${vers[$pkg]:-}" ]; then
			apt_update_once || :
			while read -r pkg ver; do vers[$pkg]=$ver; done < <(candidates "$@")
			break
		fi
	done
	for pkg in "$@"; do
		ver=${vers[$pkg]:-}
		if [ -n "$ver" ]; then
			file="$DEBS/${pkg}_${ver//:/%3a}_amd64.deb"
			[ -s "$file" ] || missing+=("$pkg=$ver")
		else
			file=$(ls -1 "$DEBS/${pkg}"_*_amd64.deb 2>/dev/null | sort -V | tail -n 1 || :)
			[ -n "$file" ] || die "cannot find package $pkg (apt-get update?)"
			log "apt does not know $pkg: using cached $file"
		fi
		files+=("$file")
	done
	if [ "${#missing[@]}" -gt 0 ]; then
		log "downloading ${missing[*]}"
		(cd "$DEBS" && apt-get download -qq -o APT::Sandbox::User=root "${missing[@]}" >&2)
	fi
	for file in "${files[@]}"; do
		[ -s "$file" ] || die "apt-get download did not give $file"
		echo "$file"
	done
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
# The guest agent and the packages holding the shared libraries it loads.
# Its closure is checked below from the ELF NEEDED entries: a library missing
# from these packages fails the build (add its package here).  libgcc-s1 is
# not NEEDED by anything but glibc loads libgcc_s.so.1 with dlopen when a
# thread exits or is cancelled (unwinding), so it is shipped too.
QGA_PKGS=(qemu-guest-agent libc6 libgcc-s1 libglib2.0-0 libpcre2-8-0 libudev1 libnuma1 liburing2)
mapfile -t ALL_DEBS < <(debs_for "$KPKG" busybox-static "${QGA_PKGS[@]}")
[ "${#ALL_DEBS[@]}" -eq $((2 + ${#QGA_PKGS[@]})) ] || die "could not get every package"
KDEB=${ALL_DEBS[0]}
BDEB=${ALL_DEBS[1]}
QGA_DEBS=("${ALL_DEBS[@]:2}")

# ---------------------------------------------------------------------------
# Up to date?
# ---------------------------------------------------------------------------
stamp=$(
	{
		sha256sum <"${BASH_SOURCE[0]}"
		(cd "$GUEST" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum)
		(cd "$GUEST" && find . -type f -perm -u+x -print | LC_ALL=C sort)
		for f in "${ALL_DEBS[@]}"; do basename "$f"; done
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
# The guest agent: qemu-ga and the closure of the shared libraries it needs
# ---------------------------------------------------------------------------
# Only the files under lib/, lib64/ and usr/ are unpacked (no docs, no
# man pages, no /etc); only the closure is copied into the image.  tar's
# status is ignored (it fails when a package has no lib64/, say): every
# file the image needs is checked below.
QGA_TREE=$TMP/qga
mkdir -p "$QGA_TREE"
for deb in "${QGA_DEBS[@]}"; do
	dpkg-deb --fsys-tarfile "$deb" |
		tar -x -C "$QGA_TREE" --no-same-owner --wildcards \
			--exclude='./usr/share/*' --exclude='*/gconv/*' --exclude='*/audit/*' \
			'./lib/*' './lib64/*' './usr/*' 2>/dev/null || :
done
QGA_BIN=/usr/sbin/qemu-ga
[ -x "$QGA_TREE$QGA_BIN" ] || die "no $QGA_BIN in $(basename "${QGA_DEBS[0]}")"
LIBDIRS=(/lib/x86_64-linux-gnu /usr/lib/x86_64-linux-gnu /lib64 /usr/lib64 /lib /usr/lib)

# tree_real PATH: PATH (absolute, inside the unpacked tree) with its symlinks
# resolved inside the tree; absolute link targets are taken from the tree's root.
tree_real() {
	local p=$1 t n=0
	while [ -L "$QGA_TREE$p" ]; do
		t=$(readlink "$QGA_TREE$p")
		case "$t" in /*) p=$t ;; *) p=${p%/*}/$t ;; esac
		n=$((n + 1))
		[ "$n" -lt 40 ] || die "symlink loop at $1 in the agent's packages"
	done
	echo "$p"
}
# elf_needed FILE: its NEEDED entries, one a line.
elf_needed() {
	readelf -dW "$1" | sed -n 's/.*(NEEDED).*Shared library: \[\(.*\)\]$/\1/p'
}
elf_interp() {
	readelf -lW "$1" | sed -n 's/.*\[Requesting program interpreter: \(.*\)\]$/\1/p'
}
is_elf_x86_64() {
	readelf -hW "$1" 2>/dev/null | grep -q 'Machine:.*X86-64'
}

QGA_INTERP=$(elf_interp "$QGA_TREE$QGA_BIN")
[ -n "$QGA_INTERP" ] || die "$QGA_BIN has no program interpreter"
declare -A LIB_FILE=()   # soname -> resolved path inside the tree
declare -A SEEN_ELF=()
QGA_LIBS=()
queue=("$QGA_BIN" "lib:${QGA_INTERP##*/}" lib:libgcc_s.so.1)
while [ "${#queue[@]}" -gt 0 ]; do
	item=${queue[0]}
	queue=("${queue[@]:1}")
	case "$item" in
		lib:*)
			name=${item#lib:}
			[ -n "${LIB_FILE[$name]:-}" ] && continue
			found=
			for d in "${LIBDIRS[@]}"; do
				if [ -e "$QGA_TREE$d/$name" ]; then
					found=$(tree_real "$d/$name")
					break
				fi
			done
			[ -n "$found" ] && [ -f "$QGA_TREE$found" ] ||
				die "qemu-ga needs $name, which none of ${QGA_PKGS[*]} holds (add its package to QGA_PKGS)"
			is_elf_x86_64 "$QGA_TREE$found" || die "$found (for $name) is not an x86-64 ELF file"
			LIB_FILE[$name]=$found
			QGA_LIBS+=("$name")
			file=$found
			;;
		*) file=$item ;;
	esac
	[ -n "${SEEN_ELF[$file]:-}" ] && continue
	SEEN_ELF[$file]=1
	while read -r n; do
		[ -n "$n" ] && queue+=("lib:$n")
	done < <(elf_needed "$QGA_TREE$file")
done
[ -n "${LIB_FILE[${QGA_INTERP##*/}]:-}" ] || die "the interpreter $QGA_INTERP is in none of ${QGA_PKGS[*]}"
log "qemu-ga $(basename "${QGA_DEBS[0]}" | cut -d_ -f2 | sed 's/%3a/:/') needs: ${QGA_LIBS[*]}"

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
mkdir -p "$RF"/{bin,sbin,usr/bin,usr/sbin,etc,dev,proc,sys,tmp,run,root,var/log,var/run,vmdata,lib/modules,mnt}
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
# The guest agent: the binary, its libraries under their sonames in
# /lib/x86_64-linux-gnu (the loader's default search path: no ld.so.cache),
# and its interpreter where its PT_INTERP says (a link, as in Debian).
mkdir -p "$RF/lib/x86_64-linux-gnu" "$RF/usr/sbin"
rm -f "$RF$QGA_BIN"
install -m 0755 "$QGA_TREE$QGA_BIN" "$RF$QGA_BIN"
for name in "${QGA_LIBS[@]}"; do
	install -m 0644 "$QGA_TREE${LIB_FILE[$name]}" "$RF/lib/x86_64-linux-gnu/$name"
done
chmod 0755 "$RF/lib/x86_64-linux-gnu/${QGA_INTERP##*/}"
if [ "$QGA_INTERP" != "/lib/x86_64-linux-gnu/${QGA_INTERP##*/}" ]; then
	mkdir -p "$RF${QGA_INTERP%/*}"
	ln -sfn "/lib/x86_64-linux-gnu/${QGA_INTERP##*/}" "$RF$QGA_INTERP"
fi
chmod 0755 "$RF/sbin/vmshop-qga" "$RF/sbin/shutdown" "$RF/etc/init.d/rcS" "$RF/etc/init.d/rcK" \
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
AGENT=qemu-ga
AGENT_PACKAGE=$(basename "${QGA_DEBS[0]}")
AGENT_LIBRARIES=${QGA_LIBS[*]}
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
  <guest agent="qemu-ga" contextualization="none" kernel="any" data-share="9p"/>
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
