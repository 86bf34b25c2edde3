"""A tiny Phi-3 GGUF (a few MB) with llama.cpp's real Phi-3 tokenizer and chat template.

Its weights are not random but wired: attention and FFN are zero, so each position's logits depend
only on its own token, and the output matrix turns that into a fixed chain. Whatever the prompt,
greedy decoding answers "Hello world" and then emits <|end|>. That lets tests see Phi-3's prompt
format, the stop at <|end|>, and the system prompt, through real llama.cpp decode.
"""

from __future__ import annotations

import itertools
from pathlib import Path

ANSWER = "Hello world"
N_EMBD, N_HEAD, N_FF, N_LAYER = 64, 4, 128, 2
CHAIN = ["▁Hello", "▁world", "<|end|>"]


def _tokenizer_fields(vocab_path: Path) -> list[tuple[str, object, object, object]]:
    """(key, value, type, array item type) of every tokenizer.* field in llama.cpp's Phi-3 vocab."""
    from gguf import GGUFReader

    reader = GGUFReader(str(vocab_path))
    return [
        (key, field.contents(), field.types[0], field.types[1] if len(field.types) > 1 else None)
        for key, field in reader.fields.items()
        if key.startswith("tokenizer.")
    ]


def build_tiny_phi3(vocab_path: Path, out_path: Path) -> Path:
    """Write the tiny Phi-3 GGUF to out_path (from the vocab file's tokenizer)."""
    import gguf
    import numpy as np

    fields = _tokenizer_fields(vocab_path)
    texts = next(value for key, value, *_ in fields if key == "tokenizer.ggml.tokens")
    n_vocab = len(texts)
    chain = [texts.index(piece) for piece in CHAIN]

    writer = gguf.GGUFWriter(str(out_path), "phi3")
    writer.add_name("tiny-phi3-for-tests")
    writer.add_context_length(4096)
    writer.add_embedding_length(N_EMBD)
    writer.add_feed_forward_length(N_FF)
    writer.add_block_count(N_LAYER)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(N_EMBD // N_HEAD)
    writer.add_rope_freq_base(10000.0)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for key, value, vtype, sub_type in fields:
        writer.add_key_value(key, value, vtype, sub_type)

    # Every token not in the chain sits on axis 0, which the output maps to the chain's start.
    embd = np.zeros((n_vocab, N_EMBD), dtype=np.float32)
    embd[:, 0] = 1.0
    output = np.zeros((n_vocab, N_EMBD), dtype=np.float32)
    output[chain[0], 0] = 1.0
    for axis, (token, following) in enumerate(itertools.pairwise(chain), start=1):
        embd[token] = 0.0
        embd[token, axis] = 1.0
        output[following, axis] = 1.0
    writer.add_tensor("token_embd.weight", embd.astype(np.float16))
    writer.add_tensor("output_norm.weight", np.full(N_EMBD, 4.0, dtype=np.float32))
    writer.add_tensor("output.weight", output.astype(np.float16))
    for i in range(N_LAYER):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.attn_qkv.weight", np.zeros((3 * N_EMBD, N_EMBD), np.float32))
        writer.add_tensor(f"blk.{i}.attn_output.weight", np.zeros((N_EMBD, N_EMBD), np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", np.zeros((2 * N_FF, N_EMBD), np.float32))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", np.zeros((N_EMBD, N_FF), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out_path
