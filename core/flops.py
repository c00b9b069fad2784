"""LoRA-correct training FLOPs and MFU. Pure arithmetic on a model config: no torch import.

A frozen base weight W (out x in) costs, per token, 2*out*in FLOPs in the forward and 2*out*in in the
backward for the input gradient only: its weight gradient is never computed. A trainable LoRA pair
(A: r x in, B: out x r) costs 2*r*(in+out) forward and 4*r*(in+out) backward (input and weight gradient).
Causal attention (QK^T and AV) costs 4*d*L*(L+1)/2 per layer per sequence of length L forward, twice that
backward. Activation recomputation adds one more forward of the decoder layers (not of the LM head).

MFU counts model FLOPs (no recomputation) over the chip's dense bf16 peak; HFU would count the recompute.
For the Llama-3.1-8B shape this is ~30 GFLOP per token: 2 FLOPs per multiply-add x 2 (forward, input gradient)
x ~7.5 B parameters in linear layers (tests/test_bench_memory.py::test_lora_flops_llama8b).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Dense bf16 tensor-core peaks (datasheet, no sparsity), TFLOP/s. Matched by substring of the device name.
PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "H800": 989.4, "H20": 148.0, "GH200": 989.4,
                    "B200": 2250.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0, "A10G": 70.0, "L4": 121.0,
                    "RTX 4090": 165.2, "A6000": 154.8}


def peak_tflops(device_name: str) -> float | None:
    """The chip's dense bf16 peak, or None when unknown (then MFU is not reported)."""
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if key in device_name:
            return PEAK_BF16_TFLOPS[key]
    return None


@dataclass(frozen=True, kw_only=True, slots=True)
class Shape:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    head_dim: int | None = None

    @classmethod
    def from_config(cls, cfg: object | Mapping) -> "Shape":
        get = cfg.get if isinstance(cfg, Mapping) else (lambda k, d=None: getattr(cfg, k, d))
        return cls(hidden_size=get("hidden_size"), intermediate_size=get("intermediate_size"),
                   num_hidden_layers=get("num_hidden_layers"), num_attention_heads=get("num_attention_heads"),
                   num_key_value_heads=get("num_key_value_heads") or get("num_attention_heads"),
                   vocab_size=get("vocab_size"), head_dim=get("head_dim", None))

    def projections(self) -> dict[str, tuple[int, int]]:
        """name -> (in_features, out_features) of one decoder layer's linear maps."""
        d, f = self.hidden_size, self.intermediate_size
        hd = self.head_dim or d // self.num_attention_heads
        q, kv = self.num_attention_heads * hd, self.num_key_value_heads * hd
        return {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
                "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}

    def linear_params(self) -> int:
        """Decoder linear weights plus the LM head (what every token multiplies)."""
        per_layer = sum(i * o for i, o in self.projections().values())
        return per_layer * self.num_hidden_layers + self.hidden_size * self.vocab_size

    def lora_params(self, r: int, targets: Iterable[str] = PROJECTIONS) -> int:
        proj = self.projections()
        return r * sum(sum(proj[t]) for t in targets if t in proj) * self.num_hidden_layers


def _targets(targets: Iterable[str] | str) -> tuple[str, ...]:
    return PROJECTIONS if targets in ("all-linear", None) else tuple(targets)


def train_flops_terms(shape: Shape, *, lora_r: int | None, lora_targets: Iterable[str] | str = PROJECTIONS,
                      recompute: bool = False) -> tuple[float, float]:
    """(FLOPs per token, FLOPs per causal attention pair) of one forward+backward: a batch of sequences of
    lengths L_i costs per_token x sum(L_i) + per_pair x sum(L_i (L_i + 1) / 2). The trainer counts both sums
    on the device (trainer/metrics.py count_tokens), so the MFU it logs covers every processed token at its
    real sequence length."""
    n_lin = shape.linear_params()
    d_attn = shape.num_attention_heads * (shape.head_dim or shape.hidden_size // shape.num_attention_heads)
    head = shape.hidden_size * shape.vocab_size
    if lora_r is None:
        per_token = 6 * n_lin
        fwd_layers = 2 * (n_lin - head)
    else:
        p_lora = shape.lora_params(lora_r, _targets(lora_targets))
        per_token = 2 * (n_lin + p_lora) + 2 * n_lin + 4 * p_lora
        fwd_layers = 2 * (n_lin - head + p_lora)
    attn_fwd = 4 * d_attn * shape.num_hidden_layers  # QK^T and AV over one causal pair, every layer
    per_pair = 3 * attn_fwd
    if recompute:
        per_token += fwd_layers
        per_pair += attn_fwd
    return float(per_token), float(per_pair)


def train_flops(shape: Shape, seq_lens: Iterable[int], *, lora_r: int | None,
                lora_targets: Iterable[str] | str = PROJECTIONS, recompute: bool = False) -> float:
    """FLOPs of one forward+backward over sequences of the given (unpadded) lengths.

    lora_r None means full fine-tuning (weight gradients of every linear: 6 FLOPs/param/token)."""
    lens = list(seq_lens)
    per_token, per_pair = train_flops_terms(shape, lora_r=lora_r, lora_targets=lora_targets, recompute=recompute)
    return float(per_token * sum(lens) + per_pair * sum(L * (L + 1) // 2 for L in lens))


def mfu(flops: float, seconds: float, device_name: str, world_size: int = 1) -> float | None:
    """Model FLOPs utilisation: flops (over all ranks) / (seconds x peak x world_size); None if unknown."""
    peak = peak_tflops(device_name)
    if not peak or seconds <= 0:
        return None
    return flops / seconds / (peak * 1e12 * world_size)
