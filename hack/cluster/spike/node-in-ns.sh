#!/bin/sh
# one node, inside its netns and a private mount ns
i=$1
S=/tmp/spike
T=$(cat $S/toolsdir)
export PATH=$T:$PATH
out=$S/out
mount --make-rprivate /
# ip netns exec remounted /sys for the netns: cgroup2 again on top
mount -t cgroup2 none /sys/fs/cgroup
mkdir -p /sys/fs/cgroup/node$i/system && echo $$ > /sys/fs/cgroup/node$i/system/cgroup.procs || echo "cannot move into node$i/system"
mount -t tmpfs -o mode=755 tmpfs /var
mkdir -p /run/containerd /etc/cni /etc/containerd
mount -t tmpfs tmpfs /run/containerd
mount -t tmpfs tmpfs /etc/cni
mount -t tmpfs tmpfs /etc/containerd
mkdir -p /var/lib/containerd /var/lib/kubelet /etc/cni/net.d
echo "0123456789abcdef0123456789abcde$i" > /etc/containerd/machine-id
touch /etc/machine-id 2>/dev/null; mount --bind /etc/containerd/machine-id /etc/machine-id
cat > /etc/containerd/config.toml <<EOC
version = 3
root = "/var/lib/containerd"
state = "/run/containerd"
[grpc]
  address = "/run/containerd/containerd.sock"
[plugins."io.containerd.cri.v1.images".pinned_images]
  sandbox = "registry.k8s.io/pause:3.10"
[plugins."io.containerd.cri.v1.runtime".cni]
  bin_dirs = ["$T/cni"]
  conf_dir = "/etc/cni/net.d"
[plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
    BinaryName = "$T/runc"
    SystemdCgroup = false
    NoPivotRoot = true
EOC
cat > /etc/cni/net.d/10-bridge.conflist <<EON
{"cniVersion": "1.0.0", "name": "pods", "plugins": [
  {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false,
   "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.244.$i.0/24"}]], "routes": [{"dst": "0.0.0.0/0"}]}}
]}
EON
containerd --config /etc/containerd/config.toml > $out/node$i-containerd.log 2>&1 &
for k in $(seq 600); do [ -S /run/containerd/containerd.sock ] && break; sleep 0.1; done
for img in pause web; do ctr -n k8s.io images import $S/img/$img.tar >/dev/null; done
echo "images imported"
sed -e "s#https://10.0.2.2:26443#https://10.0.2.2:26443#" -e "s#certificate-authority: .*#certificate-authority: $S/cp/certs/apiserver.crt#" $S/cp/kubeconfig.vm > /var/lib/kubelet/kubeconfig
cat > /var/lib/kubelet/config.yaml <<EOK
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
cgroupDriver: cgroupfs
cgroupRoot: /node$i
containerRuntimeEndpoint: unix:///run/containerd/containerd.sock
failSwapOn: false
localStorageCapacityIsolation: false
authentication:
  anonymous: {enabled: true}
  webhook: {enabled: false}
authorization: {mode: AlwaysAllow}
resolvConf: ""
EOK
cat > /var/lib/kubelet/kube-proxy.yaml <<EOP
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: nftables
clientConnection: {kubeconfig: /var/lib/kubelet/kubeconfig}
hostnameOverride: node$i
clusterCIDR: 10.244.0.0/16
conntrack: {maxPerCore: 0}
EOP
kubelet --config=/var/lib/kubelet/config.yaml --kubeconfig=/var/lib/kubelet/kubeconfig --hostname-override=node$i --node-ip=172.18.0.1$i -v=2 > $out/node$i-kubelet.log 2>&1 &
kube-proxy --config=/var/lib/kubelet/kube-proxy.yaml -v=2 > $out/node$i-kube-proxy.log 2>&1 &
wait
