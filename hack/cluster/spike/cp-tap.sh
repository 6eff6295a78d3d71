#!/bin/bash
# spike: etcd + kube-apiserver on the host's loopback, flags as pkg/testing/controlplane.
set -eu
T=/root/.cache/keeplb/tools/dfb6fd0c3c4b4695
W=/tmp/spike/cp
mkdir -p $W
cd $W
[ -f tokens.csv ] || echo "$(head -c16 /dev/urandom | xxd -p),keeplb-admin,keeplb-admin,\"system:masters\"" > tokens.csv
[ -f sa.key ] || openssl genrsa -out sa.key 2048 2>/dev/null
setsid $T/etcd --name=keeplb --data-dir=$W/etcd --listen-client-urls=http://127.0.0.1:23791 --advertise-client-urls=http://127.0.0.1:23791 \
  --listen-peer-urls=http://127.0.0.1:23792 --initial-advertise-peer-urls=http://127.0.0.1:23792 --initial-cluster=keeplb=http://127.0.0.1:23792 \
  --unsafe-no-fsync >etcd.log 2>&1 &
echo $! > etcd.pid
sleep 2
setsid $T/kube-apiserver --etcd-servers=http://127.0.0.1:23791 --bind-address=0.0.0.0 --advertise-address=172.18.1.1 --kubelet-preferred-address-types=InternalIP --secure-port=26443 \
  --cert-dir=$W/certs --endpoint-reconciler-type=none --service-cluster-ip-range=10.96.0.0/16 --authorization-mode=Node,RBAC \
  --token-auth-file=$W/tokens.csv --service-account-issuer=https://kubernetes.default.svc --service-account-key-file=$W/sa.key \
  --service-account-signing-key-file=$W/sa.key --disable-admission-plugins=ServiceAccount --allow-privileged=true >apiserver.log 2>&1 &
echo $! > apiserver.pid
for i in $(seq 60); do [ -s certs/apiserver.crt ] && curl -sk https://172.18.1.1:26443/readyz -H "Authorization: Bearer $(cut -d, -f1 tokens.csv)" | grep -qx ok && break; sleep 1; done
tok=$(cut -d, -f1 tokens.csv)
cat > kubeconfig <<EOK
apiVersion: v1
kind: Config
clusters:
- name: keeplb
  cluster:
    server: https://172.18.1.1:26443
    certificate-authority: $W/certs/apiserver.crt
contexts:
- name: keeplb
  context: {cluster: keeplb, user: admin}
current-context: keeplb
users:
- name: admin
  user: {token: $tok}
EOK
# the same, as seen from inside the VM (qemu user net: 10.0.2.2 is the host's loopback)
cp kubeconfig kubeconfig.vm
$T/kubectl --kubeconfig kubeconfig get ns
