#!/bin/sh
# Open MPI remote agent (in place of ssh) for hosts that are network namespaces of this machine:
# "two hosts on one machine", for testing multi-host tensor parallelism without a second node.
#
#   mpirun --mca plm_rsh_agent deploy/netns-agent.sh --hostfile HOSTFILE ...
#
# The hostfile names the namespaces (`ip netns list`) as hosts. Open MPI calls the agent like
# ssh, `AGENT [ssh options] HOST COMMAND...`, where COMMAND is a line for the remote shell
# (it sets PATH, then starts orted); the agent runs it with /bin/sh inside namespace HOST. Only
# the network is separate: processes, files and /dev/shm stay shared, so run mpirun with
# `--mca btl tcp,self` (else Open MPI may take shared memory between the "hosts") and name the
# namespaces' addresses in btl_tcp_if_include and oob_tcp_if_include. Needs root (setns).
# deploy/README.md ("Two hosts on one machine") has the whole recipe; tests/mpi/test_tp_netns.sh
# runs it.
set -eu

# ssh-style options before the host name (Open MPI passes none by default; plm_rsh_args may)
while [ $# -gt 0 ]; do
    case "$1" in
    -[bcDEeFIiJLlmOopQRSWw]) shift 2 ;;   # ssh options that take a value
    -*) shift ;;
    *) break ;;
    esac
done
if [ $# -lt 2 ]; then
    echo "netns-agent: usage: netns-agent.sh [ssh options] NAMESPACE COMMAND..." >&2
    exit 255
fi
ns=$1
shift
if ! ip netns list | grep -q "^$ns\( \|$\)"; then
    # 255 is what ssh returns when it cannot reach the host: Open MPI reports it as such
    echo "netns-agent: no network namespace '$ns' (hostfile names must be namespaces)" >&2
    exit 255
fi
exec ip netns exec "$ns" /bin/sh -c "$*"
