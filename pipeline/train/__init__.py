"""Training: the driver (the run's spec, MLflow run, Ray Train launch), the worker and its loop with callbacks, the
DeepSpeed config, the optimizer and schedule, throughput, preemption."""
