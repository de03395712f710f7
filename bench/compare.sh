#!/usr/bin/env bash
# bench/compare.sh -- issue 3's scenarios, side by side, with medians.
#
#   bench/compare.sh S1|S2|S3|S3a|S3b|S4|S5|S6|all
#   bench/compare.sh table S1      (the table again, from the results in $OUT)
#
# S1-S3 run the same event stream through tallyd (tally-bench --spawn),
# PostgreSQL 15 (tally-pg-bench against a temp cluster on loopback) and the
# in-process ceiling (tally-ceiling), alternating A B C A B C, and print one
# table of medians with the ratios tallyd/PostgreSQL and tallyd/ceiling.
# S4-S6 are tallyd-only (proofs, crash recovery, growth) on big logs that
# tally-ceiling writes (a valid tallyd data dir).
#
# Environment (defaults in brackets):
#   BUILD        build tree holding tallyd, tally-bench, tally-ceiling,
#                tally-pg-bench [build]
#   REPS         repetitions per system [3]
#   OUT          where JSON lines, logs and tables go [/tmp/tally-compare]
#   BIG          where the big logs live (kept between runs) [/tmp/tally-big]
#   S1_EVENTS    [2000000]   S2_SECONDS [20]   S3_SECONDS [15]   S4_SECONDS [15]
#   S6_SIZES     entries before each S6 run [0 10000000 50000000]
#   S6_EVENTS    events per S6 run [2000000]
#   S6_SETTLE    seconds after emptying the page cache, before each S6 run [20]
#   PG_BIN       [/usr/lib/postgresql/15/bin]
#
# Everything listens on 127.0.0.1 only; every server started here is stopped
# and every temp dir removed on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

BUILD=${BUILD:-build}
REPS=${REPS:-3}
OUT=${OUT:-/tmp/tally-compare}
BIG=${BIG:-/tmp/tally-big}
S1_EVENTS=${S1_EVENTS:-2000000}
S2_SECONDS=${S2_SECONDS:-20}
S3_SECONDS=${S3_SECONDS:-15}
S4_SECONDS=${S4_SECONDS:-15}
S6_SIZES=${S6_SIZES:-0 10000000 50000000}
S6_EVENTS=${S6_EVENTS:-2000000}
PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}

TALLYD=$BUILD/tallyd
BENCH=$BUILD/tally-bench
CEIL=$BUILD/tally-ceiling
PGB=$BUILD/tally-pg-bench

mkdir -p "$OUT" "$BIG" "$OUT/bin"
PGDIR=""
PGPID=""
PGPORT=""

log () { echo "compare: $*" >&2; }

