#!/usr/bin/env bash
# Build nmvm's minimal Linux guest: a kernel from Debian's linux-source-6.1
# (tinyconfig + config.fragment + patches/*.patch) as an uncompressed ELF
# vmlinux, and an uncompressed newc cpio holding /init (init/init.c, a static
# program with raw system calls) and /dev/console.
#
# Usage: guest-images/linux/build.sh [CACHE_DIR]
#   CACHE_DIR defaults to <repo>/guest-images/cache/linux-min.
#
# Outputs go to CACHE_DIR/<hash>/{vmlinux,initrd.cpio,config}, where <hash>
# covers every input: the config fragment, the patches, the linux-source
# version, the init source, the compiler version and this script. When they
# exist nothing is done. Builds happen in temporary directories that are
# renamed into place, so an interrupted build is never taken for a finished
# one; concurrent runs wait for each other.
#
# Installs the Debian packages it needs if they are missing (as root).
# Progress goes to stderr. The last two lines on stdout are always
#   vmlinux=<absolute path>
#   initrd=<absolute path>
set -euo pipefail

PROG=linux/build.sh
SRC_PKG=linux-source-6.1
SRC_TAR=/usr/src/linux-source-6.1.tar.xz
# What the build needs, as (command-or-file package) pairs: the kernel
# build needs all of them (libelf for objtool, flex and bison for Kconfig,
# bc for its headers, xz to unpack the source); the init only gcc.
KERNEL_NEEDS=(
    "gcc build-essential"
    "make build-essential"
    "bc bc"
    "flex flex"
    "bison bison"
    "xz xz-utils"
    "/usr/include/libelf.h libelf-dev"
)
INIT_NEEDS=(
    "gcc build-essential"
)

die() {
    echo "$PROG: $*" >&2
    exit 1
}
log() {
    echo "$PROG: $*" >&2
}
trap 'echo "$PROG: unexpected failure (exit $?) at line $LINENO" >&2' ERR

last_lines() { # file [n]
    tail -n "${2:-15}" "$1" 2>/dev/null | sed 's/^/    /' >&2 || true
}

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
ROOT=$(cd "$HERE/../.." && pwd -P)

