"""profile/: instrumentation the trainer calls (torch.profiler schedule, loader spans,
telemetry sampler) and a pure analyser of what they record. It never imports train/."""
