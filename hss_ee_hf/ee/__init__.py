"""Equivariant Encryption (DESIGN.md §5): the secret transforms the converter folds into the weights.

* `transforms`: rotations, permutations and scalings, drawn from the CSPRNG.
* `specs`: the [`EESpec`] contract and the decoder-LLM recipes (Llama family, GPT-2); `t5`, `resnet`, `vit` (with
  `vision`, what the two classifiers share): one file per family.
* `families`: which spec converts a config.

Only the converter imports this package; the client needs nothing from it at run time (only the key's `pi`).
"""
