"""A small Qwen3 model with random weights and a locally trained tokenizer, built on the spot."""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast, get_args

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models import qwen3
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from ringserve.errors import RingserveError

logger = logging.getLogger(__name__)

DemoSize = Literal["tiny", "tiny-deep", "demo"]

# Bump when the files a build writes change, so ensure_demo_model rebuilds older models.
BUILD_FORMAT = 3
MARKER_NAME = "ringserve_demo.json"
WEIGHTS_NAME = "model.safetensors"
CORPUS_PATH = Path(__file__).with_name("demo_corpus.txt")

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
# Tool calls and thinking as Qwen3 writes them: special tokens, so that mlx-lm finds its
# `json_tools` parser and its thinking markers in this tokenizer as in a real Qwen3's.
TOOL_CALL, TOOL_CALL_END = "<tool_call>", "</tool_call>"
THINK, THINK_END = "<think>", "</think>"
TOOL_RESPONSE, TOOL_RESPONSE_END = "<tool_response>", "</tool_response>"
SPECIAL_TOKENS = [
    ENDOFTEXT,
    IM_START,
    IM_END,
    TOOL_CALL,
    TOOL_CALL_END,
    THINK,
    THINK_END,
    TOOL_RESPONSE,
    TOOL_RESPONSE_END,
]
MAX_POSITIONS = 32768

# Qwen3's chat format, shortened: tools in the system turn, calls as JSON between <tool_call>
# markers, tool results as user turns, and thinking the model opens itself (with
# `enable_thinking` false the template writes an empty think block).
CHAT_TEMPLATE = """\
{%- if tools %}
{{- '<|im_start|>system\\n' }}
{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}
{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n' }}
{{- 'You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}
{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}
{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and ' }}
{{- 'arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n' }}
{{- '{"name": <function-name>, "arguments": <args-json-object>}\\n</tool_call><|im_end|>\\n' }}
{%- elif messages[0].role == 'system' %}
{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
{%- if message.role == 'system' and loop.first %}
{%- elif message.role == 'assistant' %}
{{- '<|im_start|>assistant\\n' }}
{%- if message.reasoning_content %}
{{- '<think>\\n' + message.reasoning_content + '\\n</think>\\n\\n' }}
{%- endif %}
{{- message.content or '' }}
{%- for tool_call in message.tool_calls or [] %}
{%- if tool_call.function %}{%- set tool_call = tool_call.function %}{%- endif %}
{{- '\\n<tool_call>\\n{"name": "' + tool_call.name + '", "arguments": ' }}
{{- tool_call.arguments if tool_call.arguments is string else tool_call.arguments | tojson }}
{{- '}\\n</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>\\n' }}
{%- elif message.role == 'tool' %}
{{- '<|im_start|>user\\n<tool_response>\\n' + message.content }}
{{- '\\n</tool_response><|im_end|>\\n' }}
{%- else %}
{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\\n' }}
{%- if enable_thinking is defined and enable_thinking is false %}
{{- '<think>\\n\\n</think>\\n\\n' }}
{%- endif %}
{%- endif %}
"""


@dataclass(frozen=True)
class DemoSpec:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int


# Heads, KV heads and the MLP width divide by 1, 2 and 4 ranks for tensor parallelism.
SPECS: dict[str, DemoSpec] = {
    "tiny": DemoSpec(128, 2, 8, 4, 16, 384, 1024),
    # The tiny model with enough layers to split a pipeline unevenly.
    "tiny-deep": DemoSpec(128, 8, 8, 4, 16, 384, 1024),
    "demo": DemoSpec(512, 8, 8, 4, 64, 2048, 2048),
}


def model_dir_name(size: DemoSize) -> str:
    return f"ringserve-{size}"


def train_tokenizer(vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        # Every byte is in the vocabulary, so any UTF-8 text encodes and decodes losslessly.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = CORPUS_PATH.read_text(encoding="utf-8").splitlines()
    tokenizer.train_from_iterator(lines, trainer)
    return tokenizer


def tokenizer_config() -> dict[str, Any]:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": IM_END,
        "pad_token": ENDOFTEXT,
        "unk_token": None,
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": MAX_POSITIONS,
        "chat_template": CHAT_TEMPLATE,
    }


def model_config(spec: DemoSpec, vocab_size: int, eos_token_id: int) -> dict[str, Any]:
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "hidden_size": spec.hidden_size,
        "num_hidden_layers": spec.num_layers,
        "intermediate_size": spec.intermediate_size,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim,
        "vocab_size": vocab_size,
        "max_position_embeddings": MAX_POSITIONS,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "hidden_act": "silu",
        "attention_bias": False,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "bos_token_id": None,
        "eos_token_id": eos_token_id,
    }