[ $# -le 1 ] || die "usage: $0 [CACHE_DIR]"
CACHE=${1:-$ROOT/guest-images/cache/linux-min}
mkdir -p "$CACHE" || die "cannot create cache dir $CACHE"
CACHE=$(cd "$CACHE" && pwd -P)

FRAGMENT=$HERE/config.fragment
INIT_SRC=$HERE/init/init.c
shopt -s nullglob
PATCHES=("$HERE"/patches/*.patch)
shopt -u nullglob
[ -s "$FRAGMENT" ] || die "missing $FRAGMENT"
[ -s "$INIT_SRC" ] || die "missing $INIT_SRC"
[ ${#PATCHES[@]} -gt 0 ] || die "no patches in $HERE/patches"

# Serialise concurrent runs (tests call this in parallel).
exec 9>"$CACHE/.lock"
flock 9 || die "cannot lock $CACHE/.lock"

# Leftovers of interrupted builds (no other build runs: we hold the lock).
rm -rf "$CACHE"/.tmp.*

TMP=
cleanup() {
    [ -z "$TMP" ] || rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

# ------------------------------------------------------------- packages ---

APT_UPDATED=0
apt_install() { # packages...
    [ "$(id -u)" = 0 ] || die "missing Debian packages: $* (run as root, or install them: apt-get install $*)"
    log "installing Debian packages: $*"
    local logf
    logf=$(mktemp "${TMPDIR:-/tmp}/nmvm-linux-apt.XXXXXX")
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@" >"$logf" 2>&1; then
        if [ "$APT_UPDATED" = 0 ]; then
            APT_UPDATED=1
            log "running apt-get update"
            apt-get update >"$logf" 2>&1 || { last_lines "$logf"; rm -f "$logf"; die "apt-get update failed"; }
            DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@" >"$logf" 2>&1 ||
                { last_lines "$logf"; rm -f "$logf"; die "apt-get install $* failed"; }
        else
            last_lines "$logf"
            rm -f "$logf"
            die "apt-get install $* failed"
        fi
    fi
    rm -f "$logf"
}

installed_version() { # package
    dpkg-query -W -f='${Status} ${Version}\n' "$1" 2>/dev/null |
        awk '$1 == "install" && $3 == "installed" { print $4 }' || true
}

candidate_version() { # package
    apt-cache policy "$1" 2>/dev/null |
        awk '$1 == "Candidate:" && $2 != "(none)" && !done { print $2; done = 1 }' || true
}

# The source version is part of the cache key. Use the installed package's;
# if it is not installed, the version apt would install (so that a restored
# cache is found without installing 140 MB).
SRC_VER=$(installed_version "$SRC_PKG")
if [ -z "$SRC_VER" ]; then
    SRC_VER=$(candidate_version "$SRC_PKG")
    if [ -z "$SRC_VER" ] && [ "$(id -u)" = 0 ]; then
        log "no candidate for $SRC_PKG; running apt-get update"
        APT_UPDATED=1
        apt-get update >/dev/null 2>&1 || die "apt-get update failed"
        SRC_VER=$(candidate_version "$SRC_PKG")
    fi
    [ -n "$SRC_VER" ] || die "$SRC_PKG is neither installed nor installable (no apt candidate)"
fi
GCC_VER=$(gcc -dumpfullversion 2>/dev/null || echo none)

# ----------------------------------------------------------- cache keys ---

hash_of() { # files...
    local f
    for f in "$@"; do
        printf '== %s\n' "${f#"$HERE"/}"
        cat "$f"
    done | sha256sum | cut -c1-16
}

# The kernel depends on the fragment, the patches, the source, the compiler
# and this script; the whole image also on the init. Kernels are cached on
# their own so that a change to the init alone does not rebuild the kernel.
KHASH=$( {
    echo "source=$SRC_PKG $SRC_VER gcc=$GCC_VER"
    hash_of "$HERE/build.sh" "$FRAGMENT" "${PATCHES[@]}"
} | sha256sum | cut -c1-16)
HASH=$( {
    echo "kernel=$KHASH"
    hash_of "$INIT_SRC"
} | sha256sum | cut -c1-16)

OUT=$CACHE/$HASH
KOUT=$CACHE/kernel-$KHASH

print_result() {
    echo "vmlinux=$OUT/vmlinux"
    echo "initrd=$OUT/initrd.cpio"
}

if [ -s "$OUT/vmlinux" ] && [ -s "$OUT/initrd.cpio" ]; then
    print_result
    exit 0
fi

log "building $OUT ($SRC_PKG $SRC_VER, gcc $GCC_VER)"
T0=$(date +%s)

SRC=$CACHE/src-$SRC_VER
if [ -s "$KOUT/vmlinux" ]; then NEEDS=("${INIT_NEEDS[@]}"); else NEEDS=("${KERNEL_NEEDS[@]}"); fi
missing=()
for need in "${NEEDS[@]}"; do
    what=${need%% *}
    pkg=${need#* }
    if [[ $what == /* ]]; then [ -e "$what" ] && continue; else command -v "$what" >/dev/null 2>&1 && continue; fi
    [[ " ${missing[*]} " == *" $pkg "* ]] || missing+=("$pkg")
done
# The source package only if its source is not unpacked yet.
if [ ! -f "$SRC/Makefile" ] && [ "$(installed_version "$SRC_PKG")" != "$SRC_VER" ]; then
    missing+=("$SRC_PKG=$SRC_VER")
fi
[ ${#missing[@]} = 0 ] || apt_install "${missing[@]}"

TMP=$(mktemp -d "$CACHE/.tmp.XXXXXX") || die "mktemp failed"

# --------------------------------------------------------------- source ---

# The pristine source, unpacked once per version.
if [ ! -f "$SRC/Makefile" ]; then
    [ "$(installed_version "$SRC_PKG")" = "$SRC_VER" ] || die "$SRC_PKG $SRC_VER did not get installed"
    [ -s "$SRC_TAR" ] || die "$SRC_PKG is installed but $SRC_TAR is missing"
    log "unpacking $SRC_TAR"
    mkdir "$TMP/unpack"
    tar -xf "$SRC_TAR" -C "$TMP/unpack" || die "cannot unpack $SRC_TAR"
    [ -f "$TMP/unpack/linux-source-6.1/Makefile" ] || die "$SRC_TAR has no linux-source-6.1/Makefile"
    rm -rf "$SRC"
    mv "$TMP/unpack/linux-source-6.1" "$SRC"
    # Older versions' sources are of no further use.
    for old in "$CACHE"/src-*; do
        [ "$old" = "$SRC" ] || rm -rf "$old"
    done
fi

# --------------------------------------------------------------- kernel ---

FRAGMENT_LINES=$(grep -E '^(CONFIG_[A-Za-z0-9_]+=|# CONFIG_[A-Za-z0-9_]+ is not set)' "$FRAGMENT")

# Every option of the fragment must have ended up exactly so: Kconfig
# silently drops options whose dependencies are missing.
check_config() { # .config
    local line opt bad=0
    while IFS= read -r line; do
        if [[ $line == "# "* ]]; then
            opt=${line#\# }
            opt=${opt%% *}
            if grep -q "^$opt=" "$1"; then
                log "config: $opt should be off but is $(grep "^$opt=" "$1")"
                bad=1
            fi
        else
            opt=${line%%=*}
            if ! grep -qxF "$line" "$1"; then
                log "config: wanted $line, got: $(grep -E "^$opt=|^# $opt is not set" "$1" || echo 'absent (dependencies missing?)')"
                bad=1
            fi
        fi
    done <<<"$FRAGMENT_LINES"
    [ "$bad" = 0 ] || die "the kernel configuration does not have every option of $FRAGMENT"
}

build_kernel() {
    local tree=$TMP/tree kb=$TMP/kbuild p f
    log "preparing a patched source tree"
    # A tree of hard links to the pristine source; each file a patch touches
    # is first replaced by a copy of its own, so the pristine tree stays so.
    cp -al "$SRC" "$tree"
    for p in "${PATCHES[@]}"; do
        while IFS= read -r f; do
            [ -f "$tree/$f" ] || die "${p##*/} touches $f, which the source lacks"
            cp "$tree/$f" "$tree/$f.nmvm-copy"
            mv -f "$tree/$f.nmvm-copy" "$tree/$f"
        done < <(awk '/^\+\+\+ / { sub(/^b\//, "", $2); print $2 }' "$p")
        log "applying ${p##*/}"
        patch -d "$tree" -p1 --forward --batch --fuzz=0 --no-backup-if-mismatch <"$p" >"$TMP/patch.log" 2>&1 ||
            { last_lines "$TMP/patch.log"; die "${p##*/} does not apply to $SRC_PKG $SRC_VER"; }
    done

    mkdir "$kb"
    local mk=(make -C "$tree" O="$kb" ARCH=x86_64
        KBUILD_BUILD_USER=nmvm KBUILD_BUILD_HOST=nmvm
        KBUILD_BUILD_TIMESTAMP="$SRC_PKG $SRC_VER")
    log "configuring (tinyconfig + ${FRAGMENT##*/})"
    {
        "${mk[@]}" tinyconfig &&
            "$tree/scripts/kconfig/merge_config.sh" -m -O "$kb" "$kb/.config" "$FRAGMENT" &&
            "${mk[@]}" olddefconfig
    } >"$TMP/config.log" 2>&1 || { last_lines "$TMP/config.log"; die "kernel configuration failed"; }
    check_config "$kb/.config"

    log "building vmlinux with $(nproc) jobs (a few minutes; log: $TMP/kbuild.log)"
    "${mk[@]}" -j"$(nproc)" vmlinux >"$TMP/kbuild.log" 2>&1 ||
        { last_lines "$TMP/kbuild.log" 30; die "the kernel build failed"; }
    [ -s "$kb/vmlinux" ] || die "the kernel build made no vmlinux"

    mkdir "$TMP/kernel"
    cp "$kb/vmlinux" "$kb/.config" "$TMP/kernel/"
    mv "$TMP/kernel/.config" "$TMP/kernel/config"
    rm -rf "$KOUT"
    mv "$TMP/kernel" "$KOUT"
    rm -rf "$tree" "$kb"
}

