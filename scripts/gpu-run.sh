#!/usr/bin/env bash
# Runner staged by scripts/gpu-check as .gpu/run.sh. Needs no Rust toolchain.
#
#   bash .gpu/run.sh              # on the GPU machine
#   OUT=DIR bash .gpu/run.sh --dry-run   # anywhere: every step reports "no GPU" at once
#   bash scripts/gpu-run.sh --parse-log LOG RC   # one test binary's counts (for tests)
#
# Steps, in order, each under its own timeout, all under one budget (MOCO_GPU_BUDGET_S,
# default 480 s): once it is spent no new step starts and the summary lists the skipped
# ones. 1. the GPU tests (each staged test binary with --ignored: CI runs the rest),
# 2. moco bench fp32 / --tf32 x im2col / cudnn next to bench/torch_moco_step.py on the same
# shapes, 3. the quick criterion benches (CUDA ones), 4. smoke runs (moco train on cuDNN,
# moco train --gpus 1, the examples, the extra scripts). Writes to $OUT (default ./gpu-out)
# at most 4 files: summary.md, results.json (every number), logs.tar.gz (every log, the
# goldens the extra scripts regenerate), and nothing else.
# Env: OUT, MOCO_GPU_BUDGET_S, MOCO_GPU_STEP_S (default per-step cap 300),
# MOCO_GPU_SKIP_TORCH=1, MOCO_GPU_SKIP_BENCH=1.
set -u

# ---- one test binary's log -> "passed failed ignored status" ----
parse_log() { # LOG RC
  local log="$1" rc="$2" res p f i st
  res="$(grep -E '^test result:' "$log" 2>/dev/null | tail -1)"
  p="$(sed -nE 's/.* ([0-9]+) passed.*/\1/p' <<<"$res")"
  f="$(sed -nE 's/.* ([0-9]+) failed.*/\1/p' <<<"$res")"
  i="$(sed -nE 's/.* ([0-9]+) ignored.*/\1/p' <<<"$res")"
  if grep -q '^no GPU' "$log" 2>/dev/null; then st="no GPU"
  elif [[ "$rc" == 124 || "$rc" == 137 ]]; then st="TIMEOUT"
  elif [[ -z "$res" ]]; then st="CRASHED (rc $rc)"
  elif [[ "$rc" != 0 || "${f:-0}" != 0 ]]; then st="FAIL (rc $rc)"
  else st="ok"; fi
  [[ -z "$res" ]] && { p="-"; f="-"; i="-"; }
  echo "${p:--} ${f:--} ${i:--} $st"
}
if [[ "${1:-}" == --parse-log ]]; then parse_log "$2" "$3"; exit 0; fi

DRY=0; [[ "${1:-}" == --dry-run ]] && DRY=1
HERE="$(cd "$(dirname "$0")" && pwd)"
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
BUDGET="${MOCO_GPU_BUDGET_S:-480}"
STEP_CAP="${MOCO_GPU_STEP_S:-300}"
WORK="$(mktemp -d)"
LOGS="$WORK/logs"; mkdir -p "$LOGS" "$WORK/golden-out"
SUMMARY="$OUT/summary.md"
JSON="$OUT/results.json"
T0=$SECONDS
SKIPPED=()
ROWS_TESTS=(); ROWS_BENCH=(); ROWS_SMOKE=(); JSON_ITEMS=()

# Binaries that gpu-check packed to fit the size limit: unpacked once, beside this script.
if [[ -f "$HERE/packed.tar.xz" && ! -d "$HERE/bin" ]]; then tar -C "$HERE" -xJf "$HERE/packed.tar.xz"; fi
# Staged (.gpu/tests/*) test binaries; from the source tree (scripts/), the tests/*.rs names.
if [[ -d "$HERE/tests" ]]; then
  TESTS=("$HERE"/tests/*)
else
  TESTS=(); for t in "$HERE"/../tests/*.rs; do TESTS+=("$HERE/tests/$(basename "$t" .rs)"); done
fi

# libcuda: the installed driver's own. Never /usr/local/cuda/compat: a forward-compat
# libcuda that does not match the kernel driver fails with SYSTEM_DRIVER_MISMATCH.
DRIVER_DIR=""
for d in /usr/local/nvidia/lib64 /usr/lib/x86_64-linux-gnu /usr/lib64 /usr/lib/wsl/lib; do
  if [[ -e "$d/libcuda.so.1" ]]; then DRIVER_DIR="$d"; break; fi
done
# cuBLAS, cuDNN, NCCL from a Python install (site-packages/nvidia/*/lib).
PYLIBS="$(python3 - <<'PY' 2>/dev/null
import glob, site
roots = site.getsitepackages() + [site.getusersitepackages()]
libs = []
for r in roots:
    libs += glob.glob(r + "/nvidia/*/lib")
