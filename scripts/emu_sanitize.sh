#!/usr/bin/env bash
# Runs the emulated kernel tests (pytest -m emu) with the emulator and every kernel compiled under a sanitizer:
#   scripts/emu_sanitize.sh address [pytest args]   AddressSanitizer: any read or write outside a tensor's
#                                                   storage (or the launch's shared memory) fails the test
#   scripts/emu_sanitize.sh thread  [pytest args]   ThreadSanitizer (XVERSE_EMU_TSAN=1): shared-memory races
#                                                   between barriers; threads run concurrently for it
# The sanitized extension is built once under build/emu_<asan|tsan>/ (a few minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
sanitizer=${1:?usage: scripts/emu_sanitize.sh address|thread [pytest args]}
shift
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
runtime=$(python -c "from xverse_engine.ops import emulated; print(emulated.sanitizer_runtime('$sanitizer'))")
schedule=alternate
[ "$sanitizer" = thread ] && schedule=concurrent
# The sanitized library may only be loaded with its runtime preloaded, building included (the build loads it).
# detect_leaks=0: CPython and torch keep allocations alive at exit by design.
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=0} TSAN_OPTIONS=${TSAN_OPTIONS:-halt_on_error=1}
LD_PRELOAD="$runtime" python -c "from xverse_engine.ops import emulated; emulated.build_sanitized('$sanitizer')"
XVERSE_EMU_SANITIZER=$sanitizer XVERSE_EMU_SCHEDULE=${XVERSE_EMU_SCHEDULE:-$schedule} LD_PRELOAD="$runtime" \
  python -m pytest -q -m emu -p no:cacheprovider tests "$@"
