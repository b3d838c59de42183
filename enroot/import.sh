#!/usr/bin/env bash
# Turn the image into an enroot squashfs on shared storage, which pyxis then starts on every node with
# `srun --container-image=/fsx/enroot/NAME.sqsh` (see train.sbatch).
#
#   enroot/import.sh [--force] [-o FILE.sqsh] SOURCE
#
# SOURCE is one of
#   podman://IMAGE[:TAG]                        local podman storage
#   dockerd://IMAGE[:TAG]                       the local Docker daemon (after ./build.sh)
#   ARCHIVE.tar                                 a file made by `docker save` or `podman save` (docker-archive or OCI)
#   docker://[USER@][REGISTRY#]IMAGE[:TAG]      a registry, in enroot's own syntax (needs enroot)
#   REGISTRY/IMAGE[:TAG]                        a registry, Docker syntax (rewritten to REGISTRY#IMAGE, which enroot
#                                               3.x needs: HyperPod installs enroot 3.4)
# Local images and archives are converted here, without enroot, into enroot's image format
# (llama3_hyperpod/image/sqsh.py; needs python3, tar and mksquashfs): enroot's own podman:// import runs
# `docker rm` in its exit trap whatever the engine and fails, leaving its container, where a `docker` CLI has no
# daemon, and no enroot scheme reads an archive. Registries go through `enroot import`.
# For an ECR registry (ACCOUNT.dkr.ecr.REGION.amazonaws.com) the credentials entry enroot needs is added to
# $ENROOT_CONFIG_PATH/.credentials (netrc format; enroot evaluates the password at each import, so the 12-hour ECR
# token is always fresh): machine HOST login AWS password $(aws ecr get-login-password --region REGION)
#
# -o FILE    the .sqsh to write (default: $FSX/enroot/NAME-TAG.sqsh with FSX=/fsx); made under a temporary name
#            and moved into place, so jobs never see half a file, and a failed import leaves nothing.
# --force    replace FILE when it exists (refused otherwise).
# DRY_RUN=1  print what would be done, change nothing.
# enroot settings used (the environment wins over /etc/enroot/enroot.conf, as in enroot): ENROOT_SQUASH_OPTIONS,
# ENROOT_TEMP_PATH (where a local image is unpacked), ENROOT_CONFIG_PATH (credentials).
set -euo pipefail

die() {
  echo "error: $*" >&2
  exit 2
}

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
}

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ENROOT_CONF=${L3HP_ENROOT_CONF:-/etc/enroot/enroot.conf}

# An enroot setting resolved the way enroot resolves it (NVIDIA/enroot v4.1.2 enroot.in:27-58): a value in the
# environment wins; else the first definition in enroot.conf, then in enroot.conf.d/*.conf, evaluated by the shell
# (`$(id -u)`, `${HOME}`); else enroot's default.
enroot_setting() {
  local name=$1 default=$2 file key value
  if [[ -n ${!name:-} ]]; then
    printf '%s' "${!name}"
    return
  fi
  for file in "$ENROOT_CONF" "$ENROOT_CONF".d/*.conf; do
    [[ -r $file ]] || continue
    while IFS=$' \t=' read -r key value; do
      if [[ $key == "$name" ]]; then
        eval echo "$value" | tr -d '\n'
        return
      fi
    done < "$file"
  done
  printf '%s' "$default"
}

force=
out=
source_uri=
while (($# > 0)); do
  case $1 in
    -f | --force) force=1 ;;
    -o | --output)
      (($# >= 2)) || die "$1 needs a file name"
      out=$2
      shift
      ;;
    --output=*) out=${1#*=} ;;
    -h | --help)
      usage
      exit 0
      ;;
    -*) die "unknown option $1 (see --help)" ;;
    *)
      [[ -z $source_uri ]] || die "one SOURCE only (got $source_uri and $1)"
      source_uri=$1
      ;;
  esac
  shift
done
[[ -n $source_uri ]] || die "no SOURCE given: e.g. podman://localhost/llama3-hyperpod:neuron (see --help)"

# Normalize SOURCE to an enroot URI (or an archive path) and find the registry host, if any.
registry=
archive=
case $source_uri in
  dockerd://* | podman://*) uri=$source_uri ;;
  docker://*)
    uri=$source_uri
    rest=${source_uri#docker://}
    user=
    [[ $rest == *@* ]] && user=${rest%%@*}@ && rest=${rest#*@}
    first=${rest%%/*}
    if [[ $rest == *'#'* ]]; then
      registry=${rest%%#*}
    elif [[ $rest == */* && ($first == *.* || $first == *:* || $first == localhost) ]]; then
      registry=$first
      uri="docker://$user$registry#${rest#*/}"
    fi
    ;;
  *://*) die "unsupported SOURCE scheme in $source_uri: use podman://, dockerd://, docker:// or an archive file" ;;
  *.tar | *.tar.gz | *.tgz | ./* | /*)
    [[ -f $source_uri ]] || die "$source_uri: no such image archive (make one with \`podman save -o FILE IMAGE\`)"
    archive=$(cd "$(dirname "$source_uri")" && pwd)/$(basename "$source_uri")
    uri=$archive
    ;;
  */*)
    first=${source_uri%%/*}
    if [[ $first == *.* || $first == *:* || $first == localhost ]]; then
      registry=$first
      uri="docker://$registry#${source_uri#*/}"
    else
      uri="docker://$source_uri" # a Docker Hub name such as library/ubuntu:22.04
    fi
    ;;
  *) uri="docker://$source_uri" ;;
