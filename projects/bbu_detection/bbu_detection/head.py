"""`DetectionHead`: a DETR-style detector reading a VLM's hidden states, with a caption decoder per object.

    language memory = language_adapter(LLM last hidden state)          (B, T, D) -> (B, T, d)
    vision memory   = vision_adapter(vision embeddings of the student image) + 2-D sine position
    memory          = [vision ; language], padding of both masked
    queries         = `num_queries` learned content embeddings, each with a learned reference box
    `decoder_layers` transformer decoder layers; in each, a query attends to the memory with the sine
                       embedding of its reference box's centre (the space the memory positions live in, so
                       attention is local from the first step), and the box head refines the reference:
                       box_l = sigmoid(logit(box_{l-1}) + delta_l) (iterative refinement, Deformable/DAB-DETR)
    per layer       -> boxes (normalised cx, cy, w, h) and objectness logit (heads shared by the layers)
    caption decoder -> description tokens of each matched object, teacher-forced with SHIFTED inputs:
                       position 0 sees a learned BOS, position i the ground-truth token i-1; target token i

The adapters are residual bottlenecks (`x + up(gelu(down(x)))`, D -> D / adapter_ratio -> D, `up` zero-initialised
so an untrained adapter is the identity). Vision embeddings are what the VLM's merger feeds the LLM at the
student image's tokens; their positions come from the image grid (Qwen: `image_grid_thw`), normalised to
[0, 1], so box coordinates and memory positions share one frame whatever size the processor resized to.

Saved as `config.json` (this module's `DetectionHeadConfig`) + `model.safetensors` in one directory
(`final/detection_head/` of a run): `save_detection_head` / `load_detection_head`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from arctic_vl import parse_json

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
#: prior probability of "object" at initialisation (RetinaNet's focal-loss prior)
OBJECTNESS_PRIOR = 0.01


class DetectionSettings(BaseModel):
    """The head's shape, as a config's `model.detection:` section gives it."""

    model_config = ConfigDict(extra="forbid")

    num_queries: int = Field(100, ge=1, description="learned object queries (the most objects an image may have)")
    decoder_layers: int = Field(2, ge=1, description="transformer decoder layers over the memory")
    caption_layers: int = Field(4, ge=1, description="layers of the per-object caption decoder")
    d_model: int = Field(256, ge=8, description="width of the head (queries, memory after the adapters)")
    heads: int = Field(8, ge=1, description="attention heads of both decoders")
    ffn_ratio: int = Field(4, ge=1, description="feed-forward width = ffn_ratio x d_model")
    adapter_ratio: int = Field(8, ge=1, description="bottleneck of the residual adapters: D -> D / adapter_ratio")
    dropout: float = Field(0.0, ge=0, lt=1)
    max_caption_tokens: int = Field(16, ge=2, description="caption tokens per object incl. the end token; longer "
                                    "descriptions are cut (counted in the data stats)")
    tie_caption_embeddings: bool = Field(
        False, description="the caption decoder reads and predicts tokens through the language model's own input "
        "embedding and output layer (projected D <-> d_model) instead of its own vocab x d_model embedding and "
        "output layer (the origin documents' head has its own: the default)")

    @model_validator(mode="after")
    def _heads_divide(self) -> DetectionSettings:
        if self.d_model % self.heads:
            raise ValueError(f"d_model ({self.d_model}) must be a multiple of heads ({self.heads})")
        if self.d_model % 4:
            raise ValueError(f"d_model ({self.d_model}) must be a multiple of 4 (2-D sine positions)")
        return self


class DetectionHeadConfig(DetectionSettings):
    """Everything that rebuilds a head: its settings plus the VLM facts it was built for."""

    hidden_size: int = Field(..., ge=1, description="the LLM's hidden size D")
    vision_size: int = Field(..., ge=1, description="width of the vision embeddings the LLM receives")
    vocab_size: int = Field(..., ge=2, description="caption vocabulary (the VLM tokenizer's)")
    caption_end_id: int = Field(..., ge=0, description="token that ends a caption (the tokenizer's end of turn)")


@dataclass
class CaptionContext:
    """What a caption row reads besides its query state: its sample's memory (N, M, d) with positions and
    padding, and the centre (N, 2) of its query's box (captions attend around their object)."""

    memory: torch.Tensor
    memory_pos: torch.Tensor
    padding: torch.Tensor
    centre: torch.Tensor


