# A short training run on the GPU (synthetic set, the demo preset): kNN per epoch.
rm -rf /tmp/moco-gpu-run
"$HERE/bin/moco" train --device cuda --epochs ${MOCO_GPU_EPOCHS:-6} --workers 8 --quiet --out /tmp/moco-gpu-run \
  && sed 's/^/RESULT train_cuda /' /tmp/moco-gpu-run/metrics.jsonl
