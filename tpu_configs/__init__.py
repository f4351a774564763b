"""Topology files: per device slice, the mesh, decode batch, context and prefill chunk planned for each Qwen2.5 size
(`qwenjax.engine.topologies` reads and checks them). A package only so that the files ship with the wheel."""