if [ -s "$KOUT/vmlinux" ]; then
    log "kernel is cached: $KOUT"
else
    build_kernel
fi

# ----------------------------------------------------------------- init ---

log "building /init and the initramfs"
mkdir "$TMP/image"
gcc -static -nostdlib -ffreestanding -mgeneral-regs-only -fno-stack-protector -O2 \
    -fno-pie -no-pie -fno-asynchronous-unwind-tables -Wall -Wextra -Werror \
    -s -Wl,--build-id=none -o "$TMP/init" "$INIT_SRC" 2>"$TMP/init.log" ||
    { last_lines "$TMP/init.log"; die "cannot build $INIT_SRC"; }
gcc -O2 -o "$TMP/gen_init_cpio" "$SRC/usr/gen_init_cpio.c" 2>"$TMP/cpio.log" ||
    { last_lines "$TMP/cpio.log"; die "cannot build the kernel's usr/gen_init_cpio"; }
cat >"$TMP/cpio.list" <<EOF
dir /dev 0755 0 0
nod /dev/console 0600 0 0 c 5 1
file /init $TMP/init 0755 0 0
EOF
"$TMP/gen_init_cpio" -t 0 "$TMP/cpio.list" >"$TMP/image/initrd.cpio" 2>"$TMP/cpio.log" ||
    { last_lines "$TMP/cpio.log"; die "gen_init_cpio failed"; }

# The kernel is shared with other images by a hard link (a copy if the
# file system has none).
ln "$KOUT/vmlinux" "$TMP/image/vmlinux" 2>/dev/null || cp "$KOUT/vmlinux" "$TMP/image/vmlinux"
cp "$KOUT/config" "$TMP/image/config"
rm -rf "$OUT"
mv "$TMP/image" "$OUT"

log "done in $(($(date +%s) - T0)) s: vmlinux $(stat -c %s "$OUT/vmlinux") bytes, initrd $(stat -c %s "$OUT/initrd.cpio") bytes"
print_result
