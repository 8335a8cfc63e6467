"""The run configuration's dataclasses: every key a recipe may hold, its type and its default.

A recipe's tables mirror these classes (`[model]`, `[[model.modalities]]`, `[train]`, `[data]`); mot/config.py
reads and checks one into a `RunConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

UNTIE_CHOICES = ("attn", "ffn", "norm")
# How the tower projections run (mot/model/kernels.py). Speed only: every choice computes the same function.
KernelChoice = Literal["auto", "per_tower", "grouped", "split"]


@dataclass
class ModalityConfig:
    """One modality: a contiguous id range of the unified vocabulary and its own tower."""

    name: str
    vocab_size: int  # ids this modality owns (BPE size, VQGAN codebook size, speech units)
    objective: Literal["ar", "diffusion"] = "ar"
    loss_weight: float = 1.0
    # Expected share of tokens in the data; used for mixed active-params / FLOPs figures only.
    token_fraction: float = 0.0
    tokenizer: str = ""  # tokenizer recipe or checkpoint; read by data and generation, not the model
    # objective = "diffusion" (Transfusion setting): an image span holds the VQGAN's continuous latent grid
    # (the codebook vectors of its codes, normalised), patchified, instead of one token per code.
    latent_channels: int = 0  # the VQGAN's embed_dim
    latent_grid: int = 0  # the VQGAN's grid side h = w (codes per image = latent_grid ** 2)
    patch_size: int = 1  # latent cells per side of one token: (latent_grid / patch_size) ** 2 tokens per image
    schedule: Literal["ddpm_cosine", "flow"] = "ddpm_cosine"  # eps-prediction DDPM, or rectified-flow velocity

    @property
    def is_diffusion(self) -> bool:
        return self.objective == "diffusion"

    @property
    def patch_dim(self) -> int:
        """Size of one latent token: latent_channels * patch_size ** 2."""
        return self.latent_channels * self.patch_size**2

    @property
    def latent_tokens(self) -> int:
        """Tokens of one image span under diffusion."""
        return (self.latent_grid // self.patch_size) ** 2


@dataclass
class ModelConfig:
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 0  # key/value heads, each shared by n_heads / n_kv_heads query heads (GQA); 0 = n_heads
    ffn_dim: int = 0  # SwiGLU hidden size; 0 = 8/3 * dim rounded up to ffn_multiple_of (Llama's rule)
    ffn_multiple_of: int = 256
    modalities: list[ModalityConfig] = field(
        default_factory=lambda: [ModalityConfig("text", 256), ModalityConfig("image", 256)]
    )
    n_special_tokens: int = 8  # begin/end of document, image, speech, pad, reserved
    special_modality: str = ""  # tower that special tokens go through; "" = the first modality
    vocab_multiple_of: int = 64  # pad the unified vocabulary for matmul-friendly head shapes
    # Which non-embedding parameters exist once per modality. [] is the dense baseline.
    untie: list[str] = field(default_factory=lambda: list(UNTIE_CHOICES))
    qk_norm: bool = False  # normalise queries and keys per head (per modality when norms are untied)
    # "rms": RMSNorm with one gain shared by the heads. "layernorm_per_head": LayerNorm with a gain and a bias for
    # every head (Chameleon's; eps fixed at 1e-5 as in its code).
    qk_norm_type: Literal["rms", "layernorm_per_head"] = "rms"
    # "pre": x + f(norm(x)). "chameleon": x + norm(f(x)), the norm inside the residual on the output.
    norm_placement: Literal["pre", "chameleon"] = "pre"
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 4096
    init_std: float = 0.02
    tie_embeddings: bool = False
    # TokenFormer (arXiv 2410.23168): "pattention" turns every tower projection into token-parameter attention
    # (mot/model/pattention.py) so that a trained model grows by appending parameter tokens (`mot grow`).
    projection: Literal["linear", "pattention"] = "linear"
    param_tokens: int = 0  # parameter tokens of the QKV and of the output projection per tower; 0 = dim
    param_tokens_per_modality: list[int] = field(default_factory=list)  # [] = param_tokens for every modality
    ffn_token_multiple: int = 4  # the FFN (one Pattention) holds this many times the tokens (TokenFormer: 4)
    # n of the scale tau = sqrt(n) in Pattention's modified softmax, per modality; [] = the modality's own
    # token count (TokenFormer). `mot grow` writes the counts before growth here: the function stays the same.
    param_tokens_tau: list[int] = field(default_factory=list)
    # "auto": each projection on the kernel that suits it (per-tower GEMMs, grouped or split); the others force
    # one where it can run, for comparisons and benchmarks (mot/model/kernels.py, `Kernels`).
    kernels: KernelChoice = "auto"

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def kv_dim(self) -> int:
        """Width of the keys (and of the values): kv_heads * head_dim."""
        return self.kv_heads * self.head_dim

    @property
    def ffn_hidden(self) -> int:
        if self.ffn_dim:
            return self.ffn_dim
        hidden = int(8 * self.dim / 3)
        return self.ffn_multiple_of * -(-hidden // self.ffn_multiple_of)

    @property
    def n_modalities(self) -> int:
        return len(self.modalities)

    def towers(self, component: str) -> int:
        """How many copies of a component ("attn", "ffn", "norm") the model holds."""
        return self.n_modalities if component in self.untie else 1

    @property
    def is_dense(self) -> bool:
        return not self.untie or self.n_modalities == 1

    def param_tokens_of(self, component: str, modality: int = 0) -> int:
        """Parameter tokens of a Pattention projection of "attn" (QKV and output) or "ffn", in one tower."""
        base = self.param_tokens_per_modality[modality] if self.param_tokens_per_modality else self.param_tokens
        return (base or self.dim) * (self.ffn_token_multiple if component == "ffn" else 1)

    def tau_tokens_of(self, component: str, modality: int = 0) -> int:
        """The n of tau = sqrt(n) in that projection's modified softmax."""
        if not self.param_tokens_tau:
            return self.param_tokens_of(component, modality)
        return self.param_tokens_tau[modality] * (self.ffn_token_multiple if component == "ffn" else 1)


