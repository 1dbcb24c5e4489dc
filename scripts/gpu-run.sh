#!/usr/bin/env bash
# Runner staged by scripts/gpu-check as .gpu/run.sh. Needs no Rust toolchain.
# Env: OUT (results folder, default ./gpu-out), MOCO_GPU_SKIP_TORCH=1, MOCO_GPU_SKIP_BENCH=1.
set -u
HERE="$(cd "$(dirname "$0")" && pwd)"
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
SUMMARY="$OUT/summary.md"
TESTLOG="$OUT/tests.log"
BENCHLOG="$OUT/benches.log"
EXTRALOG="$OUT/extra.log"
: >"$TESTLOG"; : >"$BENCHLOG"; : >"$EXTRALOG"

# libcuda: the installed driver's own. Never /usr/local/cuda/compat: a forward-compat
# libcuda that does not match the kernel driver fails with SYSTEM_DRIVER_MISMATCH.
DRIVER_DIR=""
for d in /usr/local/nvidia/lib64 /usr/lib/x86_64-linux-gnu /usr/lib64 /usr/lib/wsl/lib; do
  if [[ -e "$d/libcuda.so.1" ]]; then DRIVER_DIR="$d"; break; fi
done
# cuBLAS etc. from a Python install (site-packages/nvidia/*/lib).
PYLIBS="$(python3 - <<'PY' 2>/dev/null
import glob, site, sys
roots = site.getsitepackages() + [site.getusersitepackages()]
libs = []
for r in roots:
    libs += glob.glob(r + "/nvidia/*/lib")
print(":".join(sorted(set(libs))))
PY
)"
# Driver first, then the Python CUDA libraries; drop any inherited compat directory.
CLEAN="$(tr ':' '\n' <<<"${LD_LIBRARY_PATH:-}" | grep -v '/compat' | paste -sd: -)"
# NCCL ships as libnccl.so.2, a name cudarc 0.19's loader does not try: a private
# libnccl.so link to it goes first on the path (moco train --gpus makes the same link).
NCCL_LINK=""
for d in ${PYLIBS//:/ }; do
  if [[ -e "$d/libnccl.so.2" && ! -e "$d/libnccl.so" ]]; then
    mkdir -p "$HERE/nccl-link" && ln -sf "$d/libnccl.so.2" "$HERE/nccl-link/libnccl.so"
    NCCL_LINK="$HERE/nccl-link"; break
  fi
done
export LD_LIBRARY_PATH="${NCCL_LINK:+$NCCL_LINK:}${DRIVER_DIR:+$DRIVER_DIR:}${PYLIBS:+$PYLIBS:}$CLEAN"
ls -l "$HERE/nccl-link" >>"$EXTRALOG" 2>&1 || true
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH" >>"$EXTRALOG"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv >>"$EXTRALOG" 2>&1

{
  echo "# moco GPU check: $(date -u +%Y-%m-%dT%H:%MZ)"
  echo
  echo "GPU: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1)"
  echo
  "$HERE/bin/moco" info 2>&1 | sed 's/^/    /'
  echo
  echo "| test binary | passed | failed | ignored | status |"
  echo "|---|---|---|---|---|"
} >"$SUMMARY"

export MOCO_REQUIRE_KERNELS=1
export MOCO_BIN="$HERE/bin/moco"  # tests that run the CLI use the staged binary
for t in "$HERE"/tests/*; do
  name="$(basename "$t")"
  echo "===== $name" >>"$TESTLOG"
  timeout 300 "$t" --include-ignored --test-threads=1 >>"$TESTLOG" 2>&1
  rc=$?
  res="$(grep -E '^test result:' "$TESTLOG" | tail -1)"
  p="$(sed -nE 's/.* ([0-9]+) passed.*/\1/p' <<<"$res")"
  f="$(sed -nE 's/.* ([0-9]+) failed.*/\1/p' <<<"$res")"
  i="$(sed -nE 's/.* ([0-9]+) ignored.*/\1/p' <<<"$res")"
  status=ok; [[ $rc -ne 0 ]] && status="FAIL (rc $rc)"
  echo "| $name | ${p:-?} | ${f:-?} | ${i:-?} | $status |" >>"$SUMMARY"
done
grep -E '^test .* FAILED|^---- ' "$TESTLOG" | head -50 | sed 's/^/    /' >>"$SUMMARY"

if [[ "${MOCO_GPU_SKIP_BENCH:-0}" != 1 ]]; then
  echo >>"$SUMMARY"; echo "## Benches (quick criterion)" >>"$SUMMARY"; echo '```' >>"$SUMMARY"
  for b in "$HERE"/benches/*; do
    echo "===== $(basename "$b")" >>"$BENCHLOG"
    # Only the CUDA benches by default: CPU numbers are measured on the build machine.
    MOCO_BENCH_QUICK=1 timeout 300 "$b" --bench --noplot "${MOCO_GPU_BENCH_FILTER-cuda}" >>"$BENCHLOG" 2>&1
  done
  # Name line + time/thrpt lines, compact.
  grep -E '^[a-z_]+/|time:|thrpt:|skipped' "$BENCHLOG" | grep -v 'change' >>"$SUMMARY"
  echo '```' >>"$SUMMARY"
fi

# Extra steps staged beside the binaries (moco bench, a short training run, PyTorch
# side-by-sides): each .gpu/extra/*.sh is run in order with HERE and OUT exported.
if compgen -G "$HERE/extra/*.sh" >/dev/null; then
  export HERE OUT
  for s in "$HERE"/extra/*.sh; do
    echo "===== $(basename "$s")" >>"$EXTRALOG"
    timeout 300 bash "$s" >>"$EXTRALOG" 2>&1
    echo "rc=$?" >>"$EXTRALOG"
  done
  echo >>"$SUMMARY"; echo "## Extra (moco bench, training, PyTorch)" >>"$SUMMARY"; echo '```' >>"$SUMMARY"
  grep -E '^RESULT' "$EXTRALOG" >>"$SUMMARY"
  echo '```' >>"$SUMMARY"
fi
cat "$SUMMARY"