as_root () {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

need_binaries () {
    local missing=0
    for b in "$TALLYD" "$BENCH" "$CEIL"; do [ -x "$b" ] || missing=1; done
    if [ "$1" = pg ] && [ ! -x "$PGB" ]; then missing=1; fi
    if [ $missing -eq 1 ]; then
        log "building in $BUILD"
        cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
        cmake --build "$BUILD" -j "$(nproc)" --target tallyd tally_bench tally_ceiling \
            $( [ "$1" = pg ] && echo tally_pg_bench ) >/dev/null
    fi
}

# PostgreSQL 15 from Debian, only if missing; libpq-dev for tally-pg-bench.
ensure_postgres () {
    local pkgs=()
    [ -x "$PG_BIN/initdb" ] || pkgs+=(postgresql-15)
    pkg-config --exists libpq 2>/dev/null || pkgs+=(libpq-dev)
    if [ ${#pkgs[@]} -gt 0 ]; then
        log "installing ${pkgs[*]}"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            --no-install-recommends "${pkgs[@]}" >/dev/null
        rm -f "$PGB"
    fi
    need_binaries pg
}

# The benchmark's tallyd runs from a private copy under another name, so
# that other work on a shared machine (a test suite's `pkill tallyd`) cannot
# stop it in the middle of a run.
# On a big log, tallyd's first start recounts quota usage from the ledger
# (about 1M entries/s here) before the quota actor is ready; the supervisor
# waits --shutdown-ms (10 s by default) for that, so S4-S6 give it longer.
BIG_ARGS=(--tallyd-arg=--shutdown-ms=120000)

private_tallyd () {
    SRV=$OUT/bin/tly-srv
    cp "$TALLYD" "$SRV.tmp" && mv "$SRV.tmp" "$SRV"
}

# Runs a command as the postgres user when we are root (initdb refuses root).
as_pg () {
    if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

pg_start () {
    ensure_postgres
    PGDIR=$(mktemp -d /tmp/tally-pg.XXXXXX)
    [ "$(id -u)" -eq 0 ] && chown postgres: "$PGDIR"
    PGPORT=$(( 20000 + RANDOM % 10000 ))
    as_pg "$PG_BIN/initdb" -D "$PGDIR/data" -A trust -U postgres -E UTF8 >"$OUT/pg-initdb.log"
    as_pg "$PG_BIN/pg_ctl" -D "$PGDIR/data" -l "$PGDIR/server.log" -w -t 60 start \
        -o "-p $PGPORT -k $PGDIR -c listen_addresses=127.0.0.1 -c max_connections=200 \
            -c fsync=on -c synchronous_commit=on -c full_page_writes=on \
            -c shared_buffers=2GB -c max_wal_size=8GB" >/dev/null
    PGPID=$(head -1 "$PGDIR/data/postmaster.pid")
    log "PostgreSQL $("$PG_BIN/postgres" --version | awk '{print $3}') pid $PGPID on 127.0.0.1:$PGPORT"
}

pg_stop () {
    if [ -n "$PGDIR" ] && [ -d "$PGDIR/data" ]; then
        as_pg "$PG_BIN/pg_ctl" -D "$PGDIR/data" -m fast -w stop >/dev/null 2>&1 || true
        rm -rf "$PGDIR"
    fi
    PGDIR=""
}
trap pg_stop EXIT INT TERM

# Before each run, what earlier runs left to write is written: PostgreSQL's
# dirty buffers (CHECKPOINT, which also restarts its checkpoint timer) and
# the page cache's dirty pages (sync; the kernel would write them back up to
# 30 s later), so no system's deferred writes land in another's run.
settle () {
    if [ -n "$PGDIR" ]; then
        "$PG_BIN/psql" -q -X -h 127.0.0.1 -p "$PGPORT" -U postgres -d postgres \
            -c CHECKPOINT >/dev/null 2>&1 || log "CHECKPOINT before the run failed"
    fi
    sync
}

# The machine may be shared: before each run, wait (up to QUIET_WAIT seconds,
# default 120) until other processes use less than 15% of a core, so runs
# start on a quiet machine; every result also records what others used.
busy_ticks () { awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9 }' /proc/stat; }
wait_quiet () {
    settle
    local deadline=$(( $(date +%s) + ${QUIET_WAIT:-120} )) hz
    hz=$(getconf CLK_TCK)
    while [ "$(date +%s)" -lt "$deadline" ]; do
        local a b
        a=$(busy_ticks); sleep 2; b=$(busy_ticks)
        if [ $(( (b - a) * 100 / (2 * hz) )) -lt 15 ]; then return 0; fi
    done
    log "the machine is still busy with other work; running anyway (see the other-processes column)"
}

CONNINFO () { echo "host=127.0.0.1 port=$PGPORT dbname=postgres user=postgres"; }

# run SCENARIO SYSTEM ARGS... : one run, its JSON line appended to OUT/SCENARIO.jsonl
run () {
    local sc=$1 sys=$2; shift 2
    local line rc=0
    wait_quiet
    case $sys in
        tallyd)     line=$("$BENCH" --spawn --tallyd "$SRV" --json --quiet --label "$sc" "$@") || rc=$? ;;
        postgresql) line=$("$PGB" --conninfo "$(CONNINFO)" --server-pid "$PGPID" --setup --json \
                           --quiet --label "$sc" "$@") || rc=$? ;;
        ceiling)    line=$("$CEIL" --json --quiet --label "$sc" "$@") || rc=$? ;;
    esac
    [ $rc -eq 0 ] || log "$sc $sys exited $rc (counts not as expected: see above)"
    echo "$line" >>"$OUT/$sc.jsonl"
    echo "$line" | awk -v s="$sc" -v y="$sys" '{
        match($0, /"events_per_s":[0-9.]+/); e = substr($0, RSTART + 15, RLENGTH - 15);
        match($0, /"p99_us":[0-9.]+/); p = substr($0, RSTART + 9, RLENGTH - 9);
        printf "compare: %-4s %-10s %10.0f events/s  p99 %8.2f ms\n", s, y, e, p / 1000 }' >&2
}

