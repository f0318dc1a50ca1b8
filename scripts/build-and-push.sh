#!/usr/bin/env bash
# Build the GPU worker image or the query API image with your own Docker (no GPU needed) and push it
# to ECR, for deploying with `sam deploy --parameter-overrides ImageUri=<URI>` (worker) or
# `QueryImageUri=<URI>` (query) instead of the in-account CodeBuild build. It runs the script that
# build runs (scripts/push-image.sh), so the same content gets the same (immutable) tag, and an image
# already pushed is not rebuilt.
#
#   scripts/build-and-push.sh worker|query [REPOSITORY_URI]
#
# REPOSITORY_URI defaults to the stack's WorkerRepositoryUri or QueryRepositoryUri output (stack from
# samconfig.toml; override with STACK_NAME). CLIP_MODEL and CLIP_PRETRAINED choose the weights baked
# in; keep them equal to the stack's ClipModel and ClipPretrained parameters.
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
  worker) dockerfile=batch_job/Dockerfile; output=WorkerRepositoryUri ;;
  query) dockerfile=functions/query/Dockerfile; output=QueryRepositoryUri ;;
  *) echo "usage: $0 worker|query [REPOSITORY_URI]" >&2; exit 2 ;;
esac
model="${CLIP_MODEL:-ViT-B-32}"
pretrained="${CLIP_PRETRAINED:-openai}"
stack="${STACK_NAME:-clip-pipeline}"
repository="${2:-$(aws cloudformation describe-stacks --stack-name "$stack" \
  --query "Stacks[0].Outputs[?OutputKey=='$output'].OutputValue" --output text)}"

CLIP_MODEL="$model" CLIP_PRETRAINED="$pretrained" bash scripts/push-image.sh "$dockerfile" "$repository"
