#!/usr/bin/env bash
# Fetch a stock Debian 12 (bookworm) cloud kernel from the Debian archive and
# produce, in a cache folder, the compressed bzImage and the uncompressed ELF
# vmlinux embedded in it, and the package's virtio-net modules (the cloud
# kernel builds virtio as modules; guest-images/appliance/ loads them).
#
# Usage: guest-images/debian-kernel.sh [CACHE_DIR]
#   CACHE_DIR defaults to <repo>/guest-images/cache/debian-kernel.
#
# Environment:
#   NMVM_DEBIAN_KERNEL_PKG      use this kernel package instead of the one the
#                               metapackage linux-image-cloud-amd64 depends on.
#   NMVM_DEBIAN_KERNEL_REFRESH  if 1, re-resolve the package even when the
#                               cache is complete (rebuild only if it changed).
#
# Progress goes to stderr. The last three lines on stdout are always
#   modules=<absolute path of a folder with virtio*.ko, failover.ko, ...>
#   vmlinuz=<absolute path>
#   vmlinux=<absolute path>
set -euo pipefail

PROG=debian-kernel.sh
META_PKG=linux-image-cloud-amd64

die() {
    echo "$PROG: $*" >&2
    exit 1
}
log() {
    echo "$PROG: $*" >&2
}
trap 'echo "$PROG: unexpected failure (exit $?) at line $LINENO" >&2' ERR

# Last non-empty line of a file, flattened to one line (for error messages).
last_line() {
    grep -v '^[[:space:]]*$' "$1" 2>/dev/null | tail -n 1 | tr -d '\r' || true
}

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
ROOT=$(cd "$SCRIPT_DIR/.." && pwd -P)

