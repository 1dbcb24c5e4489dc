# PyTorch MoCo step with the same model and batch (side by side with moco bench).
PYTHONUNBUFFERED=1 python3 "$HERE/bench/torch_moco_step.py"
