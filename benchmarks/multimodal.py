"""GPU benchmark of a multimodal LongNet training step: dilated fusion against dense fusion.

Times one training step of ``mmlongnet.models.MMLongNet`` in a base configuration (768 wide,
12 heads, FFN 3072; byte-level text, log-mel audio and tubelet video encoders; a 2-layer
dilated stack per modality with segments 2K, 4K, 8K at rates 1, 2, 4; a 4-layer multiway fusion
stack with segments 2K..32K at rates 1, 2, 4, 6, 12; rotary positions) on one sample whose
fused sequence holds L tokens, L in {16K, 64K, 256K}: 10 % text, 45 % audio, 45 % video.
The raw inputs are sized from the encoders' token arithmetic (`plan_inputs`) and text takes
what audio and video leave, so the fused length is L exactly: at L = 16K, 4.9 minutes of 16 kHz
audio, 300 frames of 224 x 224 video and 1.6K bytes of text. Two kinds of fusion, built from the same seed:

- dilated: the model as configured;
- dense-fusion: the same model whose fusion stack has one segment of L tokens at rate 1, so
  every fused token attends to all L tokens (the same fused op, dense); the modality stacks
  stay dilated. The baseline of the ratio column.

One step = forward on the inputs under ``torch.autocast("cuda", dtype=torch.bfloat16)`` (fp32
master weights), a linear head on the pooled embedding and fp32 cross-entropy against a random
label among 16 classes, backward, an AdamW step and zero_grad. Each configuration runs without
activation checkpointing first and, when that runs out of memory, again with
``checkpoint_activations=True`` (it covers the stacks' layers, not the encoders); a
configuration that does not fit either way is recorded as "oom".

Writes ``<out>/multimodal_<tag>.json`` (rows appended to ``.json.tmp`` as they come, so a killed
run keeps what it measured) and ``<out>/multimodal_<tag>.png``, and prints a markdown table.
``--plot-only FILE.json`` redraws the PNG and the table from a saved file, without a GPU;
``--dry-run`` prints the plan (token counts, raw input sizes) and an estimated runtime.

    python benchmarks/multimodal.py --tag h100            # L in {16K, 64K, 256K}, both kinds
    python benchmarks/multimodal.py --quick               # smoke test: L in {16K, 64K}
    python benchmarks/multimodal.py --sizes 262144 --kinds dilated
    python benchmarks/multimodal.py --device cpu --tiny   # a tiny model, L in {256, 512}, on the CPU
    python benchmarks/multimodal.py --plot-only benchmarks/results/multimodal_<tag>.json
"""

# B batch, L fused tokens, N_t / N_a / N_v text / audio / video tokens, E d_model, F FFN width,
# H heads, D head dim (E / H), S audio samples, T video frames, t tubelet size, P patches per
# frame, p patch size, C channels, K classes of the head.

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/_common.py
from _common import (  # noqa: E402
    RESULTS_DIR,
    cell,
    environment,
    finish_sweep,
    load_json,
    load_script,
    mixed_precision,
    png_path,
    use_repository,
)

if TYPE_CHECKING:  # imported for real by `mmlongnet_models`, which finds the package
    from mmlongnet.models import MMLongNetConfig, StackConfig

longnet_bench = load_script("longnet")  # the training-step benchmark this one extends
attention_bench = longnet_bench.attention_bench
SEED = longnet_bench.SEED
LEARNING_RATE = longnet_bench.LEARNING_RATE

KINDS = ("dilated", "dense-fusion")
DEFAULT_SIZES = (16384, 65536, 262144)
QUICK_SIZES = (16384, 65536)
TINY_SIZES = (256, 512)  # the default with --tiny
MIX = {"text": 0.10, "audio": 0.45, "video": 0.45}  # share of the fused tokens; text takes the rest
NUM_CLASSES = 16  # K, classes of the head on the pooled embedding (loss ln 16 = 2.77 at initialisation)

