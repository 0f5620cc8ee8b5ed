"""The trusted client (DESIGN.md §2, §3): transformers models whose linear layers run on the two servers.

* `modeling`: [`HSSEEForCausalLM`] and the other client classes (`from_pretrained`, `generate()` unchanged).
* `config`: [`HSSEEConfig`]; `auto`: loading a client for the Auto classes and the pipelines, and registering.
* `stage_client`: one stage round trip (encode, share, send, reconstruct, decode) and party A's precomputation.
* `remote_layers`: the modules that replace `nn.Linear` / `nn.Conv2d`, the embedding and the head.
* `verifier`: the Freivalds check of every returned share.
"""
