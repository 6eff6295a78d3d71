#!/bin/sh
# spike: inside the VM, N nodes, each in its own netns + mount ns, with containerd, kubelet, kube-proxy.
S=/tmp/spike
T=$(cat $S/toolsdir)
N=${1:-2}
out=$S/out; mkdir -p $out
step() { echo "== $(cut -d' ' -f1 /proc/uptime)s $*"; }
step "start; mem: $(grep -E 'MemAvailable' /proc/meminfo | tr -s ' ')"
mount -t cgroup2 none /sys/fs/cgroup
echo "+cpu +cpuset +memory +pids +io +hugetlb" > /sys/fs/cgroup/cgroup.subtree_control
# keep nothing routed out of the VM but the apiserver: pod and service ranges stay inside
ip route add unreachable 10.244.0.0/16
ip route add unreachable 10.96.0.0/16
ip link add br-nodes type bridge && ip addr add 172.18.0.1/24 dev br-nodes && ip link set br-nodes up
sysctl -qw net.ipv4.ip_forward=1
# tap: the host's netns is 172.18.1.1 on the other end of eth0, and routes 172.18.0.0/24 and 10.244.0.0/16 here
ip addr flush dev eth0; ip route flush dev eth0 2>/dev/null
ip addr add 172.18.1.2/24 dev eth0; ip link set eth0 up
for i in $(seq $N); do
  ip netns add node$i
  ip link add veth$i type veth peer name eth0 netns node$i
  ip link set veth$i master br-nodes up
  ip -n node$i addr add 172.18.0.1$i/24 dev eth0
  ip -n node$i link set eth0 up
  ip -n node$i link set lo up
  ip -n node$i route add default via 172.18.0.1
  ip route add 10.244.$i.0/24 via 172.18.0.1$i
  for j in $(seq $N); do [ $i = $j ] || ip -n node$i route add 10.244.$j.0/24 via 172.18.0.1$j; done
  mkdir -p /sys/fs/cgroup/node$i
  echo "+cpu +cpuset +memory +pids +io +hugetlb" > /sys/fs/cgroup/node$i/cgroup.subtree_control
  step "node$i: start"
  ip netns exec node$i unshare -m sh $S/node-in-ns.sh $i > $out/node$i.sh.log 2>&1 &
done
step "nodes started"
for t in $(seq 40); do
  sleep 15
  [ -e $S/stop ] && break
  step "t=$((t*15)) mem: $(grep MemAvailable /proc/meminfo | tr -s ' ') load: $(cat /proc/loadavg)"
  for i in $(seq $N); do ip netns exec node$i $S/img/fetch-orig.bin http://10.244.$i.2:8080/hostname 2>&1 | sed "s/^/node$i: /"; echo; done
done
top -b -n1 | head -25
free -m
step "end"
