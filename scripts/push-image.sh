#!/usr/bin/env bash
# Builds one image and pushes it to ECR, unless an image of the same content is there already.
# Run in the build context (the repository root, or the image-source layer CodeBuild unpacks):
#
#   bash scripts/push-image.sh DOCKERFILE REPOSITORY_URI [REQUEST_TAG]
#
# The stack's CodeBuild project (template.yaml, ImageBuild) and scripts/build-and-push.sh both run it,
# so an image built by hand and one built by the deploy get the same tag. CLIP_MODEL and
# CLIP_PRETRAINED choose the weights baked in. REQUEST_TAG, from the deploy helper, is added to the
# image so that the helper finds it by the request's properties (a rollback does, without a build).
# Prints the image's URI.
set -euo pipefail

dockerfile="$1"
repository="$2"
request_tag="${3:-}"
model="${CLIP_MODEL:-ViT-B-32}"
pretrained="${CLIP_PRETRAINED:-openai}"
name="${repository#*/}"

# The base image by digest: the Dockerfile names a tag (or a tag@digest to pin it), resolved here to
# the digest it names today, which the image is built FROM and its tag covers. A base image updated
# under the same tag is a new image with a new tag, never different content under an old one.
base="$(python3 scripts/image_tag.py base "$dockerfile")"
docker pull --quiet --platform linux/amd64 "$base" > /dev/null
base_digest="$(docker image inspect --format '{{index .RepoDigests 0}}' "$base")"

tag="$(python3 scripts/image_tag.py tag "$dockerfile" BASE_IMAGE="$base_digest" CLIP_MODEL="$model" CLIP_PRETRAINED="$pretrained")"
image="$repository:$tag"

if aws ecr describe-images --repository-name "$name" --image-ids imageTag="$tag" > /dev/null 2>&1; then
  echo "$image is already in the repository" >&2
else
  aws ecr get-login-password | docker login --username AWS --password-stdin "${repository%%/*}"
  docker build --platform linux/amd64 -f "$dockerfile" -t "$image" --label "base-image=$base_digest" \
    --build-arg BASE_IMAGE="$base_digest" --build-arg CLIP_MODEL="$model" --build-arg CLIP_PRETRAINED="$pretrained" .
  docker push "$image"
fi

if [ -n "$request_tag" ] && ! aws ecr describe-images --repository-name "$name" --image-ids imageTag="$request_tag" > /dev/null 2>&1; then
  # A second tag on the same manifest, as ECR documents retagging: no pull, no push of layers.
  manifest="$(aws ecr batch-get-image --repository-name "$name" --image-ids imageTag="$tag" --query 'images[0].imageManifest' --output text)"
  media_type="$(aws ecr batch-get-image --repository-name "$name" --image-ids imageTag="$tag" --query 'images[0].imageManifestMediaType' --output text)"
  aws ecr put-image --repository-name "$name" --image-tag "$request_tag" --image-manifest "$manifest" \
    --image-manifest-media-type "$media_type" > /dev/null
fi
echo "$image"
