"""Scale-out: logical axes and the rules that map them onto device meshes, and multi-host runs."""
