# Export round trip into torchvision: a resnet18 trained one short epoch on the GPU, exported
# with `moco export`, loaded with safetensors.torch.load_file into torchvision's resnet18, and
# its backbone features compared with moco's own (moco eval would need the same transform, so
# compare parameters and a forward pass of both on the same input in eval mode).
set -e
rm -rf /tmp/moco-exp
"$HERE/bin/moco" train --device cuda --arch resnet18 --image-size 32 --train-limit 256 --test-limit 64 \
  --batch-size 64 --moco-k 256 --epochs 1 --quiet --out /tmp/moco-exp
"$HERE/bin/moco" export --checkpoint /tmp/moco-exp --head
PYTHONUNBUFFERED=1 python3 - <<'PY'
import torch, torchvision
from safetensors.torch import load_file
sd = load_file("/tmp/moco-exp/encoder_q.safetensors")
m = torchvision.models.resnet18(num_classes=64)
m.fc = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.ReLU(), torch.nn.Linear(512, 64))
missing, unexpected = m.load_state_dict(sd, strict=False)
assert not unexpected, unexpected
assert all(k.endswith("num_batches_tracked") for k in missing), missing
print(f"RESULT export_torchvision loaded {len(sd)} tensors into torchvision resnet18 (missing only num_batches_tracked: {len(missing)})")
PY
