#!/usr/bin/env bash
# Fetch the ONNX Runtime C/C++ headers without installing anything system-wide.
#
# The onnxruntime PyPI wheel ships no headers, so we take them from Debian trixie's
# libonnxruntime-dev package (ORT 1.21, ORT_API_VERSION 21): `apt-get download`
# with a private sources list and a private lists directory, then `dpkg -x`.
#
# usage: fetch_ort_headers.sh CACHE_DIR
# On success CACHE_DIR/include/onnxruntime/onnxruntime_c_api.h exists. Reuses the
# cache when present.
set -euo pipefail

cache_dir=${1:?usage: fetch_ort_headers.sh CACHE_DIR}
if [[ -f "$cache_dir/include/onnxruntime/onnxruntime_c_api.h" ]]; then
  exit 0
fi
for tool in apt-get dpkg; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "fetch_ort_headers: '$tool' not found; pass -DORT_INCLUDE_DIR=<onnxruntime include dir> instead" >&2
    exit 1
  fi
done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/archives/partial" "$work/deb"
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
echo "deb [signed-by=$keyring] http://deb.debian.org/debian trixie main" >"$work/sources.list"

apt_opts=(
  -o "Dir::Etc::SourceList=$work/sources.list"
  -o "Dir::Etc::SourceParts=/dev/null"
  -o "Dir::State::Lists=$work/lists"
  -o "Dir::Cache::Archives=$work/archives"
  -o "Dir::Cache::pkgcache="
  -o "Dir::Cache::srcpkgcache="
  -o "Debug::NoLocking=1"
  -o "APT::Sandbox::User=$(id -un)"
)
echo "fetch_ort_headers: downloading libonnxruntime-dev from Debian trixie" >&2
apt-get "${apt_opts[@]}" -qq update
(cd "$work/deb" && apt-get "${apt_opts[@]}" -qq download libonnxruntime-dev)
deb=$(ls "$work"/deb/libonnxruntime-dev_*.deb)
dpkg -x "$deb" "$work/x"

mkdir -p "$cache_dir/include"
rm -rf "$cache_dir/include/onnxruntime"
cp -r "$work/x/usr/include/onnxruntime" "$cache_dir/include/onnxruntime"
basename "$deb" >"$cache_dir/SOURCE"
echo "fetch_ort_headers: headers in $cache_dir/include/onnxruntime" >&2
