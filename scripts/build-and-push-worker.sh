#!/usr/bin/env bash
# Build the GPU worker image with your own Docker (no GPU needed) and push it to ECR, for deploying
# with `sam deploy --parameter-overrides ImageUri=<the printed URI>` instead of the in-account
# CodeBuild build. The tag is computed exactly as that build computes it, so the same source and
# weights get the same (immutable) tag, and an image already pushed is not rebuilt.
#
#   scripts/build-and-push-worker.sh [REPOSITORY_URI]
#
# REPOSITORY_URI defaults to the WorkerRepositoryUri output of the stack in samconfig.toml
# (override with STACK_NAME). CLIP_MODEL and CLIP_PRETRAINED choose the weights baked in; keep them
# equal to the stack's ClipModel and ClipPretrained parameters.
set -euo pipefail
cd "$(dirname "$0")/.."

model="${CLIP_MODEL:-ViT-B-32}"
pretrained="${CLIP_PRETRAINED:-openai}"
stack="${STACK_NAME:-clip-pipeline}"
repository="${1:-$(aws cloudformation describe-stacks --stack-name "$stack" \
  --query "Stacks[0].Outputs[?OutputKey=='WorkerRepositoryUri'].OutputValue" --output text)}"

# scripts/worker-image-source links exactly the files batch_job/Dockerfile copies.
tag=$( (cd scripts/worker-image-source && find -L . -type f -not -path '*/__pycache__/*' -print0 | sort -z \
  | xargs -0 sha256sum; echo "$model $pretrained") | sha256sum | cut -c1-16)
image="$repository:$tag"

if aws ecr describe-images --repository-name "${repository#*/}" --image-ids imageTag="$tag" > /dev/null 2>&1; then
  echo "$image is already in the repository" >&2
else
  aws ecr get-login-password | docker login --username AWS --password-stdin "${repository%%/*}"
  docker build --platform linux/amd64 -f batch_job/Dockerfile -t "$image" \
    --build-arg CLIP_MODEL="$model" --build-arg CLIP_PRETRAINED="$pretrained" .
  docker push "$image"
fi
echo "$image"
