"""Serving: requests and their sampling parameters, the sampler, every jitted program the engine runs, the
continuous-batching scheduler, the files of batch jobs, and the memory planner with the topology files it serves."""
