#!/usr/bin/env bash
# Resources of `biofoundry serve` with 100 simulated sensors publishing
# telemetry every second: resident memory, CPU and the telemetry rate MES
# receives, over a 60-s window after a 5-s warm-up.
#
#   benches/serve_resources.sh            # CARGO_TARGET_DIR is honoured
#
# What it does:
#   - builds the release binary (`cargo build --release`);
#   - starts mosquitto (a child of this script, on a free 127.0.0.1 port, temp
#     config) or, when mosquitto is not installed, sets `[mqtt] embedded = true`
#     (the broker then runs inside serve, and its memory and CPU count in the
#     figures: the table says which);
#   - writes a lab file in a temp dir: 100 devices on `sim://` (their profiles'
#     simulators inside the controller), a mix of four sensor profiles whose
#     signals have no `poll` of their own, so `[telemetry] every = "1 s"` sets
#     the period of every signal (serve.rs::telemetry_signals) and each device
#     sends one message a second;
#   - runs `serve` and counts, with `mosquitto_sub` (QoS 1), the messages on
#     bf/v1/+/+/+/device/+/telemetry stamped inside the window;
#   - samples VmRSS / VmHWM (/proc/<pid>/status) and utime + stime
#     (/proc/<pid>/stat) at the window's start and end;
#   - stops serve with SIGTERM and prints a Markdown table.
#
# Environment: DEVICES (100), EVERY ("1 s"), WARMUP (5), WINDOW (60) seconds.
# Needs mosquitto_sub (mosquitto-clients), awk, and Linux's /proc.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
DEVICES="${DEVICES:-100}"
EVERY="${EVERY:-1 s}"
WARMUP="${WARMUP:-5}"
WINDOW="${WINDOW:-60}"
PROFILES=(hamilton-arc-ph hamilton-arc-od hamilton-visiferm-do eurotherm-3200)
COMMAND="CARGO_TARGET_DIR=$TARGET_DIR benches/serve_resources.sh"

TMP="$(mktemp -d)"
SERVE_PID=""
SUB_PID=""
BROKER_PID=""
cleanup() {
    for pid in "$SUB_PID" "$SERVE_PID" "$BROKER_PID"; do
        if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then
            kill "$pid" 2>/dev/null || true
            wait "$pid" 2>/dev/null || true
        fi
    done
    [[ -n "${KEEP_TMP:-}" ]] && echo "kept $TMP" >&2 || rm -rf "$TMP"
}
trap cleanup EXIT

die() {
    echo "serve_resources: $*" >&2
    exit 1
}

command -v mosquitto_sub >/dev/null || die "mosquitto_sub is needed (apt-get install mosquitto-clients)"
[[ -r /proc/self/status ]] || die "needs Linux's /proc"

# A port nothing listens on (bash's /dev/tcp: a refused connection means free).
free_port() {
    local port
    for _ in $(seq 1 100); do
        port=$((20000 + RANDOM % 40000))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "$port"
            return
        fi
    done
    die "no free port found"
}

