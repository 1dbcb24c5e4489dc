# PyTorch side-by-side: eager InfoNCE, momentum loop / _foreach_lerp_, copy bandwidth.
PYTHONUNBUFFERED=1 python3 "$HERE/bench/torch_ops.py"
