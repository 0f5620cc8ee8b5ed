"""Client models: the HF class of the EE checkpoint, with its weights on two servers.

`from_pretrained` builds the checkpoint's own architecture class (Llama, Mistral, Qwen2, GPT-2, T5,
ResNet, ViT) with empty weights, loads only the client-side tensors (embedding, norm weights, biases,
position embeddings), and swaps every weight-bearing linear layer for a [`RemoteLinear`] and every
convolution for a [`RemoteConv2d`]. The result *is* a `LlamaForCausalLM` (or `T5ForConditionalGeneration`,
`ResNetForImageClassification`, ...): `generate()`, caches, logits processors, stopping criteria and
streamers are transformers' own, token ids in and out are in the original vocabulary and logits in the
original label order.

* [`HSSEEForCausalLM`]: decoder LLMs.
* [`HSSEEForConditionalGeneration`]: T5 text-to-text models (the client holds both the self-attention and
  the cross-attention caches).
* [`HSSEEForImageClassification`]: ResNet and ViT image classifiers.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from transformers import GenerationConfig
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING,
    MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING,
    MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING,
)

from ..artifacts.checkpoint import HSSEECheckpointInfo, short
from ..artifacts.key import EEKey
from ..artifacts.layouts import stage_layout
from ..errors import CheckpointError, HSSEEError, ScheduleUnavailableError
from ..hub.download import resolve_client_files, resolve_server_files
from ..transport.base import Transport
from ..transport.config import HSSEEClientConfig, _is_loopback
from .drafting import DraftingMixin
from .inputs import check_generate_inputs
from .load_checks import check_vocab, load_client_config, load_client_state, open_shard
from .options import place_forward_passes, torch_threads, unknown_option_error
from .remote_layers import FusedStage, PermutedEmbedding, RemoteConv2d, RemoteLinear, UnpermutedHead
from .schedule import apply_schedule, check_request
from .stage_client import StageClient

logger = logging.getLogger(__name__)
# Serialises what `from_pretrained` does while module creation may be patched (see its use).
_MODULE_CREATION_LOCK = threading.RLock()


def _make_transport(endpoints, transport: Transport | None, timeout: float | None, client_config) -> Transport:
    if transport is not None:
        return transport
    if endpoints is None or len(endpoints) != 2:
        raise ValueError(
            'pass endpoints=("hostA:port", "hostB:port") (two share servers, or two pools of replicas such as '
            '(("a1:port", "a2:port"), ("b1:port", "b2:port"))) or a transport'
        )
    from ..transport.grpc_client import GrpcTransport

    # GrpcTransport checks the pair itself: a plain string such as "ab" is refused, never split into hosts.
    control = GrpcTransport(endpoints, timeout=timeout, config=client_config)
    if not control.config.data_plane:
        return control
    from ..transport.socket_client import DataPlaneTransport

    # gRPC stays the control plane; stage calls take each single-address server's data plane when it advertises
    # one (a pool of replicas keeps gRPC streams, which its channel balances and retries across replicas)
    return DataPlaneTransport(control)


class HSSEEPreTrainedModel:
    """What every client model shares: loading the client side of an EE checkpoint and connecting it.

    Subclasses name the transformers Auto mapping their checkpoints' classes come from.

    A client model may be shared by threads (a web app, a gateway): each thread's `generate()` or forward pass keeps
    its own stage state (see `FusedStage`), and what the threads share (prepared party-A products, counters) changes
    under a lock. Calls are not serialised: the threads' round trips overlap.
    """

    _auto_mapping: Any = None
    _task: str = ""
    _permutes_input_ids: bool = True

    hss_ee_client: StageClient
    hss_ee_key: EEKey
    hss_ee_info: HSSEECheckpointInfo
    hss_ee_stages_per_layer: int = 4
    hss_ee_client_threads: int | None = None
    """torch threads `generate()` runs at (restored after); `None` leaves torch's setting. `from_pretrained` sets 1
    when both share servers are on this machine (loopback): the client's own tensors are small, and an idle torch
    thread pool spins on the cores the servers need."""

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *,
        key: EEKey | str | os.PathLike,
        endpoints: tuple[str, str] | list[str] | None = None,
        transport: Transport | None = None,
        client_config: HSSEEClientConfig | None = None,
        timeout: float | None = None,
        verify: bool = False,
        verify_rows: int = 40,
        max_rows: int = 4096,
        precompute: bool = True,
        stages_per_layer: int | str = 4,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        token: str | bool | None = None,
        local_files_only: bool | None = None,
        **kwargs: Any,
    ):
        """Loads the client side of an EE checkpoint and connects it to two share servers.

        Args:
            pretrained_model_name_or_path (`str` or `os.PathLike`): a local EE checkpoint folder or a Hub
                repo id (only the client files are downloaded).
            key (`EEKey` or path): the secret key written by `hss-ee convert`.
            endpoints (`tuple`, *optional*): `host:port` of share servers A and B, or of two pools of replicas
                (`(("a1:p", "a2:p"), ("b1:p", "b2:p"))`); an address in both pools is refused.
            transport (`Transport`, *optional*): a ready transport instead of `endpoints` (e.g.
                `InProcessTransport` for a single-machine trial).
            client_config (`HSSEEClientConfig`, *optional*): TLS / mutual TLS, bearer token, deadline and retries
                for the connections to the servers, and whether stage calls may use their data planes.
            timeout (`float`, *optional*): per-call deadline in seconds for gRPC (overrides `client_config`).
            verify (`bool`, *optional*, defaults to `False`): Freivalds-check every output share so a cheating
                server is detected and named (`CheatingServerError`). Needs the server weights once, to
                precompute the secret check rows.
            verify_rows (`int`, *optional*, defaults to 40): secret check rows; a wrong share passes with
                probability at most `2^-verify_rows`.
            max_rows (`int`, *optional*): the most rows sent in one request (longer prompts are split).
            precompute (`bool`, *optional*, defaults to `True`): ask party A for its products ahead of time (its
                share never depends on the data), so that each decode step waits only for party B.
            stages_per_layer (`int` or `str`, *optional*, defaults to 4): round trips per decoder layer. 2 fuses
                `o` with the MLP input and `down` with the next layer's q/k/v (`2·layers + 2` round trips per token
                instead of `4·layers + 1`, ≈ 1.9× the servers' work; Llama, Mistral, Qwen2, GPT-2; servers started
                with `--schedules 4,2`). `"auto"` measures the round trip at connect time and picks the faster.
            revision, cache_dir, token, local_files_only: as in `transformers`' `from_pretrained`.
            kwargs: config overrides (e.g. `attn_implementation="eager"`, `use_cache=False`): fields of the
                checkpoint's config class; anything else raises `UnknownOptionError`.

        Returns:
            The client model, in eval mode, float32.

        Raises:
            `KeyMismatchError`: the key belongs to another checkpoint.
            `CheckpointError`: the folder is not an EE checkpoint.
            `UnknownOptionError`: a keyword is neither an option above nor a field of the checkpoint's config.
            `ScheduleUnavailableError`: `stages_per_layer=2` and a server (or the model's family) does not offer it.
        """
        check_request(stages_per_layer)
        if verify and stages_per_layer != 4:
            raise ScheduleUnavailableError(
                "verify=True checks the checkpoint's own stages; the fused stages of stages_per_layer=2 are not "
                "covered yet: use stages_per_layer=4 with verify=True"
            )
        folder = resolve_client_files(
            pretrained_model_name_or_path,
            revision=revision,
            cache_dir=cache_dir,
            token=token,
            local_files_only=local_files_only,
        )
        attn_impl = kwargs.pop("attn_implementation", None)
        config, unused = load_client_config(folder, **kwargs)
        if unused:  # transformers drops keywords that are no config field: a misspelt option would be ignored
            fields = f"fields of {type(config).__name__} (they override the checkpoint's config.json)"
            raise unknown_option_error(f"{cls.__name__}.from_pretrained()", unused, config.to_dict(), fields)
        if attn_impl is not None:
            config._attn_implementation = attn_impl
        info = HSSEECheckpointInfo.from_config(config)
        ee_key = EEKey.resolve(key)
        ee_key.check(info.fingerprint)
        base = cls._auto_mapping.get(type(config), None)
        if base is None:
            raise CheckpointError(
                f"{cls.__name__} loads {cls._task} checkpoints; this one is a {config.model_type!r} model "
                f"({', '.join(config.architectures or [])}). Use the client class of its task"
            )
        klass = type(f"HSSEE{base.__name__}", (cls, base), {"__module__": __name__})
        # accelerate's init_empty_weights patches module creation process-wide: a second thread building its
        # layers meanwhile would get meta tensors. Every module creation of a load happens under this lock.
        with _MODULE_CREATION_LOCK, init_empty_weights():
            model = klass(config)
        transport = _make_transport(endpoints, transport, timeout, client_config)
        try:
            if verify:
                from .verifier import FreivaldsVerifier, VerifyingTransport

                weights = resolve_server_files(
                    pretrained_model_name_or_path,
                    revision=revision,
                    cache_dir=cache_dir,
                    token=token,
                    local_files_only=local_files_only,
                )
                transport = VerifyingTransport(transport, FreivaldsVerifier.from_checkpoint(weights, rows=verify_rows))
            servers = None
            if hasattr(transport, "check_fingerprint"):  # fail at load, naming the server, not at generate()
                servers = transport.check_fingerprint(info.fingerprint)
                max_rows = min([max_rows, *(d["max_rows"] for d in servers)])
            with _MODULE_CREATION_LOCK:
                model._hss_ee_attach(folder, config, info, ee_key, transport, max_rows, precompute)
            if stages_per_layer != 4:
                infos = servers or (transport.describe() if hasattr(transport, "describe") else ())
                model.hss_ee_stages_per_layer = apply_schedule(model, stages_per_layer, infos)
        except BaseException:
            transport.close()
            raise
        gen_path = Path(folder) / "generation_config.json"
        if gen_path.exists():
            model.generation_config = GenerationConfig.from_pretrained(folder)
        logger.info(
            "connected to share servers %s for checkpoint %s", ", ".join(transport.endpoints), short(info.fingerprint)
        )
        return model.eval()

    def _hss_ee_attach(self, folder, config, info, ee_key, transport, max_rows, precompute=True) -> None:
        folder = Path(folder)
        with open_shard(folder / info.client_shard) as f:
            client = {name: f.get_tensor(name).to(torch.float32) for name in f.keys()}
        with open_shard(folder / info.scales_file) as f:
            if (f.metadata() or {}).get("fingerprint") != info.fingerprint:
                raise CheckpointError(f"{info.scales_file} belongs to another checkpoint; convert the model again")
            scales = {name: f.get_tensor(name) for name in f.keys()}
        layout = stage_layout(config)
        in_features = {}
        stage_client = StageClient(transport, info, scales, in_features, max_rows=max_rows, precompute=precompute)
        for stage in layout:
            modules = [self.get_submodule(part.module) for part in stage.parts]
            dims = [_linear_dims(m, part.kind) for m, part in zip(modules, stage.parts, strict=True)]
            in_features[stage.name] = dims[0][0]
            fused = FusedStage(stage_client, stage.name, [d[1] for d in dims])
            for i, (part, module, (d_in, d_out)) in enumerate(zip(stage.parts, modules, dims, strict=True)):
                bias = client.pop(part.bias, None)
                if part.kind == "conv2d":
                    remote = RemoteConv2d(fused, i, module, bias)
                else:
                    remote = RemoteLinear(fused, i, d_in, d_out, bias)
                if part.permuted_output:
                    remote = UnpermutedHead(remote, ee_key.vocab_perm)
                self.set_submodule(part.module, remote)
        if self._permutes_input_ids:
            emb = self.get_input_embeddings()
            emb_name = next(n for n, m in self.named_modules() if m is emb)
            table = client.pop(emb_name + ".weight")
            check_vocab(config, table, ee_key.vocab_perm.numel(), folder)
            self.set_input_embeddings(PermutedEmbedding(table, ee_key.vocab_perm))
        missing = load_client_state(self, client, folder)
        if missing.unexpected_keys:
            raise CheckpointError(
                f"unexpected client tensors {missing.unexpected_keys[:5]}; is this an EE checkpoint?"
            )
        left = [n for n, p in self.named_parameters() if p.is_meta] + [n for n, b in self.named_buffers() if b.is_meta]
        if left:
            raise CheckpointError(f"the client shard lacks {left[:5]}; the EE checkpoint is incomplete")
        self.hss_ee_client, self.hss_ee_key, self.hss_ee_info = stage_client, ee_key, info
        if all(_is_loopback(e) for e in transport.endpoints):
            self.hss_ee_client_threads = 1
        if self._task == "image-classification":  # called directly, not through generate()
            place_forward_passes(self)

    def generate(self, *args: Any, **kwargs: Any):
        """transformers' own `generate()`, after refusing an empty prompt, a zero-size batch or a prompt past learned
        positions, and warning about one past a rotary model's context (see `inputs.py`), before any round trip; at
        `hss_ee_client_threads` torch threads when that is set, on one core with party B's thread when both servers
        share this machine (`hss_ee_hf.transport.colocation`)."""
        client = self.hss_ee_client
        check_generate_inputs(self, args, kwargs, stages=len(client.in_features), max_rows=client.max_rows)
        with torch_threads(self.hss_ee_client_threads), client.transport.pinned():
            return super().generate(*args, **kwargs)

    @property
    def hss_ee_stats(self):
        """Counters of round trips and bytes since the last `hss_ee_stats.reset()`."""
        return self.hss_ee_client.stats

    def close(self) -> None:
        """Closes the connections to the share servers."""
        self.hss_ee_client.close()
        self.hss_ee_client.transport.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def save_pretrained(self, *args, **kwargs):
        raise HSSEEError(
            "a client model holds only the client side of an EE checkpoint; share the EE checkpoint folder "
            "itself (or `hss-ee push` it) and keep the key to yourself"
        )


def _linear_dims(module: torch.nn.Module, kind: str) -> tuple[int, int]:
    """`(in_features, out_features)` of the stage matrix of an `nn.Linear`, GPT-2 `Conv1D` or `nn.Conv2d`
    (weights may be on the meta device)."""
    shape = module.weight.shape
    if kind == "conv1d":  # stored (in, out)
        return shape[0], shape[1]
    if kind == "conv2d":
        return shape[1] * shape[2] * shape[3], shape[0]
    return shape[1], shape[0]


class HSSEEForCausalLM(DraftingMixin, HSSEEPreTrainedModel):
    """Client model for private generation with a decoder LLM on two share servers.

    `HSSEEForCausalLM.from_pretrained(...)` returns an instance of a subclass of both this class and
    the checkpoint's HF class (e.g. `LlamaForCausalLM`), so everything transformers offers for that
    class works unchanged.

    Example:

    ```python
    >>> from transformers import AutoTokenizer
    >>> from hss_ee_hf import HSSEEForCausalLM
    >>> model = HSSEEForCausalLM.from_pretrained(
    ...     "smollm2-ee", key="smollm2.hss-ee-key", endpoints=("10.0.0.1:50051", "10.0.0.2:50051")
    ... )
    >>> tok = AutoTokenizer.from_pretrained("smollm2-ee")
    >>> out = model.generate(**tok("The capital of France is", return_tensors="pt"), max_new_tokens=16)
    >>> tok.decode(out[0])
    ```
    """

    _auto_mapping = MODEL_FOR_CAUSAL_LM_MAPPING
    _task = "causal-LM"


class HSSEEForConditionalGeneration(HSSEEPreTrainedModel):
    """Client model for private text-to-text generation (T5) on two share servers.

    `HSSEEForConditionalGeneration.from_pretrained(...)` returns a subclass of this class and of
    `T5ForConditionalGeneration`. The encoder runs once per prompt (four round trips per encoder layer); every
    decoder step costs six per decoder layer (self-attention q/k/v and output, cross-attention query and output, MLP up
    and down) plus
    lm_head, and the cross-attention keys and values of the encoder output are computed once and kept in the
    client's cache.

    Example:

    ```python
    >>> from transformers import AutoTokenizer
    >>> from hss_ee_hf import HSSEEForConditionalGeneration
    >>> model = HSSEEForConditionalGeneration.from_pretrained(
    ...     "t5-small-ee", key="t5-small.hss-ee-key", endpoints=("10.0.0.1:50051", "10.0.0.2:50051")
    ... )
    >>> tok = AutoTokenizer.from_pretrained("t5-small-ee")
    >>> out = model.generate(**tok("translate English to German: Hello", return_tensors="pt"), max_new_tokens=16)
    >>> tok.decode(out[0], skip_special_tokens=True)
    ```
    """

    _auto_mapping = MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING
    _task = "text-to-text (seq2seq)"


class HSSEEForImageClassification(HSSEEPreTrainedModel):
    """Client model for private image classification (ResNet, ViT) on two share servers.

    `HSSEEForImageClassification.from_pretrained(...)` returns a subclass of this class and of the checkpoint's
    class (`ResNetForImageClassification`, `ViTForImageClassification`); calling it returns the usual
    `ImageClassifierOutput` with logits in the original label order. Convolutions run on the servers as ring
    matrix products over feature maps the servers unfold (over im2col patches on gRPC); ReLU, pooling, LayerNorm,
    GELU and attention run on the client.

    Example:

    ```python
    >>> from transformers import AutoImageProcessor
    >>> from hss_ee_hf import HSSEEForImageClassification
    >>> model = HSSEEForImageClassification.from_pretrained(
    ...     "resnet-50-ee", key="resnet-50.hss-ee-key", endpoints=("10.0.0.1:50051", "10.0.0.2:50051")
    ... )
    >>> processor = AutoImageProcessor.from_pretrained("resnet-50-ee")
    >>> logits = model(**processor(image, return_tensors="pt")).logits
    >>> model.config.id2label[logits.argmax(-1).item()]
    ```
    """

    _auto_mapping = MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING
    _task = "image-classification"
    _permutes_input_ids = False
