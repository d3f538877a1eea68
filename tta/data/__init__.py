"""ARC data: the task type (`tasks`), datasets by name or path (`datasets`), the synthetic task
generator (`synthetic`), grid augmentations (`augment`) and the contamination guard
(`contamination`).  Nothing here imports torch or a model."""
