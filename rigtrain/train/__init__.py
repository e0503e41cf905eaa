"""DeepSpeed ZeRO training: the launcher (`launch`), one process's Trainer (`trainer`),
checkpoints, and the metrics a run writes."""
