"""Write a tiny random-weight llama GGUF model that real engines load and serve.

Two layers, 64-wide embeddings, a 457-token SentencePiece-style vocabulary
(byte fallback tokens, a few words and ASCII characters) and a plain chat
template: it generates nonsense quickly on a CPU, which is all an engine
conformance test needs. Needs the ``gguf`` and ``numpy`` packages; runs in the
engines' own environment (``python -m loadtest.engines`` calls it there).

    python tiny_gguf.py OUT.gguf
"""

from __future__ import annotations

import sys

import gguf  # type: ignore[import-not-found]
import numpy as np

WORDS = (
    "the a of and to in is it you that he was for on are with as I his they be at one have "
    "this from or had by hot word but what some we can out other were all there when up use "
    "your how said an each she which do their time if will way about many then them write "
    "would like so these her long make thing see him two has look more day could go come did "
    "number sound no most people my over know water than call first who may down side been "
    "now find ok OK hello world"
).split()
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def write_model(path: str, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    n_embd, n_ff, n_layer, n_head, n_head_kv, ctx = 64, 128, 2, 4, 2, 4096
    pieces = ["▁" + w for w in WORDS] + [chr(c) for c in range(33, 127)]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)  # unknown, control, byte, normal
    scores = [0.0] * (3 + 256) + [-float(i) for i in range(len(pieces))]
    w = gguf.GGUFWriter(path, "llama")
    w.add_name("ballast-tiny")
    w.add_context_length(ctx)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_rope_dimension_count(n_embd // n_head)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(0)  # every tensor f32
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)

    def random(name: str, *shape: int) -> None:
        w.add_tensor(name, (rng.standard_normal(shape) * 0.2).astype(np.float32))

    def ones(name: str, n: int) -> None:
        w.add_tensor(name, np.ones(n, dtype=np.float32))

    kv = n_embd // n_head * n_head_kv
    random("token_embd.weight", len(tokens), n_embd)
    ones("output_norm.weight", n_embd)
    random("output.weight", len(tokens), n_embd)
    for i in range(n_layer):
        ones(f"blk.{i}.attn_norm.weight", n_embd)
        random(f"blk.{i}.attn_q.weight", n_embd, n_embd)
        random(f"blk.{i}.attn_k.weight", kv, n_embd)
        random(f"blk.{i}.attn_v.weight", kv, n_embd)
        random(f"blk.{i}.attn_output.weight", n_embd, n_embd)
        ones(f"blk.{i}.ffn_norm.weight", n_embd)
        random(f"blk.{i}.ffn_gate.weight", n_ff, n_embd)
        random(f"blk.{i}.ffn_up.weight", n_ff, n_embd)
        random(f"blk.{i}.ffn_down.weight", n_embd, n_ff)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


if __name__ == "__main__":
    write_model(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 0)
