"""The runner: the one executor behind both transports. It collects jobs into batches by a sample
budget, drops expired ones, groups them by model and shape, runs the sampler, summarises per job
and answers through the transport the jobs came by. The only part of ``service`` that runs torch."""
