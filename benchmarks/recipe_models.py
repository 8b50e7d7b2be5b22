"""The published ``config.json`` shapes the recipes are sized for (no weights: ``--compile-only`` reads only the
config), and a writer: ``python benchmarks/recipe_models.py DIR`` makes ``DIR/<name>/config.json`` for each."""

import json
import sys
from pathlib import Path

_LLAMA = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=4096, num_attention_heads=32,
              num_hidden_layers=32, rms_norm_eps=1e-5, tie_word_embeddings=False, hidden_act="silu")
MODELS = {
    "llama2_7b": dict(_LLAMA, intermediate_size=11008, num_key_value_heads=32, vocab_size=32000, rope_theta=1e4,
                      max_position_embeddings=4096),
    "llama3_8b": dict(_LLAMA, intermediate_size=14336, num_key_value_heads=8, vocab_size=128256, rope_theta=5e5,
                      max_position_embeddings=8192),
    "mistral_7b_instruct": dict(_LLAMA, model_type="mistral", architectures=["MistralForCausalLM"],
                                intermediate_size=14336, num_key_value_heads=8, vocab_size=32000, rope_theta=1e6,
                                max_position_embeddings=32768, sliding_window=None),
    "llama3_70b": dict(_LLAMA, hidden_size=8192, intermediate_size=28672, num_attention_heads=64,
                       num_key_value_heads=8, num_hidden_layers=80, vocab_size=128256, rope_theta=5e5,
                       max_position_embeddings=8192),
    # Qwen2-7B, a shape no recipe names: run with the Llama-2 recipe (cloak.transformer_type=qwen2).
    "qwen2_7b": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_size=3584, intermediate_size=18944,
                     num_attention_heads=28, num_key_value_heads=4, num_hidden_layers=28, vocab_size=152064,
                     rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=32768, tie_word_embeddings=False,
                     hidden_act="silu", sliding_window=None, use_sliding_window=False),
}


def write(folder) -> None:
    for name, config in MODELS.items():
        (Path(folder) / name).mkdir(parents=True, exist_ok=True)
        (Path(folder) / name / "config.json").write_text(json.dumps(config, indent=1))


if __name__ == "__main__":
    write(sys.argv[1])
