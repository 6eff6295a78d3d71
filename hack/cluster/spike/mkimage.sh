#!/bin/bash
# mkimage.sh REF BINARY OUT.tar: a one-layer OCI image (layout tar) whose entrypoint is /BINARY's basename.
set -eu
ref=$1 bin=$2 out=$3
w=$(mktemp -d); mkdir -p $w/root $w/oci/blobs/sha256
name=$(basename $bin .bin)
cp $bin $w/root/$name
tar -C $w/root --owner=0 --group=0 --mtime=@0 -cf $w/layer.tar $name
ld=$(sha256sum $w/layer.tar | cut -d' ' -f1); ls=$(stat -c %s $w/layer.tar)
cp $w/layer.tar $w/oci/blobs/sha256/$ld
printf '{"architecture":"amd64","os":"linux","config":{"Entrypoint":["/%s"]},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]}}' $name $ld > $w/config.json
cd_=$(sha256sum $w/config.json | cut -d' ' -f1); cs=$(stat -c %s $w/config.json); cp $w/config.json $w/oci/blobs/sha256/$cd_
printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%d},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:%s","size":%d}]}' $cd_ $cs $ld $ls > $w/manifest.json
md=$(sha256sum $w/manifest.json | cut -d' ' -f1); ms=$(stat -c %s $w/manifest.json); cp $w/manifest.json $w/oci/blobs/sha256/$md
printf '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%d,"annotations":{"io.containerd.image.name":"%s","org.opencontainers.image.ref.name":"%s"}}]}' $md $ms $ref ${ref##*:} > $w/oci/index.json
echo '{"imageLayoutVersion":"1.0.0"}' > $w/oci/oci-layout
tar -C $w/oci -cf $out oci-layout index.json blobs
rm -rf $w