# scenario NAME: A B C repeated REPS times
scenario () {
    local sc=$1
    : >"$OUT/$sc.jsonl"
    for r in $(seq 1 "$REPS"); do
        log "$sc repetition $r of $REPS"
        case $sc in
            S1)
                run S1 tallyd --connections 4 --batch 1000 --events "$S1_EVENTS"
                run S1 postgresql --connections 4 --batch 1000 --events "$S1_EVENTS"
                run S1 ceiling --batch 1000 --events "$S1_EVENTS" ;;
            S2)
                run S2 tallyd --connections 64 --batch 1 --duration "$S2_SECONDS"
                run S2 postgresql --connections 64 --batch 1 --duration "$S2_SECONDS"
                # 64 clients with one event each in flight: at most 64 per commit.
                run S2 ceiling --batch 64 --duration "$S2_SECONDS" ;;
            S3a|S3b)
                local rate=10000; [ $sc = S3b ] && rate=100000
                run $sc tallyd --connections 16 --batch 10 --rate $rate --duration "$S3_SECONDS"
                run $sc postgresql --connections 16 --batch 10 --rate $rate --duration "$S3_SECONDS"
                run $sc ceiling --rate $rate --request-size 10 --duration "$S3_SECONDS" ;;
        esac
    done
    table "$sc"
}

