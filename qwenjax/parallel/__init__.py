"""Scale-out: logical axes and the rules that map them onto device meshes, multi-host runs, and the memory planner
behind the topology files."""