STYLES = {
    "dilated": longnet_bench.STYLES["dilated"] | {"label": "dilated fusion"},
    "dense-fusion": longnet_bench.STYLES["dense"] | {"label": "dense fusion (one segment of L)"},
}


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


def mmlongnet_models():
    """mmlongnet.models, from this checkout when the package is not installed."""
    try:
        import mmlongnet.models as models
    except ModuleNotFoundError as exc:
        if exc.name != "mmlongnet":
            raise
        use_repository()
        import mmlongnet.models as models
    return models


def base_config() -> MMLongNetConfig:
    """The benchmarked `MMLongNetConfig`: LongNet-base widths, three encoders, dilated stacks.

    Video: 224 x 224 frames, 32 x 32 patches (P = 49 per frame), tubelets of t = 2 frames, so a
    video token covers 2 frames of one patch. Audio: the encoder's defaults (16 kHz, 25 ms
    windows every 10 ms, 80 mels, 4x subsampling by two stride-2 convolutions of E channels):
    25 tokens/s. Text: byte ids (vocabulary 259).
    """
    models = mmlongnet_models()
    from mmlongnet.modalities import AudioEncoderConfig, TextEncoderConfig, VisionEncoderConfig

    modality = dict(segment_lengths=[2048, 4096, 8192], dilation_rates=[1, 2, 4])
    return models.MMLongNetConfig(
        d_model=768, nhead=12, dim_feedforward=3072,
        text=TextEncoderConfig(embed_dim=768), audio=AudioEncoderConfig(embed_dim=768),
        video=VisionEncoderConfig(embed_dim=768, image_size=224, patch_size=32, tubelet_size=2),
        text_stack=models.StackConfig(2, **modality), audio_stack=models.StackConfig(2, **modality),
        video_stack=models.StackConfig(2, **modality),
        fusion_stack=models.StackConfig(4, [2048, 4096, 8192, 16384, 32768], [1, 2, 4, 6, 12]),
    )  # fmt: skip


def tiny_config() -> MMLongNetConfig:
    """--tiny: `MMLongNetConfig.tiny()` (E = 32, 1-layer stacks, 2 fusion layers), for CPU smoke tests."""
    return mmlongnet_models().MMLongNetConfig.tiny()


def make_config(args: argparse.Namespace) -> MMLongNetConfig:
    """The configuration of this run: base or tiny, with --audio-conv-channels applied."""
    config = tiny_config() if args.tiny else base_config()
    if args.audio_conv_channels is not None:
        audio = dataclasses.replace(config.audio, conv_channels=args.audio_conv_channels)
        config = dataclasses.replace(config, audio=audio)
    return config


def fusion_stack(config: MMLongNetConfig, kind: str, length: int) -> StackConfig:
    """The fusion stack of `kind`: as configured (dilated), or one segment of `length` at rate 1."""
    if kind == "dense-fusion":
        return mmlongnet_models().StackConfig(config.fusion_stack.num_layers, [length], [1])
    return config.fusion_stack


