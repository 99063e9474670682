#!/bin/bash
# run "$@" under heaptrack in its own session; on TERM, TERM only the profiled python (by pid)
out=$HT_OUT
setsid heaptrack -o "$out" "$@" > "$out.htlog" 2>&1 &
ht=$!
term() {
  for p in $(ps -o pid= --ppid $ht); do
    if grep -q p2p_mirror /proc/$p/cmdline 2>/dev/null; then kill -TERM $p; fi
  done
}
trap term TERM
wait $ht; wait $ht