@dataclass
class DataConfig:
    """Where the training tokens come from. Relative paths are taken from the working directory."""

    shards: str = ""  # a folder written by `mot prepare`
    # When `shards` holds no prepared corpus yet, the trainer prepares it from these first.
    documents: str = ""  # JSONL documents (or a local HF datasets source)
    tokenizers: str = ""  # folder with text/ image/ speech/ tokenizers; copied into the run for generation
    demo: bool = False  # generate the bundled demo corpus at `documents` if it is missing
    prepare_workers: int = 2
    eval_fraction: float = 0.02  # documents held out for evaluation (chosen by a hash of their id)
    positions: Literal["continue", "restart"] = "continue"  # rotary positions of a document split over sequences
    # Probability of removing a training document's leading caption before its first image or speech span,
    # so that the model also learns images and speech without a condition (classifier-free guidance).
    condition_dropout: float = 0.0


@dataclass
class TrainConfig:
    seq_len: int = 512
    batch_size: int = 8  # sequences per optimizer step, over all devices and accumulation steps
    micro_batch_size: int = 0  # sequences per device per forward pass; 0 = batch_size / devices
    steps: int = 1000
    seed: int = 0
    # AdamW; weight decay applies to projection and head matrices, not to norms or embeddings.
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at the last step
    warmup_steps: int = 100
    schedule: Literal["cosine", "constant"] = "cosine"
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm; 0 = no clipping
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on a GPU, fp32 on the CPU
    compile: bool = False
    # On CUDA, document masks as FlexAttention block masks (masked tiles skipped) or dense boolean SDPA masks.
    # "auto": FlexAttention when the blocks are compiled (the kernel is then fused into the block's graph);
    # eager blocks call it through its own compiled wrapper per layer, which loses at small sizes (bench/NOTES.md,
    # "Figures moved out of code comments").
    flex_attention: bool | Literal["auto"] = "auto"
    activation_checkpointing: bool = False
    # Each micro-batch's forward and backward replayed as one CUDA graph (mot/train/graphed_step.py): for small
    # models, whose step the host's kernel launches bound. One CUDA process, compiled blocks, AR objectives.
    cuda_graph: bool = False
    # Debug: per micro-batch, check on the device that every token reaches its own tower (a sync per micro-batch;
    # mot/train/routing_check.py).
    check_routing: bool = False
    distributed: Literal["ddp", "fsdp"] = "ddp"  # used when launched on several processes
    # FSDP: keep each block's gathered bf16 weights from the first forward of a step to its last backward (one
    # all-gather per step instead of two per micro-batch; costs 2 bytes per parameter per GPU). mot/train/sharding.py
    fsdp_keep_gathered: bool = False
    # bf16 matmul weights in the model, their fp32 masters in the optimizer (mot/train/master_weights.py): no
    # weight casts per micro-batch, gradients still accumulated in fp32. One process with bf16 precision only.
    # "auto": on for bf16 training on one CUDA device.
    master_weights: bool | Literal["auto"] = "auto"
    # A non-finite loss or gradient: "stop" names the step and modality; "skip" drops that update.
    on_nonfinite: Literal["stop", "skip"] = "stop"
    max_skipped_steps: int = 10  # "skip" still stops after this many skipped updates in a row
    # Output, logging, evaluation, checkpoints.
    out_dir: str = "runs"  # the run writes into out_dir/name
    log_every: int = 10
    eval_every: int = 100  # 0 = only at the end
    eval_batches: int = 4  # global batches (train.batch_size sequences each) per evaluation
    # A larger evaluation once, at the last step (a "final_eval" log row beside the last "eval" one), for final
    # losses with smaller standard errors; its batches start with the periodic ones. 0 = none; else more
    # than eval_batches.
    final_eval_batches: int = 0
    checkpoint_every: int = 100  # 0 = only at the end
    keep_checkpoints: int = 3
    tensorboard: bool = True
    peak_tflops: float = 0.0  # per-device dense bf16 peak for MFU; 0 = look up the GPU, none on CPU
    # Parts that training leaves bit for bit as they are (mot/train/freeze.py): "tower:NAME" (a modality's own
    # towers), "embed:NAME" (its embedding and head rows), or parameter-name patterns ("blocks.0.*").
    freeze: list[str] = field(default_factory=list)


@dataclass
class RunConfig:
    name: str = "run"
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