[ $# -le 1 ] || die "usage: $0 [CACHE_DIR]"
CACHE=${1:-$ROOT/guest-images/cache/debian-kernel}
mkdir -p "$CACHE" || die "cannot create cache dir $CACHE"
CACHE=$(cd "$CACHE" && pwd -P)

VMLINUZ=$CACHE/vmlinuz
VMLINUX=$CACHE/vmlinux
STAMP=$CACHE/stamp
MODULES=$CACHE/modules
# The virtio-net driver and what it needs, in insmod order.
MODULE_LIST="virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci failover net_failover virtio_net"

print_result() {
    echo "modules=$MODULES"
    echo "vmlinuz=$VMLINUZ"
    echo "vmlinux=$VMLINUX"
}

# Serialise concurrent runs (tests may call this in parallel).
exec 9>"$CACHE/.lock"
flock 9 || die "cannot lock $CACHE/.lock"

stamp_get() { # key
    awk -v k="$1=" 'index($0, k) == 1 && !done { print substr($0, length(k) + 1); done = 1 }' "$STAMP" 2>/dev/null
}

cache_complete() {
    [ -s "$VMLINUZ" ] && [ -s "$VMLINUX" ] && [ -s "$STAMP" ] &&
        [ -s "$MODULES/virtio_net.ko" ] &&
        [ -n "$(stamp_get package)" ] && [ -n "$(stamp_get version)" ]
}

# Fast path: everything already there and no reason to look again.
if cache_complete && [ "${NMVM_DEBIAN_KERNEL_REFRESH:-0}" != 1 ]; then
    if [ -z "${NMVM_DEBIAN_KERNEL_PKG:-}" ] ||
        [ "$NMVM_DEBIAN_KERNEL_PKG" = "$(stamp_get package)" ]; then
        print_result
        exit 0
    fi
fi

TMP=
cleanup() {
    [ -z "$TMP" ] || rm -rf "$TMP"
    rm -f "$CACHE"/.vmlinuz.tmp.* "$CACHE"/.vmlinux.tmp.* "$CACHE"/.stamp.tmp.*
    rm -rf "$CACHE"/.modules.tmp.*
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP
TMP=$(mktemp -d "${TMPDIR:-/tmp}/nmvm-debian-kernel.XXXXXX") || die "mktemp failed"

# ---------------------------------------------------------------- resolve ---

APT_UPDATED=0
apt_update_once() {
    [ "$APT_UPDATED" = 0 ] || return 1
    APT_UPDATED=1
    log "running apt-get update (no candidate found) ..."
    apt-get update >"$TMP/update.log" 2>&1 ||
        die "apt-get update failed: $(last_line "$TMP/update.log")"
}

# Candidate version of a package, empty if none.
candidate() { # pkg
    apt-cache policy "$1" 2>/dev/null |
        awk '$1 == "Candidate:" && $2 != "(none)" && !done { print $2; done = 1 }' || true
}

if [ -n "${NMVM_DEBIAN_KERNEL_PKG:-}" ]; then
    PKG=$NMVM_DEBIAN_KERNEL_PKG
    [[ $PKG =~ ^[a-z0-9][a-z0-9.+-]+$ ]] || die "bad NMVM_DEBIAN_KERNEL_PKG: '$PKG'"
else
    meta_ver=$(candidate "$META_PKG")
    if [ -z "$meta_ver" ] && apt_update_once; then meta_ver=$(candidate "$META_PKG"); fi
    [ -n "$meta_ver" ] || die "no installable candidate for $META_PKG (even after apt-get update)"
    PKG=$(apt-cache depends "$META_PKG" 2>/dev/null |
        awk '($1 == "Depends:" || $1 == "|Depends:") && $2 ~ /^linux-image-6\.1\.[0-9a-z.+-]*-cloud-amd64$/ && !done { print $2; done = 1 }' || true)
    [ -n "$PKG" ] || die "cannot resolve the linux-image-6.1.*-cloud-amd64 package that $META_PKG $meta_ver depends on"
fi

VER=$(candidate "$PKG")
if [ -z "$VER" ] && apt_update_once; then VER=$(candidate "$PKG"); fi
[ -n "$VER" ] || die "no installable candidate for $PKG"

if cache_complete && [ "$(stamp_get package)" = "$PKG" ] && [ "$(stamp_get version)" = "$VER" ]; then
    log "cache is current ($PKG $VER)"
    print_result
    exit 0
fi

log "fetching $PKG $VER"

# --------------------------------------------------------------- download ---

DL=$TMP/dl
mkdir "$DL"
# Let apt's sandbox user write the download dir so apt does not warn about
# falling back to an unsandboxed download as root.
if [ "$(id -u)" = 0 ] && id _apt >/dev/null 2>&1; then
    chown _apt "$DL" 2>/dev/null || true
    chmod 0755 "$TMP"
fi
(cd "$DL" && apt-get download "$PKG=$VER") >"$TMP/download.log" 2>&1 ||
    die "apt-get download $PKG=$VER failed: $(last_line "$TMP/download.log")"

shopt -s nullglob
debs=("$DL"/*.deb)
[ ${#debs[@]} = 1 ] || die "apt-get download $PKG=$VER produced ${#debs[@]} .deb files, expected 1"

dpkg-deb -x "${debs[0]}" "$TMP/root" 2>"$TMP/dpkg.log" ||
    die "dpkg-deb -x ${debs[0]##*/} failed: $(last_line "$TMP/dpkg.log")"
imgs=("$TMP"/root/boot/vmlinuz-*)
[ ${#imgs[@]} = 1 ] || die "expected exactly one boot/vmlinuz-* in ${debs[0]##*/}, found ${#imgs[@]}"
BZ=${imgs[0]}
OUT_M=$(mktemp -d "$CACHE/.modules.tmp.XXXXXX")
for m in $MODULE_LIST; do
    found=("$TMP"/root/lib/modules/*/kernel/*/"$m.ko" "$TMP"/root/lib/modules/*/kernel/*/*/"$m.ko")
    [ ${#found[@]} = 1 ] || die "expected exactly one $m.ko in ${debs[0]##*/}, found ${#found[@]}"
    cp "${found[0]}" "$OUT_M/$m.ko"
done
echo "$MODULE_LIST" >"$OUT_M/order"
chmod 0755 "$OUT_M"
shopt -u nullglob

# ----------------------------------------------------------- parse header ---

filesize() { stat -c %s "$1"; }
# Unsigned little-endian integer of $3 bytes at offset $2 of file $1.
u_le() { # file offset width
    local v
    v=$(od -An -tu"$3" -j "$2" -N "$3" "$1" | tr -d '[:space:]')
    [ -n "$v" ] || die "cannot read $3 bytes at offset $2 of $1"
    printf '%s' "$v"
}
hex_bytes() { # file offset count
    od -An -tx1 -j "$2" -N "$3" "$1" | tr -d '[:space:]'
}

bz_size=$(filesize "$BZ")
[ "$bz_size" -ge 1024 ] || die "${BZ##*/} is too small ($bz_size bytes) to be a bzImage"
[ "$(hex_bytes "$BZ" $((0x202)) 4)" = 48647253 ] || die "${BZ##*/} has no 'HdrS' setup header magic"
hdr_ver=$(u_le "$BZ" $((0x206)) 2)
[ "$hdr_ver" -ge $((0x208)) ] ||
    die "${BZ##*/} boot protocol $(printf '%#x' "$hdr_ver") < 2.08 has no payload_offset/payload_length"

setup_sects=$(u_le "$BZ" $((0x1F1)) 1)
[ "$setup_sects" -ne 0 ] || setup_sects=4
pm_start=$(((setup_sects + 1) * 512))
payload_offset=$(u_le "$BZ" $((0x248)) 4)
payload_length=$(u_le "$BZ" $((0x24C)) 4)
pay_start=$((pm_start + payload_offset))
[ "$payload_length" -ge 8 ] && [ $((pay_start + payload_length)) -le "$bz_size" ] ||
    die "${BZ##*/}: payload (offset $pay_start, length $payload_length) lies outside the file ($bz_size bytes)"

PAYLOAD=$TMP/payload
dd if="$BZ" of="$PAYLOAD" iflag=skip_bytes,count_bytes skip="$pay_start" count="$payload_length" bs=1M status=none ||
    die "dd failed to cut the payload out of ${BZ##*/}"
[ "$(filesize "$PAYLOAD")" = "$payload_length" ] || die "failed to cut the payload out of ${BZ##*/}"

# Linux appends the decompressed size (u32 LE) to every compressed payload
# (gzip stores it as its ISIZE trailer).
expect_size=$(u_le "$PAYLOAD" $((payload_length - 4)) 4)

# ------------------------------------------------------------- decompress ---

magic=$(hex_bytes "$PAYLOAD" 0 6)
case $magic in
    02214c18*) fmt=lz4 tool=lz4 aptpkg=lz4 ;;
    1f8b*) fmt=gzip tool=gzip aptpkg=gzip ;;
    fd377a585a00) fmt=xz tool=xz aptpkg=xz-utils ;;
    28b52ffd*) fmt=zstd tool=zstd aptpkg=zstd ;;
    *) die "${BZ##*/}: unsupported payload compression (magic $magic)" ;;
esac

if ! command -v "$tool" >/dev/null 2>&1; then
    log "'$tool' not found, installing Debian package $aptpkg"
    if ! apt-get install -y --no-install-recommends "$aptpkg" >"$TMP/install.log" 2>&1; then
        apt_update_once || true
        apt-get install -y --no-install-recommends "$aptpkg" >"$TMP/install.log" 2>&1 ||
            die "apt-get install $aptpkg failed: $(last_line "$TMP/install.log")"
    fi
    command -v "$tool" >/dev/null 2>&1 || die "'$tool' still missing after installing $aptpkg"
fi

OUT_Z=$(mktemp "$CACHE/.vmlinuz.tmp.XXXXXX")
OUT_X=$(mktemp "$CACHE/.vmlinux.tmp.XXXXXX")

# Except for gzip (whose own trailer holds the size), the size word follows the
# compressed stream; leave it out so the decompressor sees a clean stream
# (lz4 otherwise exits 1 with "Stream followed by undecodable data").
STREAM=$PAYLOAD
if [ "$fmt" != gzip ]; then
    STREAM=$TMP/stream
    dd if="$PAYLOAD" of="$STREAM" iflag=count_bytes count=$((payload_length - 4)) bs=1M status=none ||
        die "dd failed to strip the size trailer from the payload of ${BZ##*/}"
fi

rc=0
case $fmt in
    lz4) lz4 -dc "$STREAM" >"$OUT_X" 2>"$TMP/decomp.log" || rc=$? ;;
    gzip) gzip -dc "$STREAM" >"$OUT_X" 2>"$TMP/decomp.log" || rc=$? ;;
    xz) xz -dc --single-stream "$STREAM" >"$OUT_X" 2>"$TMP/decomp.log" || rc=$? ;;
    zstd) zstd -dc "$STREAM" >"$OUT_X" 2>"$TMP/decomp.log" || rc=$? ;;