def init_std(name: str, shape: tuple[int, ...]) -> float | None:
    if name.endswith("norm.weight"):
        return None
    # Unit-scale embeddings and head keep greedy decoding from collapsing onto one token.
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return 1.0
    # Twice the usual 1/sqrt(fan_in): stronger mixing measured fewer loops in greedy output.
    return 2.0 * float(shape[-1]) ** -0.5


def random_weights(config: dict[str, Any], seed: int) -> dict[str, mx.array]:
    model = qwen3.Model(qwen3.ModelArgs.from_dict(config))
    params = cast(list[tuple[str, mx.array]], tree_flatten(model.parameters()))
    shapes = {name: tuple(param.shape) for name, param in params}
    # NumPy's generator gives the same float32 stream on every platform; MLX's sampling of a
    # normal distribution may differ between CPU, Metal and CUDA kernels.
    rng = np.random.default_rng(seed)
    weights = {}
    for name in sorted(shapes):
        shape = shapes[name]
        std = init_std(name, shape)
        if std is None:
            values = np.ones(shape, dtype=np.float32)
        else:
            values = rng.standard_normal(shape, dtype=np.float32) * np.float32(std)
        weights[name] = mx.array(values)
    return weights


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_weights(model_dir: Path, weights: dict[str, mx.array]) -> None:
    mx.save_safetensors(str(model_dir / WEIGHTS_NAME), weights, metadata={"format": "mlx"})
    index = {
        "metadata": {"total_size": sum(w.nbytes for w in weights.values())},
        "weight_map": {name: WEIGHTS_NAME for name in sorted(weights)},
    }
    write_json(model_dir / f"{WEIGHTS_NAME}.index.json", index)


def write_model_files(model_dir: Path, size: DemoSize, seed: int) -> int:
    spec = SPECS[size]
    tokenizer = train_tokenizer(spec.vocab_size)
    tokenizer.save(str(model_dir / "tokenizer.json"))
    write_json(model_dir / "tokenizer_config.json", tokenizer_config())

    eos_token_id = tokenizer.token_to_id(IM_END)
    if eos_token_id is None:
        raise RingserveError(f"The trained tokenizer lacks the end token {IM_END}")
    config = model_config(spec, tokenizer.get_vocab_size(), eos_token_id)
    write_json(model_dir / "config.json", config)

    weights = random_weights(config, seed)
    write_weights(model_dir, weights)
    write_json(model_dir / MARKER_NAME, {"format": BUILD_FORMAT, "size": size, "seed": seed})
    return sum(w.size for w in weights.values())


def replace_dir(new_dir: Path, out_dir: Path) -> None:
    # A directory cannot be renamed over a non-empty one: move the old one aside first.
    old_dir = None
    if out_dir.exists():
        old_dir = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.old-"))
        out_dir.rename(old_dir / out_dir.name)
    new_dir.rename(out_dir)
    if old_dir is not None:
        shutil.rmtree(old_dir)


def build_demo_model(out_dir: Path, size: DemoSize, seed: int = 0) -> Path:
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        tmp_dir.chmod(0o755)  # mkdtemp makes it private; the model is ordinary readable data
        num_params = write_model_files(tmp_dir, size, seed)
        replace_dir(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    logger.info("Wrote the %s demo model (%d parameters) to %s", size, num_params, out_dir)
    return out_dir


def is_current(model_dir: Path, size: DemoSize) -> bool:
    try:
        marker = json.loads((model_dir / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (
        isinstance(marker, dict)
        and marker.get("format") == BUILD_FORMAT
        and marker.get("size") == size
        and (model_dir / WEIGHTS_NAME).is_file()
    )


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_demo_model(models_dir: Path, size: DemoSize) -> Path:
    model_dir = Path(models_dir) / model_dir_name(size)
    if is_current(model_dir, size):
        return model_dir
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(model_dir.parent / f".{model_dir.name}.lock"):
        # Another process may have finished the build while this one waited for the lock.
        if not is_current(model_dir, size):
            logger.info("Building the %s demo model in %s", size, model_dir)
            build_demo_model(model_dir, size)
    return model_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ringserve.model.demo",
        description="Write a small random-weight model in mlx-lm format; nothing is downloaded.",
    )
    parser.add_argument("--size", choices=get_args(DemoSize), default="tiny")
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        help="directory that holds the models; the model goes to OUT/ringserve-SIZE",
    )
    parser.add_argument("--force", action="store_true", help="rebuild even when up to date")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )

    if args.force:
        path = build_demo_model(args.out / model_dir_name(args.size), args.size)
    else:
        path = ensure_demo_model(args.out, args.size)
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
