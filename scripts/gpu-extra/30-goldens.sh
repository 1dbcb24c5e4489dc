# PyTorch goldens (float64 CPU) for the ops and the ResNets; copied back via $OUT and committed.
for s in "$HERE"/goldens/make_*_goldens.py; do
  name="$(basename "$s" .py)"; name="${name#make_}"
  PYTHONUNBUFFERED=1 python3 "$s" "$OUT/${name}.json" && echo "RESULT golden $name written"
done
cp "$HERE"/goldens/*.txt "$OUT/" 2>/dev/null || true
