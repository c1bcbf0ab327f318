#!/usr/bin/env bash
# Issue 24's GPU measurements in one prepared call, written to $OUT (the device tool brings it back):
#   1. make bench's report (python -m bench), on the GPU;
#   2. the data path's levers with --provider cuda (python -m bench.datapath);
#   3. served AlexNet 224² JPEGs at 1, 4, 8 and 16 front workers with one engine process, and the same
#      with per-worker engines, rounds alternating; LeNet likewise; /score_map 4096² in each layout
#      (python -m bench.ipc).
# Each part has its own time limit and its own results file, so a part that fails or overruns keeps the
# others' numbers. Nothing is downloaded there (the box has no network): `make gpu-kit` here puts the
# wheels (onnxruntime-gpu 1.31.1 in 60 MB parts: only 64 MiB travel per call), Debian's wrk and its
# LuaJIT in .gpu-kit/; carry it one part per call to /root/w there, calls back to back (the box goes
# back after 30 s idle), and run this with the last part:
#
#   bash bench/gpu.sh                        # on the device: OUT=$OUT KIT=/root/w by default
#                                            # (run(command="bash bench/gpu.sh", timeout_s=600))
#   KIT=/tmp/rootw PY=python3.12 PROVIDER=cpu SECS=2 WORKERS=1,2 SIDE=1024 OUT=/tmp/gpu bash bench/gpu.sh
#                                            # the rehearsal, here: the same steps on the CPU, short
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results/gpu}
KIT=${KIT:-/root/w}
PROVIDER=${PROVIDER:-cuda}
SECS=${SECS:-5}
ROUNDS=${ROUNDS:-2}
WORKERS=${WORKERS:-1,4,8,16}
SIDE=${SIDE:-4096}
PY=${PY:-python3}
SITE=${SITE:-/tmp/site}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu.log") 2>&1
export BENTOML_DO_NOT_TRACK=true BENTOML_HOME=${BENTOML_HOME:-/tmp/gpu-store} CONVSERVE_PROVIDERS=$PROVIDER
echo "== $(date -u +%FT%TZ) $(hostname) provider=$PROVIDER workers=$WORKERS"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null | tee "$OUT/gpu.csv"
lscpu | grep -E "Model name|^CPU\(s\)|Flags" > "$OUT/lscpu.txt"
df -h /dev/shm  # process mode's rings live there (README: sizing /dev/shm)

# 1. what the box lacks, from the kit: onnxruntime-gpu put back together, the rest as they are
if [ "$KIT" != none ]; then
  for first in "$KIT"/*.whl.part-aa; do
    [ -e "$first" ] && cat "${first%-aa}"-* > "${first%.part-aa}"
  done
  $PY -m pip install --quiet --no-index --find-links "$KIT" --target "$SITE" -r "$KIT/requirements.txt" \
    || { echo "install failed"; exit 1; }
  export PYTHONPATH="$SITE:$PWD" PATH="$SITE/bin:$KIT/bin:$PATH" LD_LIBRARY_PATH="$KIT/lib:${LD_LIBRARY_PATH:-}"
  PY_BIN="$SITE/bin"
fi
$PY -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())" \
  | tee "$OUT/onnxruntime.txt"
command -v wrk || { echo "no wrk: the served parts cannot run"; }

# 2. the models: the shipped exports (in the tree), AlexNet and its int8 twin exported here (torch)
for m in lenet5 lenet5-int8 digit-detector; do
  $PY -m bentoml models get "$m:latest" >/dev/null 2>&1 || $PY -m bentoml models import "bentomodels/$m.bentomodel"
done
$PY -m bentoml models get alexnet:latest >/dev/null 2>&1 \
  || $PY -m export --arch alexnet --random-init --int8 --name alexnet || echo "alexnet export failed"

part() {  # part NAME LIMIT_S COMMAND...: one measurement, bounded, its exit status kept
  local name=$1 limit=$2; shift 2
  echo "== $(date -u +%T) $name (limit $limit s): $*"
  timeout --kill-after=20 "$limit" "$@"
  local rc=$?
  echo "== $(date -u +%T) $name exited $rc" | tee -a "$OUT/parts.txt"
}

# 3. the engine-process layouts first: the issue's question, and the part most likely to be cut short.
# A session's device time is ~15 min in all, a call at most 10: the served layouts and the data path
# fit in one call; `make bench` (python -m bench, ~15 min on 2 cores) only with PARTS naming it.
layouts=$(echo "$WORKERS" | tr ',' '\n' | sed 's/.*/process:&,local:&/' | paste -sd, -)
for p in ${PARTS:-ipc datapath}; do
  case $p in
    ipc) part ipc "${IPC_S:-380}" $PY -m bench.ipc --home "$BENTOML_HOME" --skip-handoff \
           --models lenet5,alexnet --layouts "$layouts" --connections "${CONNECTIONS:-256}" \
           --max-concurrency "${CONNECTIONS:-256}" \
           --seconds "$SECS" --rounds "$ROUNDS" --score-map "$SIDE" --out "$OUT/ipc" ;;
    datapath) part datapath "${DATAPATH_S:-120}" $PY -m bench.datapath --provider "$PROVIDER" \
           --rounds "${DATAPATH_ROUNDS:-5}" --out "$OUT/datapath" ;;
    bench) part bench "${BENCH_S:-900}" $PY -m bench --seconds "$SECS" --rounds "$ROUNDS" --out "$OUT/bench" ;;
  esac
done
echo "== $(date -u +%T) done"