# table NAME: medians per system, and the ratios
table () {
    local sc=$1
    awk -v sc="$sc" '
    function num(key,   v) {
        if (match($0, "\"" key "\":-?[0-9.]+")) { v = substr($0, RSTART + length(key) + 3, RLENGTH - length(key) - 3); return v + 0 }
        return -1 }
    function median(arr, n,   i, j, t) {
        for (i = 2; i <= n; i++) { t = arr[i]; for (j = i - 1; j >= 1 && arr[j] > t; j--) arr[j + 1] = arr[j]; arr[j + 1] = t }
        return n % 2 ? arr[(n + 1) / 2] : (arr[n / 2] + arr[n / 2 + 1]) / 2 }
    /^\{/ {
        match($0, /"system":"[a-z]+"/); s = substr($0, RSTART + 10, RLENGTH - 11)
        n[s]++; k = n[s]
        ev[s, k] = num("events_per_s"); p99[s, k] = num("p99_us") / 1000; p50[s, k] = num("p50_us") / 1000
        cpu[s, k] = num("events") > 0 ? num("server_cpu_s") * 1e6 / num("events") : 0
        anon[s, k] = num("server_peak_rss_anon_kb") / 1024; bpe[s, k] = num("bytes_per_entry")
        ccpu[s, k] = num("client_cpu_per_request_us")
        oth[s, k] = num("elapsed_s") > 0 ? 100 * num("other_cpu_s") / num("elapsed_s") : 0
        clean[s] += ($0 ~ /"clean":true/) ? 0 : 1
        if (!(s in seen)) { seen[s] = 1; order[++ns] = s } }
    END {
        printf "\n%s: medians of %s runs each\n", sc, n[order[1]]
        printf "| system | runs | events/s | p50 ms | p99 ms | server CPU us/event | peak RssAnon MiB | bytes/entry | client CPU us/req | other processes, %% of a core | all replies as expected |\n"
        printf "|---|---|---|---|---|---|---|---|---|---|---|\n"
        for (i = 1; i <= ns; i++) {
            s = order[i]; m = n[s]
            for (k = 1; k <= m; k++) { a[k] = ev[s, k] } E[s] = median(a, m)
            for (k = 1; k <= m; k++) { a[k] = p99[s, k] } P = median(a, m)
            for (k = 1; k <= m; k++) { a[k] = p50[s, k] } P5 = median(a, m)
            for (k = 1; k <= m; k++) { a[k] = cpu[s, k] } C = median(a, m)
            for (k = 1; k <= m; k++) { a[k] = anon[s, k] } A = median(a, m)
            for (k = 1; k <= m; k++) { a[k] = bpe[s, k] } B = median(a, m)
            for (k = 1; k <= m; k++) { a[k] = ccpu[s, k] } CC = median(a, m)
            for (k = 1; k <= m; k++) { a[k] = oth[s, k] } OT = median(a, m)
            CCS = s == "ceiling" ? "(in-process)" : sprintf ("%.1f", CC)
            printf "| %s | %d | %.0f | %.2f | %.2f | %.2f | %.1f | %.0f | %s | %.0f | %s |\n", s, m, E[s], P5, P, C, A, B, CCS, OT, clean[s] ? "NO" : "yes" }
        if (E["postgresql"] > 0) printf "\ntallyd/PostgreSQL events/s: %.2f\n", E["tallyd"] / E["postgresql"]
        if (E["ceiling"] > 0) printf "tallyd/ceiling events/s:    %.2f\n", E["tallyd"] / E["ceiling"]
    }' "$OUT/$sc.jsonl" | tee "$OUT/$sc.table"
}

# big_log N [NAME]: a data dir with at least N entries under BIG (BIG/NAME,
# default BIG/logN), written by the ceiling.  S5 and S6 append to theirs;
# S4 only reads, so its log keeps the size the issue names.
big_log () {
    local n=$1 dir=$BIG/${2:-log$1}
    local have=0
    if [ -f "$dir/.entries" ]; then have=$(cat "$dir/.entries"); fi
    if [ "$have" -lt "$n" ]; then
        log "writing a $n-entry log in $dir (tally-ceiling, 50,000 events per commit)"
        "$CEIL" --data-dir "$dir" --events $(( n - have )) --batch 50000 --json \
            --label "build$n" >>"$OUT/build.jsonl"
        # A log written by the ceiling has no quota checkpoint: tallyd's first
        # start recounts it (seconds at 50M) and the first measured run would
        # pay for it.  One small run leaves the log as a running tallyd has it.
        # Writes get `unavailable` until the count is done (20 s at 50M); a
        # stopped tallyd keeps what it counted, so tries converge.
        log "warming $dir up (tallyd counts quota usage once and checkpoints it)"
        local try
        for try in $(seq 1 30); do
            "$BENCH" --spawn --tallyd "$SRV" "${BIG_ARGS[@]}" --data-dir "$dir" --events 1000 \
                --batch 1000 --quiet >/dev/null 2>&1 && break
            log "warm-up try $try failed (tallyd is most likely still counting); trying again"
        done
        echo $(( n + 1000 )) >"$dir/.entries"
    fi
    echo "$dir"
}

s4 () {
    local dir; dir=$(big_log 10000000 proofs10000000)
    : >"$OUT/S4.jsonl"
    # Random proofs read pages all over a 6 GB log: after S6 (or a reboot)
    # the first seconds measure the disk, not tallyd.  One run first warms
    # the page cache; its result goes to S4-warmup.jsonl, not the table.
    wait_quiet
    "$BENCH" --spawn --tallyd "$SRV" "${BIG_ARGS[@]}" --data-dir "$dir" --proofs --connections 4 \
        --inflight 32 --duration "$S4_SECONDS" --json --quiet --label S4-warmup >"$OUT/S4-warmup.jsonl" \
        || log "the S4 warm-up run failed (see above)"
    for r in $(seq 1 "$REPS"); do
        wait_quiet
        "$BENCH" --spawn --tallyd "$SRV" "${BIG_ARGS[@]}" --data-dir "$dir" --proofs --connections 4 \
            --inflight 32 --duration "$S4_SECONDS" --json --quiet --label S4 | tee -a "$OUT/S4.jsonl" || log "an S4 run failed (see above)"
    done
    table S4
}

s5 () {
    local dir; dir=$(big_log 10000000)
    : >"$OUT/S5.jsonl"
    for r in $(seq 1 "$REPS"); do
        wait_quiet
        "$BENCH" --spawn --tallyd "$SRV" "${BIG_ARGS[@]}" --data-dir "$dir" --recovery --duration 3 \
            --connections 4 --batch 1000 --json --quiet --label S5 | tee -a "$OUT/S5.jsonl" \
            || log "an S5 run failed (see above)"
    done
    awk '{ match($0, /"first_answer_s":[0-9.]+/); a = substr($0, RSTART + 17, RLENGTH - 17);
           match($0, /"first_ingest_s":[0-9.]+/); b = substr($0, RSTART + 17, RLENGTH - 17);
           printf "S5: first answer %.3f s, first accepted ingest %.3f s, durable %s\n", a, b,
                  ($0 ~ /"durable":true/) ? "yes" : "NO" }' "$OUT/S5.jsonl" | tee "$OUT/S5.table"
}

