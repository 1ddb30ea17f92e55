#!/usr/bin/env bash
# Builds nmvm's Linux appliance: a stock Debian 12 cloud kernel (bzImage)
# and an initramfs with that kernel's virtio-net modules, busybox (Debian's
# busybox-static), the /init script beside this file, nmvm-net (the test
# program guest-images/linux/init/init.c) and tcp-send (tcp-send.c).
# Everything comes from Debian packages through apt-get download; nothing
# binary is committed. Used by tests/vhost_user.rs under QEMU, and bootable
# by `nmvm run` on a host with hardware KVM.
#
# Usage: guest-images/appliance/build.sh [CACHE_DIR]
#   CACHE_DIR defaults to <repo>/guest-images/cache/appliance; outputs go to
#   CACHE_DIR/<hash of the inputs>/{bzImage,initrd.cpio.gz}.
#
# Needs apt-get, dpkg-deb, gcc with static glibc (libc6-dev), gzip and lz4
# (for debian-kernel.sh). Progress goes to stderr; the last two lines on
# stdout are always
#   kernel=<absolute path of the bzImage>
#   initrd=<absolute path of the gzipped newc cpio>
set -euo pipefail

PROG=appliance/build.sh
die() {
    echo "$PROG: $*" >&2
    exit 1
}
log() { echo "$PROG: $*" >&2; }
last_lines() { tail -n 5 "$1" >&2 || true; }

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
ROOT=$(cd "$HERE/../.." && pwd -P)
[ $# -le 1 ] || die "usage: $0 [CACHE_DIR]"
CACHE=${1:-$ROOT/guest-images/cache/appliance}
mkdir -p "$CACHE" || die "cannot create $CACHE"
CACHE=$(cd "$CACHE" && pwd -P)

INIT=$HERE/init
TCP_SEND=$HERE/tcp-send.c
NET_SRC=$ROOT/guest-images/linux/init/init.c
for f in "$INIT" "$TCP_SEND" "$NET_SRC"; do [ -s "$f" ] || die "missing $f"; done
for t in apt-get apt-cache dpkg-deb gcc gzip sha256sum; do
    command -v "$t" >/dev/null || die "'$t' is missing (Debian: apt-get install apt dpkg gcc libc6-dev gzip coreutils)"
done

exec 9>"$CACHE/.lock"
flock 9 || die "cannot lock $CACHE/.lock"

# The kernel, its bzImage and its modules (cached by debian-kernel.sh).
KOUT=$(bash "$ROOT/guest-images/debian-kernel.sh") || die "guest-images/debian-kernel.sh failed (see above)"
get() { awk -v k="$1=" 'index($0, k) == 1 { v = substr($0, length(k) + 1) } END { print v }' <<<"$KOUT"; }
VMLINUZ=$(get vmlinuz)
MODULES=$(get modules)
[ -s "$VMLINUZ" ] && [ -s "$MODULES/order" ] || die "debian-kernel.sh gave no kernel or modules"
KSTAMP=$(cat "$(dirname "$VMLINUZ")/stamp")

candidate() {
    apt-cache policy "$1" 2>/dev/null |
        awk '$1 == "Candidate:" && $2 != "(none)" && !done { print $2; done = 1 }' || true
}
BB_VER=$(candidate busybox-static)
if [ -z "$BB_VER" ]; then
    log "running apt-get update (no candidate for busybox-static)"
    apt-get update >/dev/null 2>&1 || die "apt-get update failed"
    BB_VER=$(candidate busybox-static)
fi
[ -n "$BB_VER" ] || die "no installable candidate for busybox-static"

HASH=$({
    cat "$INIT" "$TCP_SEND" "$NET_SRC" "${BASH_SOURCE[0]}"
    echo "$KSTAMP"
    echo "busybox-static=$BB_VER gcc=$(gcc -dumpfullversion 2>/dev/null || echo none)"
} | sha256sum | cut -c1-16)
OUT=$CACHE/$HASH

print_result() {
    echo "kernel=$OUT/bzImage"
    echo "initrd=$OUT/initrd.cpio.gz"
}
if [ -s "$OUT/bzImage" ] && [ -s "$OUT/initrd.cpio.gz" ]; then
    print_result
    exit 0
fi

TMP=$(mktemp -d "${TMPDIR:-/tmp}/nmvm-appliance.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
log "building the appliance ($HASH): busybox-static $BB_VER, $(awk -F= '$1 == "package" { print $2 }' <<<"$KSTAMP")"

mkdir "$TMP/dl"
if [ "$(id -u)" = 0 ] && id _apt >/dev/null 2>&1; then
    chown _apt "$TMP/dl" 2>/dev/null || true
    chmod 0755 "$TMP"
fi
(cd "$TMP/dl" && apt-get download "busybox-static=$BB_VER") >"$TMP/dl.log" 2>&1 ||
    { last_lines "$TMP/dl.log"; die "apt-get download busybox-static=$BB_VER failed"; }
dpkg-deb -x "$TMP"/dl/busybox-static_*.deb "$TMP/bb" || die "cannot unpack busybox-static"
[ -x "$TMP/bb/bin/busybox" ] || die "busybox-static has no bin/busybox"

R=$TMP/root
mkdir -p "$R/bin" "$R/lib/modules" "$R/proc" "$R/sys" "$R/dev" "$R/tmp"
cp "$TMP/bb/bin/busybox" "$R/bin/busybox"
cp "$INIT" "$R/init"
chmod 0755 "$R/init"
cp "$MODULES"/*.ko "$MODULES/order" "$R/lib/modules/"
# init.c is written as a freestanding /init with raw system calls.
gcc -static -nostdlib -ffreestanding -mgeneral-regs-only -fno-stack-protector -O2 \
    -fno-pie -no-pie -fno-asynchronous-unwind-tables -Wall -Wextra -Werror \
    -s -Wl,--build-id=none -o "$R/bin/nmvm-net" "$NET_SRC" 2>"$TMP/net.log" ||
    { last_lines "$TMP/net.log"; die "cannot build $NET_SRC"; }
gcc -static -O2 -Wall -Wextra -Werror -s -o "$R/bin/tcp-send" "$TCP_SEND" 2>"$TMP/tcp.log" ||
    { last_lines "$TMP/tcp.log"; die "cannot build $TCP_SEND (needs libc6-dev for a static glibc)"; }

# busybox's own cpio writes the archive (no cpio package needed).
(cd "$R" && find . -mindepth 1 | LC_ALL=C sort | "$R/bin/busybox" cpio -o -H newc 2>/dev/null) |
    gzip -9 >"$TMP/initrd.cpio.gz" || die "cannot write the initramfs"

mkdir -p "$OUT.tmp"
cp "$VMLINUZ" "$OUT.tmp/bzImage"
mv "$TMP/initrd.cpio.gz" "$OUT.tmp/initrd.cpio.gz"
rm -rf "$OUT"
mv "$OUT.tmp" "$OUT"
log "done: $(stat -c %s "$OUT/initrd.cpio.gz") bytes of initramfs"
print_result
