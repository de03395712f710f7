#!/usr/bin/env bash
# Tally set-up: installs what is missing on Debian 12, builds, then runs or tests.
#
#   config/setup.sh run [tallyd flags...]   install, build, start tallyd (./data)
#   config/setup.sh test                    install, build, run every test suite,
#                                           then the unit suites under ASan+UBSan
#   config/setup.sh build                   install and build only
#
# Packages come from Debian with apt-get (as root, or through sudo).  Nothing
# else is downloaded.  Build trees: build/ (release) and build-asan/.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES="build-essential cmake pkg-config libczmq-dev libzmq3-dev libmsgpack-dev
libsodium-dev liblmdb-dev libcmocka-dev lmdb-utils"
JOBS=$(nproc 2>/dev/null || echo 2)

install_packages () {
    local missing=()
    for p in $PACKAGES; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" \
            || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    echo "setup: installing ${missing[*]}"
    local sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null || { echo "setup: run as root or install sudo" >&2; exit 1; }
        sudo="sudo"
    fi
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}"
}

build () {  # build DIR [cmake args...]; TARGETS limits what is built
    local dir=$1; shift
    cmake -S . -B "$dir" -DCMAKE_BUILD_TYPE=RelWithDebInfo "$@" >/dev/null
    cmake --build "$dir" -j "$JOBS" ${TARGETS:+--target $TARGETS}
}

cmd=${1:-run}
[ $# -gt 0 ] && shift
install_packages
case "$cmd" in
    build)
        build build
        ;;
    run)
        TARGETS="tallyd tally_cli" build build
        mkdir -p data
        echo "setup: starting tallyd (data in ./data, API tcp://127.0.0.1:7400," \
             "control tcp://127.0.0.1:7401); stop it with Ctrl-C"
        exec ./build/tallyd --data-dir ./data "$@"
        ;;
    test)
        build build
        (cd build && ctest --output-on-failure -j "$JOBS" --timeout 600)
        # The same code under AddressSanitizer and UndefinedBehaviorSanitizer:
        # the unit suites, and the end-to-end suites against a sanitized tallyd.
        build build-asan -DTALLY_SANITIZE=ON
        (cd build-asan && ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 \
            UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
            ctest --output-on-failure -j "$JOBS" --timeout 600 ${TALLY_ASAN_TESTS:+-R "$TALLY_ASAN_TESTS"})
        ;;
    *)
        echo "usage: config/setup.sh run|test|build" >&2
        exit 1
        ;;
esac