# Every S6 run starts from the same memory state, whatever its size: the
# page cache emptied (where we may: root), the disk given time to settle,
# then its ledger read whole (a server that has been running has its
# ledger's pages in the page cache; a log written an hour ago, with other
# big files since, may not: the first 50M run then measured the disk, 120k
# events/s against 221k and 292k after it).  Without the same start, the
# sizes compare different guests: on this VM the 0 run after a 9 GB read
# ran 9% slower than after none, and a 50M run 25% faster after the cache
# was emptied first (bench/RESULTS.md, ninth session).
s6_settle () {
    sync
    local drop=(sh -c 'echo 1 >/proc/sys/vm/drop_caches')
    [ "$(id -u)" -eq 0 ] || drop=(sudo -n "${drop[@]}")     # never wait for a password
    if ! "${drop[@]}" 2>/dev/null; then
        log "could not drop the page cache (not root?): S6 runs start from unequal memory"
    fi
    sleep "${S6_SETTLE:-20}"
    if [ -n "${1:-}" ]; then
        cat "$1"/ledger/*.mdb >/dev/null || log "could not read $1/ledger (see above)"
    fi
}

# Sizes alternate within each repetition (0, 10M, 50M, 0, ...), as the
# systems do in S1-S3: the machine's speed drifts over minutes, and runs of
# one size back to back would each meet a different machine.
s6 () {
    : >"$OUT/S6.jsonl"
    local n
    for n in $S6_SIZES; do
        if [ "$n" -gt 0 ]; then big_log "$n" >/dev/null; fi
    done
    local r
    for r in $(seq 1 "$REPS"); do
        for n in $S6_SIZES; do
            local dir=""
            if [ "$n" -gt 0 ]; then dir=$BIG/log$n; fi
            s6_settle "$dir"
            wait_quiet
            "$BENCH" --spawn --tallyd "$SRV" "${BIG_ARGS[@]}" ${dir:+--data-dir "$dir"} --connections 4 \
                --batch 1000 --events "$S6_EVENTS" --json --quiet --label "S6@$n" \
                | tee -a "$OUT/S6.jsonl" || log "an S6 run failed (see above)"
            # The run added entries: the next one builds on top of them.
            if [ -n "$dir" ]; then
                echo $(( $(cat "$dir/.entries") + S6_EVENTS )) >"$dir/.entries"
            fi
        done
    done
    awk '{ match($0, /"label":"[^"]*"/); l = substr($0, RSTART + 9, RLENGTH - 10);
           match($0, /"events_per_s":[0-9.]+/); e = substr($0, RSTART + 15, RLENGTH - 15);
           match($0, /"tree_before":[0-9]+/); t = substr($0, RSTART + 14, RLENGTH - 14);
           match($0, /"server_peak_rss_anon_kb":[0-9]+/); a = substr($0, RSTART + 26, RLENGTH - 26);
           printf "%s (log of %d entries): %.0f events/s, peak RssAnon %.1f MiB\n", l, t, e, a / 1024 }' \
        "$OUT/S6.jsonl" | tee "$OUT/S6.table"
    # Medians per size, and each against the first size's (the target: 50M
    # within 20% of 0).
    local first="" first_n="" med
    for n in $S6_SIZES; do
        # (a size whose runs all failed has no lines: grep's status must not
        # end the script under pipefail)
        med=$({ grep "\"label\":\"S6@$n\"" "$OUT/S6.jsonl" || true; } \
              | sed -n 's/.*"events_per_s":\([0-9.]*\).*/\1/p' | sort -n \
              | awk '{ v[NR] = $1 } END { if (NR) print (NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2) }')
        [ -n "$med" ] || continue
        if [ -z "$first" ]; then first=$med; first_n=$n; fi
        awk -v n="$n" -v m="$med" -v f="$first" -v fn="$first_n" \
            'BEGIN { printf "S6@%s median: %.0f events/s, %+.1f%% against S6@%s\n", n, m, (f > 0 ? (m / f - 1) * 100 : 0), fn }'
    done | tee -a "$OUT/S6.table"
}

what=${1:-}
case $what in S*|all) need_binaries nopg; private_tallyd ;; esac
case $what in
    table)
        # Reprints a scenario's table from the JSON lines kept in $OUT.
        table "${2:?usage: compare.sh table S1|S2|S3a|S3b|S4}" ;;
    S1|S2|S3a|S3b)
        ensure_postgres; pg_start; scenario "$what" ;;
    S3)
        ensure_postgres; pg_start; scenario S3a; scenario S3b ;;
    S4) need_binaries nopg; s4 ;;
    S5) need_binaries nopg; s5 ;;
    S6) need_binaries nopg; s6 ;;
    all)
        ensure_postgres; pg_start
        for sc in S1 S2 S3a S3b; do scenario $sc; done
        pg_stop
        s4; s5; s6 ;;
    *)
        sed -n '2,30p' "$0" | sed 's/^# \{0,1\}//'
        exit 2 ;;
esac
