# End-to-end training-step throughput (moco bench), resnet18-cifar at batch 256 and 512.
for b in 256 512; do
  for imp in fused unfused; do
    line="$("$HERE/bin/moco" bench --device cuda --arch resnet18-cifar --batch-size $b --steps 20 --warmup 3 --workers 8 --infonce $imp)" \
      && echo "RESULT moco_bench $line"
  done
done
