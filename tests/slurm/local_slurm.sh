#!/bin/bash
# A one-machine SLURM for the scale-out tests: `local_slurm.sh start` / `local_slurm.sh stop`.
# Debian's slurm-wlm + munge, run as root without systemd; each srun task on this host stands in for
# a node (one torchrun agent per task, rendezvous on this host). Needs root and the packages
# (.ci/run installs them: apt-get install slurm-wlm munge).
set -euo pipefail
case "${1:-start}" in
stop)
  for pid in /run/slurmd.pid /run/slurmctld.pid; do [ -f $pid ] && kill "$(cat $pid)" 2>/dev/null || true; done
  exit 0 ;;
esac
mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
[ -f /etc/munge/munge.key ] || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge
chmod 400 /etc/munge/munge.key
pgrep -x munged >/dev/null || /usr/sbin/munged --force
H=$(hostname)
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=local
SlurmctldHost=$H
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmdSpoolDir=/var/spool/slurmd
StateSaveLocation=/var/spool/slurmctld
SlurmUser=root
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
NodeName=$H CPUs=$(nproc) RealMemory=8000 State=UNKNOWN
PartitionName=debug Nodes=$H Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
# 22.05 has no "disabled" cgroup plugin; v1 with IgnoreSystemd lets slurmd start without systemd
printf 'CgroupPlugin=cgroup/v1\nIgnoreSystemd=yes\nCgroupAutomount=no\n' > /etc/slurm/cgroup.conf
pgrep -x slurmctld >/dev/null || /usr/sbin/slurmctld
pgrep -x slurmd >/dev/null || /usr/sbin/slurmd
for _ in $(seq 30); do
  sinfo -h -o %t 2>/dev/null | grep -qE '^(idle|mix|alloc)' && exit 0
  sleep 1
done
echo "local SLURM did not come up: sinfo says: $(sinfo 2>&1)" >&2
exit 1
