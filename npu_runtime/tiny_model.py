"""Build a tiny Qwen3-MoE checkpoint locally, deterministically, with no hub download.

The model has random weights (it talks nonsense) but the real architecture vLLM serves: attention,
a router and packed experts per layer. It is what development, CI and the first trial run on CPU.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

MARKER = "dpserve-model.json"

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_WORDS = (
    "the a an of to and in on for with from by at as is are was were be been model expert token layer rank "
    "router prefill decode batch cache memory serving request stream latency throughput cluster node device "
    "ascend gpu cpu parallel data balance schedule placement weight load all gather reduce scatter send "
    "receive step wave queue running waiting admit gate policy window slot replica moe attention head hidden "
    "north south east west river mountain city music light dark quick brown fox jumps over lazy dog hello "
    "world what how why when where who which one two three four five six seven eight nine ten"
).split()


@dataclass(frozen=True)
class TinyMoESpec:
    """Shape of the tiny model; the defaults give about 9M parameters."""

    seed: int = 0
    vocab_size: int = 2048
    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 64  # must be a head size the CPU attention supports
    num_experts: int = 16
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 128
    max_position_embeddings: int = 2048
    dtype: str = "float32"

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


def default_cache_dir() -> Path:
    """`$DPSERVE_CACHE`, else `$XDG_CACHE_HOME/dpserve`, else `~/.cache/dpserve`."""
    if os.environ.get("DPSERVE_CACHE"):
        return Path(os.environ["DPSERVE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dpserve"


def default_model_dir(spec: TinyMoESpec | None = None) -> Path:
    spec = spec or TinyMoESpec()
    return default_cache_dir() / "models" / f"tiny-qwen3-moe-{spec.fingerprint()}"


def _corpus(seed: int, lines: int = 4000) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        n = rng.randint(4, 16)
        words = [rng.choice(_WORDS) for _ in range(n)]
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 9999)))
        out.append(" ".join(words).capitalize() + rng.choice([".", "?", "!", ","]))
    return out


def _build_tokenizer(spec: TinyMoESpec, out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(spec.seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
        additional_special_tokens=["<|im_start|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = spec.max_position_embeddings
    fast.save_pretrained(out)


def build_tiny_moe(
    out: Path | str | None = None,
    spec: TinyMoESpec | None = None,
    force: bool = False,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Build (or reuse) the tiny MoE checkpoint at `out` and return its directory.

    The result is a HuggingFace-format directory: `config.json`, `model.safetensors`, tokenizer files
    with a chat template, and a marker holding the spec. Same spec -> same bytes.
    """
    spec = spec or TinyMoESpec()
    out = Path(out) if out is not None else default_model_dir(spec)
    marker = out / MARKER
    if not force and marker.exists():
        try:
            if json.loads(marker.read_text()).get("fingerprint") == spec.fingerprint():
                return out
        except (OSError, ValueError):
            pass

    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    say = progress or (lambda _msg: None)
    say("training the byte-level BPE tokenizer")
    _build_tokenizer(spec, tmp)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tmp)
    eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")

    config = Qwen3MoeConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.moe_intermediate_size * 2,
        moe_intermediate_size=spec.moe_intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        head_dim=spec.head_dim,
        num_experts=spec.num_experts,
        num_experts_per_tok=spec.num_experts_per_tok,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        norm_topk_prob=True,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=False,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        bos_token_id=None,
        torch_dtype=spec.dtype,
    )
    say("initialising weights")
    torch.manual_seed(spec.seed)
    model = Qwen3MoeForCausalLM(config).to(getattr(torch, spec.dtype))
    model.generation_config.eos_token_id = eos_id
    model.generation_config.pad_token_id = pad_id
    say("writing safetensors")
    model.save_pretrained(tmp, safe_serialization=True)
    (tmp / MARKER).write_text(json.dumps({"fingerprint": spec.fingerprint(), "spec": asdict(spec)}, indent=2))

    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    return out
