#!/usr/bin/env bash
# Build the sample application's Debian package, for scripts/sample_debian.xml:
#
#   scripts/build_sample_deb.sh OUTPUT_DIR      -> OUTPUT_DIR/vmshop-wordfreq_1.0_all.deb
#
# "wordfreq" counts the words of the files in a directory and prints the most
# frequent ones; it reads its settings from /etc/wordfreq.conf (input=DIR,
# top=N), which the sample DAG writes with a file action.  The package is made
# with dpkg-deb (architecture all, a POSIX shell program, no dependencies
# outside Debian's essential set), to be placed in a plant's data store (the
# guest has no mirror to install from: it mounts the store read-only and runs
# dpkg -i on the file).
set -euo pipefail
[ "$#" -eq 1 ] || { echo "usage: $0 OUTPUT_DIR" >&2; exit 2; }
out=$1
mkdir -p "$out"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
root=$tmp/vmshop-wordfreq
mkdir -p "$root/DEBIAN" "$root/usr/bin" "$root/usr/share/doc/vmshop-wordfreq"
cat >"$root/DEBIAN/control" <<'CONTROL'
Package: vmshop-wordfreq
Version: 1.0
Architecture: all
Maintainer: VMShop <vmshop@localhost>
Section: text
Priority: optional
Description: word frequencies of a directory's files (VMShop's sample application)
 Counts the words of every file in the directory /etc/wordfreq.conf names
 (input=DIR) and prints the most frequent (top=N), one "COUNT WORD" a line.
CONTROL
cat >"$root/usr/bin/wordfreq" <<'PROGRAM'
#!/bin/sh
# wordfreq: the most frequent words of the files in $input (from /etc/wordfreq.conf).
set -eu
conf=${WORDFREQ_CONF:-/etc/wordfreq.conf}
[ -r "$conf" ] || { echo "wordfreq: no configuration $conf" >&2; exit 2; }
input= top=10
. "$conf"
[ -d "$input" ] || { echo "wordfreq: input=$input is not a directory" >&2; exit 2; }
echo "wordfreq 1.0 on $(hostname): $(find "$input" -type f | wc -l) file(s) in $input"
find "$input" -type f -exec cat {} + | tr -cs 'A-Za-z' '\n' | tr 'A-Z' 'a-z' | grep -v '^$' |
	sort | uniq -c | sort -k1,1nr -k2 | head -n "$top"
PROGRAM
chmod 0755 "$root/usr/bin/wordfreq"
printf 'wordfreq: a sample application of VMShop. Public domain.\n' >"$root/usr/share/doc/vmshop-wordfreq/copyright"
dpkg-deb --root-owner-group -Zgzip --build "$root" "$out/vmshop-wordfreq_1.0_all.deb" >/dev/null
echo "$out/vmshop-wordfreq_1.0_all.deb"