esac

# The image name and tag, for the default output name.
if [[ -n $archive ]]; then
  name=$(basename "$archive")
  name=${name%.gz}
  name=${name%.tgz}
  name=${name%.tar}
  tag=
else
  ref=${uri#*://}
  ref=${ref#*@}
  ref=${ref#*#}
  name=${ref##*/}
  tag=latest
  if [[ $name == *:* ]]; then
    tag=${name##*:}
    name=${name%:*}
  fi
fi
[[ -n $name ]] || die "cannot find an image name in $source_uri"

FSX=${FSX:-/fsx}
out=${out:-$FSX/enroot/$name${tag:+-$tag}.sqsh}
[[ $out == *.sqsh ]] || die "output $out must end in .sqsh"
[[ $out == /* ]] || out=$PWD/$out
if [[ -e $out && -z $force ]]; then
  die "$out exists: pass --force to replace it (running jobs keep the old file open and are not disturbed)"
fi
squash_options=$(enroot_setting ENROOT_SQUASH_OPTIONS "-comp lzo -noD")

# ---- local images and archives: converted here (no enroot, no container left behind) -------------------------
if [[ $uri != docker://* ]]; then
  sqsh_py=$here/../llama3_hyperpod/image/sqsh.py
  temp_path=$(enroot_setting ENROOT_TEMP_PATH "${TMPDIR:-/tmp}")
  cmd=(python3 "$sqsh_py" --squash-options "$squash_options" --tmpdir "$temp_path" "$uri" "$out")
  [[ -n $force ]] && cmd+=(--force)
  if [[ -n ${DRY_RUN:-} ]]; then
    printf '%q ' "${cmd[@]}"
    echo
    exit 0
  fi
  [[ -f $sqsh_py ]] || die "$sqsh_py is missing: run import.sh from the repository (or the image's /opt/app)"
  command -v python3 > /dev/null || die "python3 is needed to convert $uri (or import from a registry instead)"
  command -v mksquashfs > /dev/null || die "mksquashfs is not installed here (apt-get install squashfs-tools)"
  case $uri in
    dockerd://*) command -v docker > /dev/null || die "$uri needs the docker CLI and a running Docker daemon here" ;;
    podman://*) command -v podman > /dev/null || die "$uri needs podman on this node" ;;
  esac
  mkdir -p "$(dirname "$out")" "$temp_path"
  echo "importing $uri -> $out (enroot image format, written here; squashfs options: $squash_options)"
  exec "${cmd[@]}" # signals reach it directly: it removes its container and partial files on TERM/INT/HUP
fi

# ---- registries: enroot import --------------------------------------------------------------------------------
# ECR: make sure enroot can log in.
credentials_line=
if [[ $registry =~ ^[0-9]+\.dkr\.ecr\.([a-z0-9-]+)\.amazonaws\.com(\.cn)?$ ]]; then
  region=${BASH_REMATCH[1]}
  # shellcheck disable=SC2016  # the $(...) is for enroot to evaluate at import time, not for us
  credentials_line="machine $registry login AWS password \$(aws ecr get-login-password --region $region)"
fi
config_path=$(enroot_setting ENROOT_CONFIG_PATH "${XDG_CONFIG_HOME:-$HOME/.config}/enroot")
credentials=$config_path/.credentials

partial=${out%.sqsh}.partial-$$.sqsh
if [[ -n ${DRY_RUN:-} ]]; then
  if [[ -n $credentials_line ]] && ! grep -qs "^machine $registry " "$credentials"; then
    echo "would add to $credentials: $credentials_line"
  fi
  printf '%q ' enroot import --output "$partial" "$uri"
  echo
  printf '%q ' mv -f "$partial" "$out"
  echo
  exit 0
fi

command -v enroot > /dev/null || die "enroot is not installed on this node (HyperPod's lifecycle scripts install it;" \
  "elsewhere see https://github.com/NVIDIA/enroot)"
if [[ -n $credentials_line ]]; then
  command -v aws > /dev/null || die "$registry is an ECR registry: install the AWS CLI (enroot runs" \
    "\`aws ecr get-login-password\` to log in)"
  if ! grep -qs "^machine $registry " "$credentials"; then
    mkdir -p "$config_path"
    (umask 077 && echo "$credentials_line" >> "$credentials")
    echo "added ECR login for $registry to $credentials"
  fi
fi
mkdir -p "$(dirname "$out")"
trap 'rm -f "$partial"' EXIT
echo "importing $uri -> $out (enroot import)"
enroot import --output "$partial" "$uri" || die "enroot import $uri failed (see above); nothing was written"
mv -f "$partial" "$out"
trap - EXIT
echo "done: use IMAGE=$out with enroot/train.sbatch and enroot/compile.sbatch"
