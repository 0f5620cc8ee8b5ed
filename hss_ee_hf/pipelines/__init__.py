"""The `hss-ee-*` pipeline tasks: transformers' own pipelines with a client model (`base` holds what they share)."""
