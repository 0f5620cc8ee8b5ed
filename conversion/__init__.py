"""The converter front end (`hss-ee convert`): installed as `hss_ee_conversion`.

Reads an HF checkpoint (local folder, Hub id in the local cache, or GGUF file), streams it through
the EE transforms of `hss_ee_hf.ee.specs`, verifies equivariance and writes the EE checkpoint and
the secret key.
"""

from .convert import ConversionResult, convert
from .source import ModelSource, open_source

__all__ = ["ConversionResult", "ModelSource", "convert", "open_source"]