class PooledClassifier(nn.Module):
    """`MMLongNet` followed by a linear head on its pooled embedding.

    forward(inputs {name: raw input}) -> (logits (B, K), L the fused length).
    """

    def __init__(self, model: nn.Module, num_classes: int, device: torch.device | None = None):
        super().__init__()
        self.model = model
        self.head = nn.Linear(model.config.d_model, num_classes, device=device)

    def forward(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        out = self.model(inputs)  # tokens (B, L, E), pooled (B, E)
        return self.head(out.pooled), out.tokens.shape[1]  # (B, K)


def build_model(
    config: MMLongNetConfig, kind: str, length: int, checkpointing: bool, device: torch.device
) -> nn.Module:
    """A fresh `PooledClassifier` with fp32 parameters on `device`, initialised from SEED."""
    config = dataclasses.replace(
        config, fusion_stack=fusion_stack(config, kind, length), checkpoint_activations=checkpointing
    )
    torch.manual_seed(SEED)
    model = mmlongnet_models().MMLongNet(config, device=device)
    return PooledClassifier(model, NUM_CLASSES, device).train()


# --------------------------------------------------------------------------------------------
# Inputs: raw sizes from the token arithmetic
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class InputPlan:
    """The raw inputs of one sample and the tokens its encoders make of them."""

    target: int  # the fused length asked for
    text_tokens: int  # N_t byte ids (one token each)
    audio_samples: int  # S
    audio_tokens: int  # N_a = AudioEncoder.output_lengths(S)
    video_frames: int  # T
    video_tokens: int  # N_v = VisionEncoder.output_lengths(T) = ceil(T / t) * P
    sample_rate: int  # of the waveform, Hz
    frame_shape: tuple[int, int, int]  # (C, H, W) of a frame

    @property
    def length(self) -> int:
        """L, the fused sequence: every token of every modality."""
        return self.text_tokens + self.audio_tokens + self.video_tokens

    def tokens(self) -> dict[str, int]:
        """Tokens per modality."""
        return {"text": self.text_tokens, "audio": self.audio_tokens, "video": self.video_tokens}

    def input_bytes(self, batch: int = 1) -> int:
        """Bytes of the raw inputs: int64 ids, float32 waveform, float32 frames."""
        pixels = self.video_frames * math.prod(self.frame_shape)
        return batch * (8 * self.text_tokens + 4 * self.audio_samples + 4 * pixels)

    def raw(self) -> dict:
        """The raw input sizes, as recorded in a row."""
        return {
            "text_ids": self.text_tokens,
            "audio_samples": self.audio_samples,
            "audio_seconds": round(self.audio_samples / self.sample_rate, 3),
            "video_frames": self.video_frames,
            "frame_shape": list(self.frame_shape),
        }


def _encoders(config: MMLongNetConfig) -> tuple[nn.Module, nn.Module]:
    """The audio and video encoders of `config`, built on the meta device (no memory): their
    token arithmetic is all that is needed."""
    from mmlongnet.modalities import AudioEncoder, VisionEncoder

    return AudioEncoder(config.audio, device="meta"), VisionEncoder(config.video, device="meta")


def shortest_waveform(audio: nn.Module, tokens: int) -> int:
    """The fewest samples S with `audio.output_lengths(S) >= tokens` (it grows by at most one token
    per hop, so it is `tokens` exactly). With the defaults, (tokens - 1) / 25 s: the centred STFT
    puts the first frame, hence the first token, at t = 0."""
    guess = max(1, round(tokens / audio.tokens_per_second * audio.config.sample_rate))
    low, high = 0, guess
    while audio.output_lengths(high) < tokens:
        high *= 2
    while low < high:  # output_lengths is non-decreasing in S
        middle = (low + high) // 2
        if audio.output_lengths(middle) >= tokens:
            high = middle
        else:
            low = middle + 1
    return low


def plan_inputs(config: MMLongNetConfig, target: int, mix: dict[str, float] = MIX) -> InputPlan:
    """Raw inputs whose fused sequence is `target` tokens long, split as `mix` says.

    Audio: the shortest waveform giving N_a = round(mix * L) tokens (exactly). Video:
    T = round(mix * L / P) * t frames, N_v = T / t * P tokens (within P / 2 of its share).
    Text: the remaining L - N_a - N_v byte ids, so the fused length is L exactly.
    """
    audio, video = _encoders(config)
    audio_samples = shortest_waveform(audio, round(mix["audio"] * target))
    tubelets = max(1, round(mix["video"] * target / video.num_patches))
    video_frames = tubelets * config.video.tubelet_size
    audio_tokens, video_tokens = audio.output_lengths(audio_samples), video.output_lengths(video_frames)
    text_tokens = target - audio_tokens - video_tokens
    if text_tokens < 1:
        raise ValueError(
            f"a fused length of {target} leaves no text after {audio_tokens} audio and {video_tokens} video "
            f"tokens (video comes in tubelets of {video.num_patches} tokens); ask for a longer sequence"
        )
    return InputPlan(
        target, text_tokens, audio_samples, audio_tokens, video_frames, video_tokens,
        config.audio.sample_rate, (config.video.in_chans, *config.video.image_size),
    )  # fmt: skip


def make_inputs(
    config: MMLongNetConfig, plan: InputPlan, batch: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """Random raw inputs of `plan`'s sizes, generated on `device` from SEED, every sample full length.

    text (B, N_t) long byte ids (no padding id), audio (B, S) float32 ~ 0.1 N(0, 1),
    video (B, T, C, H, W) float32 uniform in [-1, 1].
    """
    generator = torch.Generator(device=device).manual_seed(SEED)
    offset = 3  # ids 0, 1, 2 are the byte tokenizer's pad, bos and eos
    text = torch.randint(
        offset, config.text.vocab_size, (batch, plan.text_tokens), generator=generator, device=device
    )
    audio = torch.randn(batch, plan.audio_samples, generator=generator, device=device).mul_(0.1)
    video = torch.rand(batch, plan.video_frames, *plan.frame_shape, generator=generator, device=device)
    return {"text": text, "audio": audio, "video": video.mul_(2.0).sub_(1.0)}


# --------------------------------------------------------------------------------------------
# Counting useful work
# --------------------------------------------------------------------------------------------


def encoder_flops(config: MMLongNetConfig, plan: InputPlan) -> float:
    """Model FLOPs of the audio and video encoders in one training step, for one sample.

    6 FLOPs per multiply-accumulate (2 forward, 4 backward), but 4 for a first layer, whose input
    (mel features, pixels) needs no gradient. Audio: each 3 x 3 stride-2 convolution over
    (frames, mels) halves both (rounding up), then the projection to E per token. Video: a
    (t, p, p) tubelet convolution, C t p^2 E per token. The STFT and the text lookup are not counted.
    """
    audio_cfg, video_cfg = config.audio, config.video
    frames = 1 + (plan.audio_samples + 2 * (audio_cfg.n_fft // 2) - audio_cfg.n_fft) // audio_cfg.hop_length
    mels, channels_in = audio_cfg.n_mels, 1
    channels = audio_cfg.conv_channels or audio_cfg.embed_dim
    flops = 0.0
    for _ in range(int(math.log2(audio_cfg.subsampling))):
        frames, mels = -(-frames // 2), -(-mels // 2)
        flops += (4 if channels_in == 1 else 6) * channels * channels_in * 9 * frames * mels
        channels_in = channels
    flops += 6 * channels_in * mels * audio_cfg.embed_dim * plan.audio_tokens  # the projection to E
    patch = video_cfg.in_chans * video_cfg.tubelet_size * video_cfg.patch_size**2
    return flops + 4 * patch * video_cfg.embed_dim * plan.video_tokens


def step_flops(config: MMLongNetConfig, plan: InputPlan, kind: str, batch: int) -> float:
    """Model FLOPs of one training step (forward + backward), not counting checkpoint recomputation.

    Layers: 6 FLOPs per weight and token over each layer's attention projections (4 E^2) and FFN
    (2 E F), for each modality's tokens through its stack and all L tokens through the fusion
    (a multiway layer runs one expert per token). Attention: attention.py's convention (4 D per
    attended pair forward, 3.5x that forward + backward) over the exact non-causal pairs of each
    stack's schedule (`count_pairs`; dense fusion: all L^2). Plus `encoder_flops`.
    """
    e, heads = config.d_model, config.nhead
    per_token = 4 * e * e + 2 * e * config.dim_feedforward
    stacks = [(getattr(config, f"{name}_stack"), n) for name, n in plan.tokens().items()]
    stacks.append((fusion_stack(config, kind, plan.length), plan.length))
    matmuls = pairs = 0
    for stack, n in stacks:
        matmuls += stack.num_layers * per_token * n
        pairs += stack.num_layers * attention_bench.count_pairs(
            n, stack.segment_lengths, stack.dilation_rates, heads, causal=False
        )
    attention = attention_bench.useful_flops(pairs, e // heads, "fwdbwd")
    return batch * (6.0 * matmuls + attention + encoder_flops(config, plan))


# --------------------------------------------------------------------------------------------
# One training step
# --------------------------------------------------------------------------------------------


def make_train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    inputs: dict[str, torch.Tensor],
    labels: torch.Tensor,
    length: int,
    device: torch.device,
) -> Callable[[], torch.Tensor]:
    """A callable running one training step; it returns the loss (detached).

    Forward under autocast, cross-entropy in fp32 over the logits (B, K) against `labels` (B,),
    backward (outside autocast, as PyTorch recommends), AdamW step, zero_grad. Raises if the
    fused sequence is not `length` tokens long (the plan and the encoders disagree).
    """

    def step() -> torch.Tensor:
        with mixed_precision(device):
            logits, fused = model(inputs)  # (B, K), L
        if fused != length:
            raise RuntimeError(f"the fused sequence holds {fused} tokens, the plan {length}")
        loss = F.cross_entropy(logits.float(), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


@dataclasses.dataclass
class Measurement(longnet_bench.Measurement):
    """longnet.py's measurement, and the attention kernels that refused a call while it ran."""

    kernel_fallbacks: list[str] = dataclasses.field(default_factory=list)


def forget_refused_kernels() -> None:
    """Let every attention kernel try every shape again.

    mmlongnet's kernel chain remembers a kernel that raised for a shape and skips it from then on,
    an out-of-memory error included: without this, a configuration that ran out of memory inside
    cuDNN could leave its retry with checkpointing (same shapes) on a slower kernel.
    """
    from mmlongnet.attention import kernels

    kernels.SELECTOR.clear()


def measure_config(
    config: MMLongNetConfig,
    plan: InputPlan,
    kind: str,
    batch: int,
    checkpointing: bool,
    steps: int,
    device: torch.device,
) -> Measurement:
    """Build the model, AdamW, inputs and labels of one configuration and time its training steps.

    Everything it allocates is local: it is freed when this returns or raises. Peak memory is
    `torch.cuda.max_memory_allocated` (the caller resets the statistics first): parameters,
    gradients, optimizer state, raw inputs and activations. The kernels' fallback warnings
    ("the cudnn kernel refused ...") are kept in the measurement.
    """
    forget_refused_kernels()
    model = build_model(config, kind, plan.length, checkpointing, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, fused=device.type == "cuda")
    inputs = make_inputs(config, plan, batch, device)
    generator = torch.Generator(device=device).manual_seed(SEED + 1)
    labels = torch.randint(NUM_CLASSES, (batch,), generator=generator, device=device)  # (B,)
    step = make_train_step(model, optimizer, inputs, labels, plan.length, device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        times_ms, loss = longnet_bench.time_steps(step, device, steps)
    fallbacks = sorted({str(w.message)[:300] for w in caught if "refused" in str(w.message)})
    for message in fallbacks:
        print(f"warning: {message}", file=sys.stderr)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return Measurement(times_ms, loss, peak, kernel_fallbacks=fallbacks)


# --------------------------------------------------------------------------------------------
# Rows and the sweep
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Row(longnet_bench.Row):
    """longnet.py's row (kind "dilated" | "dense-fusion", n = L the realized fused length) and
    what the sample held."""

    target: int = 0  # the fused length asked for (--sizes)
    tokens: dict | None = None  # tokens per modality: {"text": N_t, "audio": N_a, "video": N_v}
    inputs: dict | None = None  # raw sizes: text ids, audio samples and seconds, video frames and shape
    input_gib: float | None = None  # raw inputs of the batch
    fusion_segments: list[int] | None = None  # the fusion stack's segment lengths (dense: [L])
    kernel_fallbacks: list[str] | None = None  # attention calls a kernel refused (next kernel used)


class Sweep(longnet_bench.Sweep):
    """longnet.py's sweep over (kind, fused length): same budget, checkpointing fallback and files."""

    baseline = "dense-fusion"

    def __init__(self, args: argparse.Namespace, meta: dict, json_path: Path | None, dry_run: bool):
        super().__init__(args, meta, json_path, dry_run)
        self.config = make_config(args)
        self.plans: dict[int, InputPlan] = {}
        self.fallbacks: list[str] = []  # of the configuration being measured

    def plan(self, target: int) -> InputPlan:
        """The inputs of a fused length (computed once)."""
        if target not in self.plans:
            self.plans[target] = plan_inputs(self.config, target)
        return self.plans[target]

    def new_row(self, kind: str, n: int) -> Row:
        plan, batch = self.plan(n), self.args.batch
        return Row(
            kind, plan.length, batch, "ok", step_flops(self.config, plan, kind, batch), target=n,
            tokens=plan.tokens(), inputs=plan.raw(), input_gib=plan.input_bytes(batch) / 2**30,
            fusion_segments=list(fusion_stack(self.config, kind, plan.length).segment_lengths),
        )  # fmt: skip

    def measure(self, kind: str, n: int, checkpointing: bool) -> Measurement:
        args = self.args
        result = measure_config(
            self.config, self.plan(n), kind, args.batch, checkpointing, args.steps, self.device
        )
        self.fallbacks = list(getattr(result, "kernel_fallbacks", []))
        return result

    def _record(self, row: Row) -> Row:
        """Keep a row (with the kernel fallbacks of its measured run), print and save it."""
        if row.status == "ok":
            row.kernel_fallbacks = self.fallbacks or None
        self.fallbacks = []
        return super()._record(row)

    def describe(self, row: Row) -> str:
        return describe(row)


def describe(row: Row) -> str:
    """One printed line for a row: what was measured and, if it ran, how fast."""
    tokens = row.tokens or {}
    raw = row.inputs or {}
    what = (
        f"{row.kind:<12} L={row.n:>7} (text {tokens.get('text', '?')}, audio {tokens.get('audio', '?')} = "
        f"{raw.get('audio_seconds', 0) / 60:.1f} min, video {tokens.get('video', '?')} = "
        f"{raw.get('video_frames', '?')} frames; inputs {cell(row.input_gib, '.2f')} GiB) B={row.batch}"
    )
    if row.status != "ok":
        return f"{what}  {row.status}" + (f" ({row.error})" if row.error else "")
    checkpointing = "checkpointing" if row.checkpointing else "no checkpointing"
    return (
        f"{what}  {row.ms:9.1f} ms  {row.tokens_per_s:9.0f} tokens/s  {row.tflops:6.1f} TFLOP/s"
        f"  peak {cell(row.peak_gib, '.1f')} GiB  loss {row.loss:.3f}  ({checkpointing}, {row.runs} runs)"
    )


# --------------------------------------------------------------------------------------------
# Output: markdown, plot
# --------------------------------------------------------------------------------------------


def sort_key(row: Row) -> tuple:
    """Rows in reading order: by fused length, then batch, then dilated before dense fusion."""
    return (row.target or row.n, row.batch, KINDS.index(row.kind) if row.kind in KINDS else len(KINDS))


def caption(meta: dict) -> str:
    """One line saying what a step is, for the table and the plot."""
    model = meta.get("model", {})
    mix = " / ".join(f"{name} {share:.0%}" for name, share in meta.get("mix", {}).items())
    return (
        f"MMLongNet ({model.get('name', '?')}) E={model.get('d_model', '?')}, H={model.get('nhead', '?')}, "
        f"{model.get('stack_layers', '?')}-layer modality stacks, {model.get('fusion_layers', '?')}-layer "
        f"fusion; tokens {mix}; B={meta.get('batch', 1)}; {meta.get('precision', '?')}; "
        f"{meta.get('device', '?')}"
    )


def markdown_table(rows: list[Row]) -> str:
    """A markdown table of the results, one line per configuration. `dilated / dense` = the dilated
    model's tokens/s over the dense-fusion model's at the same L (both measured in this run)."""
    lines = [
        "| fusion | L | text | audio | video | checkpointing | step ms | tokens/s | model TFLOP/s | peak GiB "
        "| dilated / dense |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=sort_key):
        tokens = r.tokens or {}
        ms = cell(r.ms, ".1f") if r.status == "ok" else r.status
        checkpointing = (
            "-" if r.checkpointing is None or r.status != "ok" else "yes" if r.checkpointing else "no"
        )
        counts = " | ".join(f"{tokens[m]:,}" if m in tokens else "-" for m in ("text", "audio", "video"))
        lines.append(
            f"| {r.kind} | {r.n:,} | {counts} | {checkpointing} | {ms} | {cell(r.tokens_per_s, ',.0f')} | "
            f"{cell(r.tflops, '.1f')} | {cell(r.peak_gib, '.1f')} | {cell(r.ratio, '.2f')} |"
        )
    return "\n".join(lines)


def plot_results(meta: dict, rows: list[Row], path: Path) -> None:
    """longnet.py's two panels (tokens/s and peak memory against L), one line per fusion kind."""
    longnet_bench.plot_results(
        meta, rows, path, kinds=KINDS, styles=STYLES, title=caption(meta),
        xlabel="fused sequence length L (tokens)",
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def run_metadata(args: argparse.Namespace) -> dict:
    """Device, library versions, command line, date and settings of this run."""
    device = torch.device(args.device)
    config = make_config(args)
    return environment(device) | {
        "model": {
            "name": "tiny" if args.tiny else "base",
            "d_model": config.d_model,
            "nhead": config.nhead,
            "stack_layers": config.text_stack.num_layers,
            "fusion_layers": config.fusion_stack.num_layers,
            "audio_conv_channels": config.audio.conv_channels or config.audio.embed_dim,
            "config": dataclasses.asdict(config),
        },
        "mix": MIX,
        "inputs": "text: random byte ids; audio: 0.1 * N(0, 1) at the encoder's rate; video: uniform in "
        "[-1, 1]; generated on the device, every sample full length",
        "kinds": {
            "dilated": "the fusion stack as configured",
            "dense-fusion": "fusion stack with one segment of L tokens at rate 1 (dense attention)",
        },
        "num_classes": NUM_CLASSES,
        "batch": args.batch,
        "precision": ("bf16 autocast, fp32 master weights, fp32 loss" if device.type == "cuda" else "fp32"),
        "step": "forward, linear head on the pooled embedding, fp32 cross-entropy, backward, AdamW step, "
        "zero_grad",
        "optimizer": {"name": "AdamW", "lr": LEARNING_RATE, "fused": device.type == "cuda"},
        "warmup_steps": longnet_bench.WARMUP_STEPS,
        "timing": "host time between device synchronisations, median of the timed steps",
        "seed": SEED,
        "args": {key: value for key, value in vars(args).items() if key not in ("out", "plot_only")}
        | {"out": str(args.out)},
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    parser = argparse.ArgumentParser(
        description="Benchmark a multimodal LongNet training step, dilated against dense fusion."
    )
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=None,
        metavar="L",
        help="fused sequence lengths (default: 16384 65536 262144; with --tiny 256 512)",
    )
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS, help="fusion kinds")
    parser.add_argument("--batch", type=int, default=1, help="B, samples per step (default: 1)")
    parser.add_argument(
        "--steps",
        type=int,
        default=5,
        help=f"timed steps after {longnet_bench.WARMUP_STEPS} warm-up steps; {longnet_bench.LONG_STEP_RUNS} "
        f"when a step takes over {longnet_bench.LONG_STEP_S:g} s (default: 5)",
    )
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --tiny)")
    parser.add_argument("--tiny", action="store_true", help="MMLongNetConfig.tiny() for smoke tests")
    parser.add_argument(
        "--audio-conv-channels",
        type=int,
        default=None,
        metavar="C",
        help="channels of the audio subsampling convolutions (default: the encoder's, E)",
    )
    parser.add_argument("--quick", action="store_true", help="smoke test: L in {16K, 64K}")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="directory")
    parser.add_argument("--tag", default=None, help="added to the file names (default: the GPU's name)")
    parser.add_argument(
        "--time-budget",
        type=float,
        default=480.0,
        help="seconds; a kind whose next size would end past this is skipped (default: 480)",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the plan and an estimated runtime")
    parser.add_argument("--plot-only", type=Path, metavar="JSON", help="redraw PNG and table from a JSON")
    args = parser.parse_args(argv)
    if args.sizes is None:
        args.sizes = list(QUICK_SIZES if args.quick else TINY_SIZES if args.tiny else DEFAULT_SIZES)
    if args.batch < 1:
        parser.error(f"--batch must be >= 1, got {args.batch}")
    if args.audio_conv_channels is not None and args.audio_conv_channels < 1:
        parser.error(f"--audio-conv-channels must be >= 1, got {args.audio_conv_channels}")
    if args.steps < longnet_bench.LONG_STEP_RUNS:
        parser.error(f"--steps must be >= {longnet_bench.LONG_STEP_RUNS}, got {args.steps}")
    if torch.device(args.device).type not in ("cuda", "cpu"):
        parser.error(f"--device must be cuda or cpu, got {args.device!r}")
    if args.plot_only is None:
        config = make_config(args)
        for size in args.sizes:
            try:
                plan_inputs(config, size)
            except ValueError as exc:
                parser.error(f"--sizes {size}: {exc}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark (or --plot-only / --dry-run); return the exit status."""
    args = parse_args(argv)
    if args.plot_only is not None:
        meta, rows = load_json(args.plot_only, Row)
        longnet_bench.fill_ratios(rows, Sweep.baseline)
        png = png_path(args.plot_only)
        plot_results(meta, rows, png)
        print(caption(meta) + "\n\n" + markdown_table(rows))
        print(f"\nplot: {png}")
        return 0
    if args.device.startswith("cuda") and not torch.cuda.is_available() and not args.dry_run:
        print(
            "benchmarks/multimodal.py needs a CUDA GPU (torch.cuda.is_available() is False); --device cpu "
            "--tiny runs a tiny model on the CPU, --plot-only JSON redraws saved results and --dry-run "
            "prints the plan without one.",
            file=sys.stderr,
        )
        return 1
    meta = run_metadata(args)
    json_path = args.out / f"multimodal_{args.tag or longnet_bench.default_tag(args)}.json"
    sweep = Sweep(args, meta, json_path, dry_run=args.dry_run)
    print(f"# {caption(meta)}; torch {meta['torch']}, cuDNN {meta['cudnn']}", flush=True)
    try:
        longnet_bench.run_sweep(sweep, args.sizes, args.kinds)
    except KeyboardInterrupt:
        print("interrupted: saving what was measured", file=sys.stderr)
    if args.dry_run:
        print(
            f"\n{len(sweep.rows)} configurations, estimated {sweep.estimated / 60:.1f} min at "
            f"{longnet_bench.ASSUMED_TFLOPS:.0f} model TFLOP/s (more where a configuration first runs out "
            "of memory)"
        )
        return 0
    meta["wall_seconds"] = round(sweep.elapsed(), 1)
    finish_sweep(json_path, meta, sweep.rows, plot_results, markdown_table(sweep.rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