@dataclass
class DetectionOutput:
    """Per decoder layer (last = final): boxes (L, B, Q, 4) normalised cxcywh, objectness logits (L, B, Q),
    and the decoder states (L, B, Q, d) the caption decoder reads; plus the memory (B, M, d), its positions and
    padding (B, M), which captions attend to."""

    boxes: torch.Tensor
    logits: torch.Tensor
    states: torch.Tensor
    memory: torch.Tensor | None = None
    memory_pos: torch.Tensor | None = None
    padding: torch.Tensor | None = None

    def caption_context(self, rows: torch.Tensor, queries: torch.Tensor) -> CaptionContext | None:
        """The context of caption rows for (sample, query) pairs; None without a memory.

        Detached: captions read the memory but do not train it (the caption loss reaches the VLM through the
        query states only); with the gradient the captions pulled the memory away from localisation (AP50 0.43
        vs 0.78 on the small CPU config)."""
        if self.memory is None or self.memory_pos is None or self.padding is None:
            return None
        return CaptionContext(self.memory[rows].detach(), self.memory_pos[rows].detach(), self.padding[rows],
                              self.boxes[-1][rows, queries, :2].detach())


class ResidualAdapter(nn.Module):
    """`x + up(gelu(down(norm(x))))`, a residual bottleneck; identity at initialisation (`up` is zero)."""

    def __init__(self, size: int, ratio: int):
        super().__init__()
        bottleneck = max(1, size // ratio)
        self.norm = nn.LayerNorm(size)
        self.down = nn.Linear(size, bottleneck)
        self.up = nn.Linear(bottleneck, size)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`x + up(gelu(down(norm(x))))`, same shape as `x`."""
        return x + self.up(F.gelu(self.down(self.norm(x))))


#: frequencies of the sine positions, in cycles per image side: coarse (where in the image) to fine (which token)
SINE_CYCLES = (0.25, 16.0)


def sine_position(coords: torch.Tensor, d_model: int) -> torch.Tensor:
    """(..., k) normalised coordinates in [0, 1] -> (..., d_model) sine/cosine features, d_model / k per coordinate
    at geometric frequencies over `SINE_CYCLES` (the DETR embedding with a range suited to normalised inputs).
    The dot product of two embeddings peaks where the coordinates agree: position-to-position attention."""
    k = coords.shape[-1]
    per = d_model // k
    pairs = per // 2
    lo, hi = SINE_CYCLES
    cycles = lo * (hi / lo) ** (torch.arange(pairs, device=coords.device, dtype=torch.float32) / max(pairs - 1, 1))
    angle = coords[..., None].float() * 2 * math.pi * cycles  # (..., k, pairs)
    feats = torch.cat([angle.sin(), angle.cos()], dim=-1).flatten(-2)  # (..., k * 2 * pairs)
    if feats.shape[-1] < d_model:
        feats = torch.nn.functional.pad(feats, (0, d_model - feats.shape[-1]))
    return feats


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """logit(x), clamped away from 0 and 1."""
    x = x.clamp(eps, 1 - eps)
    return torch.log(x / (1 - x))


def anchor_grid(n: int) -> torch.Tensor:
    """(n, 4) initial reference boxes: centres on a grid over the image, sides 1/sqrt(n) (at most 0.5)."""
    side = math.ceil(math.sqrt(n))
    centres = [((c + 0.5) / side, (r + 0.5) / side) for r in range(side) for c in range(side)][:n]
    size = min(0.5, 1.0 / side)
    return torch.tensor([[x, y, size, size] for x, y in centres], dtype=torch.float32)


class DecoderLayer(nn.Module):
    """Pre-norm DETR decoder layer: query positions added to queries and keys, memory positions to keys."""

    def __init__(self, d: int, heads: int, ffn: int, dropout: float):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(d, ffn), nn.GELU(), nn.Dropout(dropout), nn.Linear(ffn, d))
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.drop = nn.Dropout(dropout)

    def forward(self, tgt: torch.Tensor, query_pos: torch.Tensor, spatial: torch.Tensor, memory: torch.Tensor,
                memory_pos: torch.Tensor, memory_padding: torch.Tensor) -> torch.Tensor:
        """`query_pos`: the queries' box embedding (self-attention); `spatial`: the sine embedding of their
        reference centres, added to the cross-attention queries as `memory_pos` is to its keys."""
        t = self.norm1(tgt)
        q = t + query_pos
        tgt = tgt + self.drop(self.self_attn(q, q, t, need_weights=False)[0])
        t = self.norm2(tgt)
        tgt = tgt + self.drop(self.cross_attn(t + spatial, memory + memory_pos, memory,
                                              key_padding_mask=memory_padding, need_weights=False)[0])
        return tgt + self.drop(self.ffn(self.norm3(tgt)))


class CaptionDecoder(nn.Module):
    """Predicts an object's description from its query state: a causal transformer decoder over the caption
    tokens that cross-attends to the (projected) query state.

    Shifted teacher forcing: position 0 reads a learned BOS embedding, position i the ground-truth token i-1,
    and the logits at position i predict token i; the last input token is never read.
    """

    def __init__(self, c: DetectionHeadConfig):
        super().__init__()
        d = c.d_model
        self.tied = c.tie_caption_embeddings
        #: with `tie_caption_embeddings`: [the LM's input embedding, its output layer], set by `tie_to`; a list, so
        #: they stay the VLM's modules (not this head's parameters, not in its state dict)
        self.lm_modules: list[nn.Module] = []
        if self.tied:
            self.embed_in = nn.Linear(c.hidden_size, d, bias=False)
            self.embed_out = nn.Linear(d, c.hidden_size, bias=False)
        else:
            self.embed = nn.Embedding(c.vocab_size, d)
        self.bos = nn.Embedding(1, d)
        self.pos = nn.Embedding(c.max_caption_tokens, d)
        self.query = nn.Linear(d, d)
        layer = nn.TransformerDecoderLayer(d, c.heads, c.ffn_ratio * d, c.dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.decoder = nn.TransformerDecoder(layer, c.caption_layers, norm=nn.LayerNorm(d))
        if not self.tied:
            self.head = nn.Linear(d, c.vocab_size)
        nn.init.normal_(self.bos.weight, std=0.02)

    def _lm(self) -> tuple[nn.Module, nn.Module]:
        if len(self.lm_modules) != 2:
            raise RuntimeError("tie_caption_embeddings: the head is not tied to a language model (tie_to)")
        return self.lm_modules[0], self.lm_modules[1]

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """(N, L) token ids -> (N, L, d) caption decoder inputs (module calls only: ZeRO-3 gathers in them)."""
        if not self.tied:
            return self.embed(ids)
        embed, _ = self._lm()
        return self.embed_in(embed(ids).to(self.embed_in.weight.dtype))

    def logits(self, out: torch.Tensor) -> torch.Tensor:
        """(N, L, d) decoder states -> (N, L, vocab) logits."""
        if not self.tied:
            return self.head(out)
        _, lm_head = self._lm()
        return lm_head(self.embed_out(out).to(lm_head.weight.dtype))

    def forward(self, query_states: torch.Tensor, caption_inputs: torch.Tensor,
                context: CaptionContext | None = None) -> torch.Tensor:
        """(N, d), (N, L) token ids -> (N, L, vocab) fp32 logits. With `context`, the caption tokens also attend to
        their sample's memory, their positions carrying the object's centre (so attention starts at the object)."""
        n, length = caption_inputs.shape
        device = caption_inputs.device
        d = query_states.shape[-1]
        tokens = self.embed_tokens(caption_inputs[:, :-1].clamp(min=0))
        bos = self.bos(torch.zeros((n, 1), dtype=torch.long, device=device)).to(tokens.dtype)
        tgt = torch.cat([bos, tokens], dim=1) + self.pos(torch.arange(length, device=device))[None]
        memory = self.query(query_states.to(tgt.dtype))[:, None, :]
        padding = None
        if context is not None:
            tgt = tgt + sine_position(context.centre, d).to(tgt.dtype)[:, None, :]
            memory = torch.cat([memory, (context.memory + context.memory_pos).to(tgt.dtype)], dim=1)
            padding = torch.cat([torch.zeros((n, 1), dtype=torch.bool, device=device), context.padding], dim=1)
        causal = torch.triu(torch.full((length, length), float("-inf"), device=device), diagonal=1)
        out = self.decoder(tgt, memory, tgt_mask=causal.to(tgt.dtype), tgt_is_causal=True,
                           memory_key_padding_mask=padding)
        return self.logits(out).float()


class DetectionHead(nn.Module):
    """See the module docstring. Submodule names matter: the `adapter` LR group is every `*adapter*` parameter."""

    def __init__(self, config: DetectionHeadConfig):
        super().__init__()
        self.config = config
        c = config
        d = c.d_model
        self.language_adapter = ResidualAdapter(c.hidden_size, c.adapter_ratio)
        self.vision_adapter = ResidualAdapter(c.vision_size, c.adapter_ratio)
        self.language_proj = nn.Linear(c.hidden_size, d)
        self.vision_proj = nn.Linear(c.vision_size, d)
        self.memory_type = nn.Embedding(2, d)  # 0 vision, 1 language
        self.query_embed = nn.Embedding(c.num_queries, d)  # content of the learned queries
        self.reference = nn.Embedding(c.num_queries, 4)  # their boxes, as logits
        self.query_pos = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d))
        self.layers = nn.ModuleList(DecoderLayer(d, c.heads, c.ffn_ratio * d, c.dropout)
                                    for _ in range(c.decoder_layers))
        self.norm = nn.LayerNorm(d)
        self.box_head = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d), nn.ReLU(), nn.Linear(d, 4))
        self.objectness_head = nn.Linear(d, 1)
        self.captioner = CaptionDecoder(c)
        self._reset()

    def tie_to(self, vlm: nn.Module) -> DetectionHead:
        """With `tie_caption_embeddings`: captions go through `vlm`'s input embedding and output layer (its own
        modules, trained by the `llm` group); without: nothing to do. Returns self."""
        if self.config.tie_caption_embeddings:
            embed, out = vlm.get_input_embeddings(), vlm.get_output_embeddings()
            if embed is None or out is None:
                raise ValueError(f"tie_caption_embeddings: {type(vlm).__name__} has no input embedding or output "
                                 "layer to tie the caption decoder to")
            self.captioner.lm_modules[:] = [embed, out]
        return self

    def _reset(self) -> None:
        with torch.no_grad():
            self.reference.weight.copy_(inverse_sigmoid(anchor_grid(self.config.num_queries)))
        # the first boxes are the reference boxes (zero refinement); objectness starts at the focal prior
        last = self.box_head[-1]
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        nn.init.constant_(self.objectness_head.bias, -math.log((1 - OBJECTNESS_PRIOR) / OBJECTNESS_PRIOR))

    # ------------------------------------------------------------------------------------ detection
    def forward(self, language: torch.Tensor, language_mask: torch.Tensor, vision: torch.Tensor,
                vision_mask: torch.Tensor, vision_xy: torch.Tensor) -> DetectionOutput:
        """`language` (B, T, D) LLM last hidden state, `language_mask` (B, T) True at real tokens; `vision`
        (B, V, Dv) the student image's embeddings, `vision_mask` (B, V) True at real ones, `vision_xy` (B, V, 2)
        their normalised centres. Every submodule runs once per call, whatever the masks (ZeRO-3)."""
        d = self.config.d_model
        dtype = self.language_proj.weight.dtype
        device = language.device
        # parameters are only read through module calls: ZeRO-3 gathers a module's weights in its forward
        kinds = self.memory_type(torch.tensor([0, 1], device=device))
        lang = self.language_proj(self.language_adapter(language.to(dtype))) + kinds[1]
        vis = self.vision_proj(self.vision_adapter(vision.to(dtype))) + kinds[0]
        memory = torch.cat([vis, lang], dim=1)
        memory_pos = torch.cat([sine_position(vision_xy, d).to(dtype), torch.zeros_like(lang)], dim=1)
        padding = ~torch.cat([vision_mask, language_mask], dim=1).bool()
        b = memory.shape[0]
        queries = torch.arange(self.config.num_queries, device=device)
        tgt = self.query_embed(queries)[None].expand(b, -1, -1)
        reference = self.reference(queries).float().sigmoid()[None].expand(b, -1, -1)
        states, boxes = [], []
        for layer in self.layers:
            spatial = sine_position(reference[..., :2], d).to(dtype)
            query_pos = self.query_pos(sine_position(reference, d).to(dtype))
            tgt = layer(tgt, query_pos, spatial, memory, memory_pos, padding)
            state = self.norm(tgt)
            box = (inverse_sigmoid(reference) + self.box_head(state).float()).sigmoid()
            states.append(state)
            boxes.append(box)
            reference = box.detach()  # each layer refines the last one's boxes; gradients stay per layer
        stacked = torch.stack(states)  # (L, B, Q, d)
        logits = self.objectness_head(stacked).squeeze(-1).float()  # one call for all layers
        return DetectionOutput(torch.stack(boxes), logits, stacked, memory, memory_pos, padding)

    # -------------------------------------------------------------------------------------- captions
    def caption_logits(self, query_states: torch.Tensor, caption_inputs: torch.Tensor,
                       context: CaptionContext | None = None) -> torch.Tensor:
        """(N, d) decoder states of matched queries, (N, L) caption tokens -> (N, L, vocab) logits of each NEXT
        token (see `CaptionDecoder`)."""
        return self.captioner(query_states, caption_inputs, context)

    @torch.no_grad()
    def generate_captions(self, query_states: torch.Tensor, context: CaptionContext | None = None,
                          fixed_steps: bool = False) -> list[list[int]]:
        """Greedy captions (token ids, end token excluded) for (N, d) query states.

        `fixed_steps`: always decode `max_caption_tokens` steps, on a dummy row when N is 0, so every process
        calls the caption decoder equally often (ZeRO-3 gathers its weights in each call)."""
        n = query_states.shape[0]
        if n == 0 and not fixed_steps:
            return []
        if n == 0:
            query_states, context = query_states.new_zeros((1, self.config.d_model)), None
        rows = max(n, 1)
        end = self.config.caption_end_id
        seq = torch.zeros((rows, 1), dtype=torch.long, device=query_states.device)
        done = torch.zeros(rows, dtype=torch.bool, device=query_states.device)
        for _ in range(self.config.max_caption_tokens):
            nxt = self.caption_logits(query_states, seq, context)[:, -1].argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, end), nxt)
            done |= nxt == end
            seq = torch.cat([seq[:, :-1], nxt[:, None], seq.new_zeros((rows, 1))], dim=1)
            if bool(done.all()) and not fixed_steps:
                break
        out = []
        for row in seq[:n, :-1].tolist():
            out.append(row[:row.index(end)] if end in row else row)
        return out


# ----------------------------------------------------------------------------------------- save / load
def save_detection_head(head: DetectionHead, out_dir: str | Path,
                        state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write `config.json` + `model.safetensors` into `out_dir`; returns `out_dir`.

    `state_dict` (gathered weights) overrides the module's.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = state_dict if state_dict is not None else head.state_dict()
    save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(out / WEIGHTS_FILE))
    (out / CONFIG_FILE).write_text(json.dumps(head.config.model_dump(), indent=1) + "\n")
    return out


def read_head_config(path: str | Path) -> DetectionHeadConfig:
    """The `DetectionHeadConfig` saved in a head directory (ValueError naming the file if it is not one)."""
    file = Path(path) / CONFIG_FILE
    try:
        return DetectionHeadConfig.model_validate(parse_json(file.read_bytes()))
    except (OSError, ValueError) as e:
        raise ValueError(f"{file}: not a detection head config ({e})") from None


def load_detection_head(path: str | Path, device: torch.device | str | None = None,
                        dtype: torch.dtype | None = None) -> DetectionHead:
    """Rebuild a saved head exactly (strict: every weight present, no extra one)."""
    from safetensors.torch import load_file

    head = DetectionHead(read_head_config(path))
    head.load_state_dict(load_file(str(Path(path) / WEIGHTS_FILE)), strict=True)
    if dtype is not None:
        head.to(dtype)
    if device is not None:
        head.to(device)
    return head
