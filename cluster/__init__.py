"""The cluster layer: global scheduler, placement, autoscaler, pools and the simulator."""

from cluster.compiled import inherit_compiled_build

# a process started by one that runs the simulator compiled (a sweep's) runs it compiled too
inherit_compiled_build()
