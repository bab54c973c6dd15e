"""Training on Ray: one launcher that builds the Ray Train run of every training job, one worker context that gives
each job's loop its rank, device, precision and checkpoint I/O, and the jobs' loops themselves."""