# Waits (at most $2 seconds) until 127.0.0.1:$1 accepts connections.
wait_for_port() {
    local deadline=$((SECONDS + $2))
    until (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; do
        ((SECONDS < deadline)) || die "nothing listens on 127.0.0.1:$1 after $2 s"
        sleep 0.1
    done
}

echo "building: cargo build --release (target dir $TARGET_DIR)" >&2
(cd "$ROOT" && CARGO_TARGET_DIR="$TARGET_DIR" cargo build --release --quiet)
BIN="$TARGET_DIR/release/biofoundry"
[[ -x "$BIN" ]] || die "no binary at $BIN"

PORT="$(free_port)"
MOSQUITTO="$(command -v mosquitto || true)"
[[ -z "$MOSQUITTO" && -x /usr/sbin/mosquitto ]] && MOSQUITTO=/usr/sbin/mosquitto
if [[ -n "$MOSQUITTO" ]]; then
    {
        echo "listener $PORT 127.0.0.1"
        echo "allow_anonymous true"
        echo "persistence false"
        echo "max_queued_messages 1000000"
        echo "log_dest file $TMP/mosquitto.log"
        [[ "$(id -u)" == 0 ]] && echo "user root"
    } >"$TMP/mosquitto.conf"
    "$MOSQUITTO" -c "$TMP/mosquitto.conf" >/dev/null 2>&1 &
    BROKER_PID=$!
    wait_for_port "$PORT" 10
    BROKER="$("$MOSQUITTO" -h 2>/dev/null | head -1 || true), a separate process (not counted)"
    EMBEDDED=false
else
    BROKER="mosquitto not installed: embedded rumqttd inside serve (counted in RSS and CPU)"
    EMBEDDED=true
fi

LAB="$TMP/lab.toml"
{
    echo 'format = "biofoundry.lab/1"'
    echo
    echo '[controller]'
    echo 'site = "bench"'
    echo 'cell = "resources"'
    echo 'id = "serve-1"'
    echo "data_dir = \"$TMP/data\""
    echo
    echo '[mqtt]'
    echo 'host = "127.0.0.1"'
    echo "port = $PORT"
    echo "embedded = $EMBEDDED"
    echo
    echo '[telemetry]'
    echo "every = \"$EVERY\""
    for i in $(seq 1 "$DEVICES"); do
        echo
        echo '[[device]]'
        printf 'id = "s%03d"\n' "$i"
        echo "profile = \"${PROFILES[$(((i - 1) % ${#PROFILES[@]}))]}\""
        echo 'transport = "sim://"'
    done
} >"$LAB"

# Counted by the time mosquitto_sub stamps each message (%U: Unix time with
# nanoseconds), so starting and stopping it needs no precise timing.
start_sub() {
    mosquitto_sub -h 127.0.0.1 -p "$PORT" -q 1 -i "serve-resources-$$" \
        -t 'bf/v1/+/+/+/device/+/telemetry' -F '%U %t' >"$TMP/telemetry.txt" 2>"$TMP/sub.log" &
    SUB_PID=$!
}
start_serve() {
    (cd "$ROOT" && exec "$BIN" serve --lab "$LAB") >"$TMP/serve.log" 2>&1 &
    SERVE_PID=$!
}
if [[ "$EMBEDDED" == true ]]; then
    # The broker starts with serve.
    start_serve
    wait_for_port "$PORT" 10
    start_sub
else
    start_sub
    sleep 0.5
    start_serve
fi

sleep "$WARMUP"
kill -0 "$SERVE_PID" 2>/dev/null || { cat "$TMP/serve.log" >&2; die "serve exited during the warm-up"; }
kill -0 "$SUB_PID" 2>/dev/null || { cat "$TMP/sub.log" >&2; die "mosquitto_sub exited"; }

CLK_TCK="$(getconf CLK_TCK)"
# utime + stime in clock ticks (fields 14 and 15; counted after the `)` that
# ends the command name, which may contain spaces).
cpu_ticks() { awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$SERVE_PID/stat"; }
status_kb() { awk -v k="$1:" '$1 == k { print $2 }' "/proc/$SERVE_PID/status"; }
now() { date +%s.%N; }

T0="$(now)"
TICKS0="$(cpu_ticks)"
RSS0="$(status_kb VmRSS)"
THREADS="$(status_kb Threads)"
# VmHWM is updated lazily by the kernel: RSS is also sampled every second.
RSS_MAX="$RSS0"
for _ in $(seq 1 "$WINDOW"); do
    sleep 1
    RSS_NOW="$(status_kb VmRSS)"
    ((RSS_NOW > RSS_MAX)) && RSS_MAX="$RSS_NOW"
done
T1="$(now)"
TICKS1="$(cpu_ticks)"
RSS1="$(status_kb VmRSS)"
HWM="$(status_kb VmHWM)"

kill -TERM "$SERVE_PID"
STOP_DEADLINE=$((SECONDS + 20))
while kill -0 "$SERVE_PID" 2>/dev/null; do
    if ((SECONDS > STOP_DEADLINE)); then
        kill -KILL "$SERVE_PID" 2>/dev/null || true
        echo "serve did not stop within 20 s of SIGTERM: killed" >&2
        break
    fi
    sleep 0.1
done
wait "$SERVE_PID" 2>/dev/null && SERVE_EXIT=0 || SERVE_EXIT=$?
SERVE_PID=""
sleep 0.3
kill "$SUB_PID" 2>/dev/null || true
wait "$SUB_PID" 2>/dev/null || true
SUB_PID=""

RECEIVED="$(awk -v a="$T0" -v b="$T1" '$1 >= a && $1 < b { n++ } END { print n + 0 }' "$TMP/telemetry.txt")"
# Messages per device in the window: how many devices, the fewest, the most.
PER_DEVICE="$(awk -v a="$T0" -v b="$T1" '$1 >= a && $1 < b { split($2, t, "/"); n[t[7]]++ }
    END { min = -1; for (d in n) { k++; if (min < 0 || n[d] < min) min = n[d]; if (n[d] > max) max = n[d] }
          printf "%d %d %d", k, (min < 0 ? 0 : min), max }' "$TMP/telemetry.txt")"
TOTAL="$(wc -l <"$TMP/telemetry.txt")"
LAST_LOG="$(grep -E 'stopped|error|ERROR' "$TMP/serve.log" | tail -1 || true)"

awk -v t0="$T0" -v t1="$T1" -v c0="$TICKS0" -v c1="$TICKS1" -v hz="$CLK_TCK" \
    -v rss0="$RSS0" -v rss1="$RSS1" -v hwm="$HWM" -v n="$RECEIVED" -v devices="$DEVICES" \
    -v every="$EVERY" -v threads="$THREADS" -v broker="$BROKER" -v profiles="${PROFILES[*]}" \
    -v command="$COMMAND" -v warmup="$WARMUP" -v total="$TOTAL" -v exit_code="$SERVE_EXIT" \
    -v last_log="$LAST_LOG" -v rss_max="$RSS_MAX" -v per_device="$PER_DEVICE" '
BEGIN {
    secs = t1 - t0
    cpu = 100 * (c1 - c0) / hz / secs
    split(every, e, " ")
    expected = devices / e[1]
    printf "# biofoundry serve: resources with %d simulated devices\n\n", devices
    printf "command: %s\n", command
    printf "broker: %s\n", broker
    printf "devices: %d on sim://, cycling over %s; [telemetry] every = \"%s\"\n", devices, profiles, every
    printf "window: %.1f s after a %d-s warm-up; serve had %d threads\n\n", secs, warmup, threads
    printf "| metric | value | target |\n|---|---:|---|\n"
    printf "| RSS at window start / end (MB) | %.1f / %.1f | |\n", rss0 / 1024, rss1 / 1024
    peak = (hwm > rss_max ? hwm : rss_max) / 1024
    printf "| peak RSS (MB): max of VmHWM %.1f and VmRSS sampled every second %.1f | %.1f | < 50 MB %s |\n", hwm / 1024, rss_max / 1024, peak, (peak < 50 ? "met" : "NOT met")
    printf "| CPU, %% of one core over the window | %.2f %% (%d ticks of 1/%d s) | < 5 %% %s |\n", cpu, c1 - c0, hz, (cpu < 5 ? "met" : "NOT met")
    printf "| telemetry received in the window | %d messages | ~%d |\n", n, expected * secs
    printf "| telemetry rate | %.1f msgs/s | %.0f msgs/s (%d devices / %s) |\n", n / secs, expected, devices, every
    split(per_device, pd, " ")
    printf "| messages per device in the window (devices seen: fewest / most) | %d: %d / %d | ~%d each |\n", pd[1], pd[2], pd[3], secs / e[1]
    printf "\nmosquitto_sub received %d telemetry messages in all (warm-up and shutdown included)\n", total
    printf "serve exited with %d after SIGTERM; last log line: %s\n", exit_code, last_log
}'
