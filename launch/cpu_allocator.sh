#!/usr/bin/env bash
# Prints the LD_PRELOAD value that makes CPU training use tcmalloc, or nothing.
#
#   LD_PRELOAD="$(launch/cpu_allocator.sh)" python -m longnet_dist.train ...
#
# glibc serves every tensor above 32 MiB with a fresh mmap and unmaps it on free, so a long-sequence
# CPU step pays page faults and page zeroing for each large tensor, every step. tcmalloc keeps freed
# memory for reuse: training steps ran up to 1.27x faster with a lower peak (docs/performance.md, "tcmalloc on CPU
# runs", measured with benchmarks/train.py). Install: apt-get install libtcmalloc-minimal4
# (Debian/Ubuntu) or gperftools elsewhere.
# LONGNET_TCMALLOC: auto (default: use it when found), 0 (never), 1 (required: fail when missing).
# Whatever LD_PRELOAD already holds is kept after it.
set -euo pipefail
mode="${LONGNET_TCMALLOC:-auto}"
case "$mode" in auto|0|1) ;; *) echo "cpu_allocator.sh: LONGNET_TCMALLOC=$mode must be auto, 0 or 1" >&2; exit 2 ;; esac
library=""
if [ "$mode" != 0 ]; then
    for name in libtcmalloc_minimal.so.4 libtcmalloc.so.4; do
        library="$( { ldconfig -p 2>/dev/null || /sbin/ldconfig -p 2>/dev/null || true; } \
                   | awk -v n="$name" '$1 == n { print $NF; exit }')"
        [ -n "$library" ] && break
    done
    if [ -z "$library" ] && [ "$mode" = 1 ]; then
        echo "cpu_allocator.sh: LONGNET_TCMALLOC=1 but no libtcmalloc_minimal.so.4 / libtcmalloc.so.4 (ldconfig -p)" >&2
        exit 1
    fi
fi
echo "${library}${library:+${LD_PRELOAD:+:}}${LD_PRELOAD:-}"
