# nmvm's routine tasks. `just --list` shows them.

set shell := ["bash", "-euo", "pipefail", "-c"]

# Cargo's target directory (CARGO_TARGET_DIR, if set, as cargo itself honours it).
target := env_var_or_default("CARGO_TARGET_DIR", "target")
nmvm := target + "/release/nmvm"

# Show the recipes.
default:
    @just --list

# Build nmvm (and the bundled guest it embeds) in release mode.
build:
    cargo build --release

# Boot the bundled guest; extra arguments go to `nmvm run`, e.g. `just run --cpus 2 --cmdline exit=7`.
run *ARGS: build
    {{nmvm}} run {{ARGS}}

# The whole test suite, exactly as the README and CI run it.
test:
    cargo test --workspace

# Formatting and lints, as CI checks them.
lint: lint-freebsd
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets -- -D warnings

# Type-check and lint the FreeBSD (bhyve) build from Linux; nothing is linked.
lint-freebsd:
    rustup target list --installed | grep -qx x86_64-unknown-freebsd || rustup target add x86_64-unknown-freebsd
    cargo clippy --workspace --all-targets --target x86_64-unknown-freebsd -- -D warnings

# Format the code.
fmt:
    cargo fmt --all

# Build the bundled guest (it is also built by every nmvm build) and lint its bare-metal binary.
guest:
    cargo build -p nmvm
    @find {{target}}/debug/build -path '*guest-target/*/release/nmvm-guest' -newer guest-images/guest/Cargo.toml -print -quit

# Fetch the stock Debian cloud kernel into guest-images/cache/debian-kernel (bzImage and ELF vmlinux).
kernel-debian:
    bash guest-images/debian-kernel.sh

# Boot the stock Debian kernel until it has printed its banner (under emulated KVM it then dies much later).
run-debian: build kernel-debian
    {{nmvm}} run --memory 512M --kernel guest-images/cache/debian-kernel/vmlinux --cmdline "earlyprintk=serial console=ttyS0"

# Build the Linux appliance (Debian cloud kernel + virtio modules + busybox initramfs) into guest-images/cache/appliance.
appliance:
    bash guest-images/appliance/build.sh

# Serve the virtio-net device over vhost-user on SOCK, backed by netmap port PORT (see README, "Use with QEMU").
vhost-user SOCK="/tmp/nmvm-vhost.sock" PORT="shm:vu{0" *ARGS="": build
    {{nmvm}} vhost-user --socket {{SOCK}} --net '{{PORT}}' {{ARGS}}

# Boot the appliance under QEMU (TCG) on the vhost-user socket SOCK; WORDS go on the guest's command line (e.g. "net=sink count=1000").
qemu-appliance SOCK="/tmp/nmvm-vhost.sock" WORDS="net=echo count=100": appliance
    #!/usr/bin/env bash
    set -euo pipefail
    out=$(bash guest-images/appliance/build.sh)
    kernel=$(sed -n 's/^kernel=//p' <<<"$out"); initrd=$(sed -n 's/^initrd=//p' <<<"$out")
    exec qemu-system-x86_64 -accel tcg -m 256 -nographic -no-reboot \
        -object memory-backend-memfd,id=mem,size=256M,share=on -numa node,memdev=mem \
        -chardev socket,id=c0,path={{SOCK}} -netdev vhost-user,id=n0,chardev=c0 \
        -device virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56,vectors=0 \
        -kernel "$kernel" -initrd "$initrd" \
        -append "console=ttyS0 quiet panic=-1 ipv6.disable=1 {{WORDS}}"

# The vhost-user tests (QEMU + the Linux appliance + pkt-gen).
test-vhost-user:
    cargo test -p nmvm --test vhost_user

# Boot timing and VMM memory of the bundled guest: medians over N runs (default 20).
boot-metrics N="20": build
    #!/usr/bin/env bash
    set -euo pipefail
    first=(); verdict=(); rss=()
    for _ in $(seq {{N}}); do
        out=$({{nmvm}} run --stats 2>&1 >/dev/null)
        first+=($(awk '/first guest exit/ {print $4}' <<<"$out"))
        verdict+=($(awk '/verdict/ {print $2}' <<<"$out"))
        rss+=($(awk '/VMM resident memory/ {print $4}' <<<"$out"))
    done
    median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
    echo "runs: {{N}} (bundled guest, 1 vCPU, 256 MiB, $(nproc) host cores)"
    echo "process start -> first guest instruction (first exit): $(median "${first[@]}") ms (median)"
    echo "process start -> guest exited:                         $(median "${verdict[@]}") ms (median)"
    echo "VMM resident memory beyond guest RAM:                  $(median "${rss[@]}") KiB (median)"

# The data-path benchmark with the DPDK race: table, JSON and plot (vmm/bench/results.json, vmm/bench/mpps.svg).
bench: build
    {{nmvm}} bench --dpdk --json vmm/bench/results.json --plot vmm/bench/mpps.svg

# The DPDK race alone (installs Debian's dpdk-dev if dpdk-testpmd is missing).
bench-dpdk: build
    {{nmvm}} bench --dpdk-only

# The quick benchmark (64 and 1514 bytes; under a minute).
bench-quick: build
    {{nmvm}} bench --quick

# Device-worker instructions per 64-byte frame, counted by callgrind (repeatable).
bench-callgrind N="200000": build
    #!/usr/bin/env bash
    set -euo pipefail
    command -v valgrind >/dev/null || { echo "bench-callgrind needs valgrind (apt-get install valgrind)"; exit 1; }
    out=$(mktemp -d)
    valgrind --tool=callgrind --callgrind-out-file="$out/cg.out" --collect-atstart=no \
        --toggle-collect='*Worker*run*' {{nmvm}} bench --worker-frames {{N}} > "$out/stdout" 2> "$out/stderr"
    frames=$(awk '/worker frames:/ {print $3}' "$out/stdout")
    ir=$(awk '/^summary:/ {print $2}' "$out/cg.out")
    echo "device worker: $ir instructions for $frames frames of 64 bytes = $(( ir / frames )) instructions per frame"
    rm -rf "$out"

# Every fuzz target (vmm/fuzz, cargo-fuzz on nightly) for SECS seconds each, from its committed seed corpus (new inputs go to a scratch corpus).
fuzz SECS="60":
    #!/usr/bin/env bash
    set -euo pipefail
    command -v cargo-fuzz >/dev/null || { echo "fuzz needs cargo-fuzz: cargo install cargo-fuzz --locked"; exit 1; }
    cd vmm
    for t in $(cargo +nightly fuzz list); do
        work=$(mktemp -d)
        echo "== fuzz $t for {{SECS}} s"
        rc=0
        cargo +nightly fuzz run -O "$t" "$work" "fuzz/corpus/$t" -- \
            -max_total_time={{SECS}} -print_final_stats=1 > "$work.log" 2>&1 || rc=$?
        grep -E 'stat::number_of_executed_units|stat::average_exec_per_sec|ERROR|SUMMARY|panicked' "$work.log" || true
        if [ "$rc" -ne 0 ]; then tail -40 "$work.log"; echo "fuzz $t: a finding (see vmm/fuzz/artifacts/$t)"; exit 1; fi
        rm -rf "$work" "$work.log"
    done
