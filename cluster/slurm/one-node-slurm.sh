#!/usr/bin/env bash
# A real one-node Slurm on this machine, to try the sbatch script's preemption paths (cluster/slurm/check-preemption.sh):
# munge, slurmctld and slurmd from Debian's packages, two partitions on this node where a job in `high` preempts a job
# in `low` (PreemptMode=REQUEUE, GraceTime=60). Needs root and apt; not for a shared machine.
#
#   sudo bash cluster/slurm/one-node-slurm.sh              # Slurm's default: preemption SIGTERMs the job's steps
#   sudo bash cluster/slurm/one-node-slurm.sh --user-signal   # send the job's --signal (USR1) on preemption instead
set -euo pipefail
command -v slurmctld >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge
host=$(hostname)
cpus=$(nproc)
mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
[ -s /etc/munge/munge.key ] || dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
chmod 400 /etc/munge/munge.key
pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged
version=$(slurmctld -V | awk '{print $2}')
if [ "${1:-}" = "--user-signal" ]; then  # the option moved to PreemptParameters in Slurm 23.02
  if [ "$(printf '%s\n23.02\n' "$version" | sort -V | head -1)" = "23.02" ]; then
    user_signal="PreemptParameters=send_user_signal"
  else
    user_signal="SlurmctldParameters=preempt_send_user_signal"
  fi
else
  user_signal=""
fi
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=onenode
SlurmctldHost=$host(127.0.0.1)
AuthType=auth/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobRequeue=1
KillWait=30
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
$user_signal
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=low Nodes=$host Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=60
PartitionName=high Nodes=$host MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
CONF
if pgrep -x slurmctld >/dev/null; then
  scontrol reconfigure
else
  slurmctld -i
  slurmd
fi
sleep 2
sinfo
echo "Slurm $version on $host: ${user_signal:-no user signal on preemption, the default}"
