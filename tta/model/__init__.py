"""The base model: grids as tokens (`encoding`), loading a model (`loading`), padding batches
(`batching`)."""