esac

out_size=$(filesize "$OUT_X")
if [ "$out_size" != "$expect_size" ]; then
    msg="$fmt decompression of ${BZ##*/} gave $out_size bytes, expected $expect_size"
    [ "$rc" = 0 ] || msg="$msg (exit $rc: $(last_line "$TMP/decomp.log"))"
    die "$msg"
fi
if [ "$rc" != 0 ]; then
    # Complaints about the trailing size word are fine once the size matches.
    why=$(last_line "$TMP/decomp.log")
    log "note: $tool exited $rc (${why:-no message}); output size matches the recorded $expect_size bytes, accepting"
fi

# ELF64, little-endian, x86-64 (e_machine 62 at 0x12).
[ "$(hex_bytes "$OUT_X" 0 4)" = 7f454c46 ] || die "decompressed payload of ${BZ##*/} is not an ELF file"
[ "$(hex_bytes "$OUT_X" 4 2)" = 0201 ] || die "decompressed payload of ${BZ##*/} is not a little-endian ELF64 file"
[ "$(u_le "$OUT_X" $((0x12)) 2)" = 62 ] || die "decompressed payload of ${BZ##*/} is not an x86-64 ELF file"

cp "$BZ" "$OUT_Z"
chmod 0644 "$OUT_Z" "$OUT_X"

# ---------------------------------------------------------------- install ---

# Drop the stamp first so a crash between the moves never leaves a stamp that
# vouches for a mix of old and new files.
rm -f "$STAMP"
mv -f "$OUT_Z" "$VMLINUZ"
mv -f "$OUT_X" "$VMLINUX"
rm -rf "$MODULES"
mv -f "$OUT_M" "$MODULES"
STAMP_TMP=$(mktemp "$CACHE/.stamp.tmp.XXXXXX")
{
    echo "package=$PKG"
    echo "version=$VER"
    echo "image=${BZ##*/}"
    echo "compression=$fmt"
} >"$STAMP_TMP"
chmod 0644 "$STAMP_TMP"
mv -f "$STAMP_TMP" "$STAMP"

log "done: $PKG $VER (${BZ##*/}, $fmt): vmlinuz $(filesize "$VMLINUZ") bytes, vmlinux $(filesize "$VMLINUX") bytes"
print_result
