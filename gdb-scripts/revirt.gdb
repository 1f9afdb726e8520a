# revirt.gdb: helpers for debugging a revirt replay with gdb.
#
#   revirt gdb recordings/NAME --port 1234 &
#   gdb -x gdb-scripts/revirt.gdb -ex 'rv-connect 1234' guests/demo/out/vm.img
#
# The replay is read-only: register and memory writes are refused.
# Reverse execution needs no `record` command: the remote supports
# reverse-stepi / reverse-continue (and gdb builds reverse-step,
# reverse-next and reverse-finish on top of them).

set architecture i386:x86-64
set pagination off
# The stub evaluates breakpoints and watchpoints itself; let gdb use them.
set can-use-hw-watchpoints 1
set remote hardware-watchpoint-limit 64
set remote hardware-breakpoint-limit 64

define rv-connect
  if $argc == 1
    target remote 127.0.0.1:$arg0
  else
    target remote 127.0.0.1:1234
  end
end
document rv-connect
Connect to `revirt gdb` on this machine: rv-connect [PORT] (default 1234).
end

define rv-where
  monitor where
end
document rv-where
Show the current execution point (exits, branches, RIP), the exit/step position and the log event index.
end

define rv-checkpoints
  monitor checkpoints
end
document rv-checkpoints
List the recording's checkpoints (id, exit count, event index).
end

define rv-goto
  monitor goto-exit $arg0
  maintenance flush register-cache
  frame
end
document rv-goto
Go to the state right after guest-caused exit N: rv-goto N.
end

define rv-goto-event
  monitor goto-event $arg0
  maintenance flush register-cache
  frame
end
document rv-goto-event
Go to the exit at which log event N happened: rv-goto-event N.
end

define rv-ret-slot
  # The saved return address slot of the current frame (frame-pointer code).
  print/x $rbp + 8
end
document rv-ret-slot
Print the address of the current frame's saved return address ($rbp + 8).
end