print(":".join(sorted(set(libs))))
PY
)"
CLEAN="$(tr ':' '\n' <<<"${LD_LIBRARY_PATH:-}" | grep -v '/compat' | paste -sd: -)"
# NCCL ships as libnccl.so.2, a name cudarc 0.19's loader does not try: a private
# libnccl.so link to it goes first on the path (moco train --gpus makes the same link).
NCCL_LINK=""
for d in ${PYLIBS//:/ }; do
  if [[ -e "$d/libnccl.so.2" && ! -e "$d/libnccl.so" ]]; then
    mkdir -p "$WORK/nccl-link" && ln -sf "$d/libnccl.so.2" "$WORK/nccl-link/libnccl.so"
    NCCL_LINK="$WORK/nccl-link"; break
  fi
done
export LD_LIBRARY_PATH="${NCCL_LINK:+$NCCL_LINK:}${DRIVER_DIR:+$DRIVER_DIR:}${PYLIBS:+$PYLIBS:}$CLEAN"
export MOCO_REQUIRE_KERNELS=1
export MOCO_BIN="$HERE/bin/moco"        # tests that run the CLI use the staged binary
export CUDA_MODULE_LOADING=EAGER        # no lazy module load next to a spinning NCCL kernel
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
export HERE OUT
GOLDEN_OUT="$WORK/golden-out"; export GOLDEN_OUT

GPU=""
if [[ $DRY == 0 ]] && command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
  GPU="$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | head -1)"
fi

json_str() { local s="${1//\\/\\\\}"; s="${s//\"/\\\"}"; printf '"%s"' "$s"; }

# step NAME TIMEOUT CMD... : runs CMD into $LOGS/NAME.log unless the budget is spent;
# sets RC (or 'skipped') and SECS.
step() {
  local name="$1" cap="$2"; shift 2
  local log="$LOGS/$name.log" left=$((BUDGET - (SECONDS - T0)))
  RC=""; SECS=0
  if ((left <= 0)); then SKIPPED+=("$name"); RC=skipped; return; fi
  ((cap > STEP_CAP)) && cap=$STEP_CAP
  ((cap > left)) && cap=$left
  local t=$SECONDS
  if [[ -z "$GPU" ]]; then
    echo "no GPU: $*" >"$log"; RC=0
  else
    echo "\$ $*" >"$log"
    timeout -k 10 "$cap" "$@" >>"$log" 2>&1
    RC=$?
  fi
  SECS=$((SECONDS - t))
}

# ---- versions ----
# GPU and driver (nvidia-smi), moco's view (kernels, cuDNN version, NCCL version), the pip
# CUDA libraries' versions (cuBLAS, cuDNN, NCCL wheels), PyTorch's CUDA and cuDNN.
step versions 60 bash -c 'nvidia-smi; "$MOCO_BIN" info; python3 -m pip list 2>/dev/null | grep -iE "^(nvidia-|torch)"; python3 -c "import torch; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"cudnn\", torch.backends.cudnn.version())"'

# ---- 1. GPU tests ----
for t in "${TESTS[@]}"; do
  name="$(basename "$t")"
  step "test-$name" 300 "$t" --ignored --test-threads=1
  if [[ "$RC" == skipped ]]; then ROWS_TESTS+=("| $name | - | - | - | skipped | - |"); continue; fi
  read -r p f i st <<<"$(parse_log "$LOGS/test-$name.log" "$RC")"
  ROWS_TESTS+=("| $name | $p | $f | $i | $st | $SECS |")
  JSON_ITEMS+=("{\"kind\":\"test\",\"name\":$(json_str "$name"),\"passed\":$(json_str "$p"),\"failed\":$(json_str "$f"),\"ignored\":$(json_str "$i"),\"status\":$(json_str "$st"),\"seconds\":$SECS}")
done

# ---- 2. moco bench next to PyTorch on the same shapes ----
# A step's status from its exit code: ok, skipped (budget), no GPU (dry run), FAIL (rc N).
step_status() {
  local rc="$1" st=ok
  [[ "$rc" == skipped ]] && st=skipped
  [[ -z "$GPU" && "$rc" != skipped ]] && st="no GPU"
  [[ "$rc" != 0 && "$rc" != skipped ]] && st="FAIL (rc $rc)"
  echo "$st"
}
num() { grep -oE "\"$2\":[0-9.]+" "$1" 2>/dev/null | tail -1 | cut -d: -f2; }
if [[ "${MOCO_GPU_SKIP_BENCH:-0}" != 1 ]]; then
  for shape in resnet8:256 resnet20:256 resnet18-cifar:256 resnet18-cifar:512; do
    arch="${shape%%:*}"; b="${shape##*:}"
    for mode in fp32 tf32; do
      tf=(); [[ $mode == tf32 ]] && tf=(--tf32)
      tv=foreach; [[ $mode == tf32 ]] && tv=tf32
      torch_ips=""
      if [[ "${MOCO_GPU_SKIP_TORCH:-0}" != 1 ]]; then
        step "torch-$arch-b$b-$mode" 120 env PYTHONUNBUFFERED=1 python3 "$HERE/bench/torch_moco_step.py" --arch "$arch" --batch "$b" --variant "$tv"
        torch_ips="$(grep -oE '^RESULT .* ([0-9]+) images/s' "$LOGS/torch-$arch-b$b-$mode.log" 2>/dev/null | grep -oE '[0-9]+ images/s' | cut -d' ' -f1)"
        JSON_ITEMS+=("{\"kind\":\"torch\",\"arch\":\"$arch\",\"batch\":$b,\"mode\":\"$mode\",\"status\":$(json_str "$RC"),\"images_per_sec\":${torch_ips:-null}}")
      fi
      for conv in im2col cudnn; do
        n="bench-$arch-b$b-$mode-$conv"
        step "$n" 120 "$HERE/bin/moco" bench --device cuda --conv "$conv" "${tf[@]}" --arch "$arch" --batch-size "$b" --steps 20 --warmup 3 --workers 8
        rc="$RC"; ips="$(num "$LOGS/$n.log" images_per_sec)"; ms="$(num "$LOGS/$n.log" ms_per_step)"
        ratio="-"
        if [[ -n "$ips" && -n "$torch_ips" ]]; then ratio="$(awk -v a="$ips" -v b="$torch_ips" 'BEGIN{printf "%.2f", a/b}')"; fi
        st="$(step_status "$rc")"
        ROWS_BENCH+=("| $arch | $b | $mode | $conv | ${ms:--} | ${ips:--} | ${torch_ips:--} | $ratio | $st |")
        JSON_ITEMS+=("{\"kind\":\"moco_bench\",\"arch\":\"$arch\",\"batch\":$b,\"mode\":\"$mode\",\"conv\":\"$conv\",\"status\":$(json_str "$st"),\"ms_per_step\":${ms:-null},\"images_per_sec\":${ips:-null},\"torch_images_per_sec\":${torch_ips:-null}}")
      done
    done
    # PyTorch's mixed-precision step (bf16 autocast, channels_last): the reference the
    # bf16 path will be measured against; moco has no bf16 step yet, so a torch-only row.
    if [[ "${MOCO_GPU_SKIP_TORCH:-0}" != 1 ]]; then
      step "torch-$arch-b$b-amp" 120 env PYTHONUNBUFFERED=1 python3 "$HERE/bench/torch_moco_step.py" --arch "$arch" --batch "$b" --variant amp
      amp_ips="$(grep -oE '^RESULT .* ([0-9]+) images/s' "$LOGS/torch-$arch-b$b-amp.log" 2>/dev/null | grep -oE '[0-9]+ images/s' | cut -d' ' -f1)"
      st="$(step_status "$RC")"
      ROWS_BENCH+=("| $arch | $b | amp-bf16 | (torch only) | - | - | ${amp_ips:--} | - | $st |")
      JSON_ITEMS+=("{\"kind\":\"torch\",\"arch\":\"$arch\",\"batch\":$b,\"mode\":\"amp-bf16\",\"status\":$(json_str "$st"),\"images_per_sec\":${amp_ips:-null}}")
    fi
  done
fi

smoke() { # NAME TIMEOUT CMD...
  local name="$1"; step "$@"
  local st; st="$(step_status "$RC")"
  ROWS_SMOKE+=("| $name | $st | $SECS |")
  JSON_ITEMS+=("{\"kind\":\"smoke\",\"name\":$(json_str "$name"),\"status\":$(json_str "$st"),\"seconds\":$SECS}")
}

# ---- 3. quick criterion benches (CUDA ones) ----
if [[ "${MOCO_GPU_SKIP_BENCH:-0}" != 1 ]]; then
  for bb in "$HERE"/benches/*; do
    [[ -e "$bb" ]] || continue
    name="$(basename "$bb")"
    smoke "criterion-$name" 120 env MOCO_BENCH_QUICK=1 "$bb" --bench --noplot "${MOCO_GPU_BENCH_FILTER-cuda}"
  done
fi

# ---- 4. smoke runs ----
smoke train-cuda-cudnn 120 "$HERE/bin/moco" train --device cuda --conv cudnn --epochs 2 --workers 8 --quiet --out "$WORK/train-cudnn"
smoke train-gpus-1 120 "$HERE/bin/moco" train --gpus 1 --epochs 1 --workers 8 --quiet --out "$WORK/train-gpus1"
# Their per-epoch metrics (loss, kNN accuracy) go into the archive; the checkpoints do not.
for r in train-cudnn train-gpus1; do
  cp "$WORK/$r/metrics.jsonl" "$LOGS/$r-metrics.jsonl" 2>/dev/null || true
done
for ex in embed_ops cudarc_encoder byo_encoder; do
  smoke "example-$ex" 60 "$HERE/bin/$ex"
done
# Extra scripts staged beside the binaries (PyTorch op timings, goldens into $GOLDEN_OUT,
# torchvision export), each one step.
for s in "$HERE"/extra/*.sh "$HERE"/gpu-extra/*.sh; do
  [[ -e "$s" ]] || continue
  # (moco bench, training, the torch step and the examples are steps above)
  case "$(basename "$s")" in 10-embed-example.sh | 40-moco-bench.sh | 50-train-cuda.sh | 60-torch-moco-step.sh) continue ;; esac
  smoke "extra-$(basename "$s" .sh)" 120 env OUT="$GOLDEN_OUT" bash "$s"
done

# ---- summary, JSON, archive ----
{
  echo "# moco GPU check: $(date -u +%Y-%m-%dT%H:%MZ)$([[ $DRY == 1 ]] && echo ' (dry run)')"
  echo
  echo "GPU: ${GPU:-none (no GPU)}; wall $((SECONDS - T0)) s of a $BUDGET s budget"
  echo
  grep -E '^(moco|kernels|cudnn|nccl|gpu[0-9]|cuda_driver|nvidia-(cublas|cudnn|nccl)|torch)' "$LOGS/versions.log" 2>/dev/null | sed 's/^/    /'
  echo
  echo "## Tests (each binary's own counts; CRASHED: no 'test result' line)"
  echo
  echo "| test binary | passed | failed | ignored | status | s |"
  echo "|---|---|---|---|---|---|"
  printf '%s\n' "${ROWS_TESTS[@]}"
  echo
  for l in "$LOGS"/test-*.log; do
    grep -E '^test .* FAILED|^---- |panicked at' "$l" 2>/dev/null | head -20 | sed "s|^|    $(basename "$l" .log): |"
  done
  echo
  echo "## moco bench vs PyTorch (images/s; ratio = moco / torch)"
  echo
  echo "| arch | batch | math | conv | moco ms/step | moco img/s | torch img/s | ratio | status |"
  echo "|---|---|---|---|---|---|---|---|---|"
  printf '%s\n' "${ROWS_BENCH[@]}"
  echo
  echo "## Smoke runs and benches"
  echo
  echo "| step | status | s |"
  echo "|---|---|---|"
  printf '%s\n' "${ROWS_SMOKE[@]}"
  echo
  if ((${#SKIPPED[@]})); then
    echo "## Skipped (budget of $BUDGET s spent)"
    echo
    printf -- '- %s\n' "${SKIPPED[@]}"
  else
    echo "Nothing skipped."
  fi
} >"$SUMMARY"
{
  echo "{\"dry_run\":$([[ $DRY == 1 ]] && echo true || echo false),\"gpu\":$(json_str "$GPU"),\"budget_s\":$BUDGET,\"wall_s\":$((SECONDS - T0)),"
  sep=""; printf '"skipped":['
  for s in "${SKIPPED[@]}"; do printf '%s%s' "$sep" "$(json_str "$s")"; sep=","; done
  printf '],\n"results":[\n'
  sep=""; for j in "${JSON_ITEMS[@]}"; do printf '%s%s\n' "$sep" "$j"; sep=","; done
  printf ']}\n'
} >"$JSON"
tar -C "$WORK" -czf "$OUT/logs.tar.gz" logs golden-out
rm -rf "$WORK"
cat "$SUMMARY"
