"""Videos in, shards out: the Shapes-world generator, ingestion of a folder of videos with
audio and narration, and the loader that feeds training."""
