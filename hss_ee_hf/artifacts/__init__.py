"""What conversion writes and everyone else reads (DESIGN.md §6).

* `checkpoint`: the `hss_ee` block of an EE checkpoint's `config.json` and the weight fingerprint.
* `key`: the secret EE key file (mode 0600, never inside the checkpoint).
* `stages`: the stage data types and the one table of supported families; `layouts`: every family's stages.
* `weights`: reading a checkpoint's stage weights one stage at a time, quantised for the ring.
"""
