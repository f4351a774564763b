"""Serving: requests and their sampling parameters, the sampler, every jitted program the engine runs, the
continuous-batching scheduler, and the files of batch jobs."""
