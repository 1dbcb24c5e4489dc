# PyTorch goldens (float64 CPU) for the ops; copied back via $OUT and committed.
for s in "$HERE"/goldens/make_*_goldens.py; do
  name="$(basename "$s" .py)"; name="${name#make_}"
  python3 "$s" "$OUT/${name}.json" && echo "RESULT golden $name written"
done
