# End-to-end training-step throughput (moco bench), resnet18-cifar at batch 256 and 512, with
# both InfoNCE implementations on im2col convolutions, and the fused one on cuDNN's; resnet8
# and resnet20 at batch 256 (the launch-bound models).
for b in 256 512; do
  for imp in fused unfused; do
    line="$("$HERE/bin/moco" bench --device cuda --arch resnet18-cifar --batch-size $b --steps 20 --warmup 3 --workers 8 --infonce $imp)" \
      && echo "RESULT moco_bench $line"
  done
  line="$("$HERE/bin/moco" bench --device cuda --conv cudnn --arch resnet18-cifar --batch-size $b --steps 20 --warmup 3 --workers 8)" \
    && echo "RESULT moco_bench $line"
done
for arch in resnet8 resnet20; do
  for conv in im2col cudnn; do
    line="$("$HERE/bin/moco" bench --device cuda --conv $conv --arch $arch --batch-size 256 --steps 20 --warmup 3 --workers 8)" \
      && echo "RESULT moco_bench $line"
  done
done
