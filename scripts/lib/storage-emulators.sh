# Starts moto (S3) and gcp-storage-emulator (GCS JSON API) on free loopback
# ports, each with a bucket `mmembed-test`, exports MMEMBED_TEST_S3 and
# MMEMBED_TEST_GCS for the tests, and stops both when the calling script
# exits. Sourced by scripts/test.sh.
#
#   start_storage_emulators "$STORAGE_PY"
start_storage_emulators() {
  local py="$1" bin
  bin=$(dirname "$py")
  local s3_port gcs_port
  s3_port=$("$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  gcs_port=$("$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  local logs="${TMPDIR:-/tmp}/mmembed-emulators.$$"
  mkdir -p "$logs"
  echo ">> starting moto_server (S3) on 127.0.0.1:$s3_port and gcp-storage-emulator (GCS) on 127.0.0.1:$gcs_port (logs in $logs)"
  "$bin/moto_server" -H 127.0.0.1 -p "$s3_port" >"$logs/moto.log" 2>&1 &
  EMULATOR_PIDS="$!"
  "$bin/gcp-storage-emulator" start --host 127.0.0.1 --port "$gcs_port" --in-memory >"$logs/gcs.log" 2>&1 &
  EMULATOR_PIDS="$EMULATOR_PIDS $!"
  trap 'kill $EMULATOR_PIDS 2>/dev/null || true' EXIT
  # Wait until both answer (a few seconds), then make the buckets; plain
  # urllib, so no curl is needed.
  "$py" - "$s3_port" "$gcs_port" <<'PY'
import sys, time, urllib.request
s3, gcs = (f"http://127.0.0.1:{p}" for p in sys.argv[1:3])
for _ in range(120):
    try:
        urllib.request.urlopen(s3 + "/", timeout=2)
        urllib.request.urlopen(gcs + "/", timeout=2)
        break
    except Exception:
        time.sleep(0.5)
else:
    sys.exit("the storage emulators did not come up; see their logs")
urllib.request.urlopen(urllib.request.Request(s3 + "/mmembed-test", method="PUT"), timeout=10)
urllib.request.urlopen(urllib.request.Request(
    gcs + "/storage/v1/b", data=b'{"name":"mmembed-test"}',
    headers={"content-type": "application/json"}, method="POST"), timeout=10)
PY
  export MMEMBED_TEST_S3="http://127.0.0.1:$s3_port"
  export MMEMBED_TEST_GCS="http://127.0.0.1:$gcs_port"
}
